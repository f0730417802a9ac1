"""The interface every bench model implements."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

WITHIN_ONE_POINT = 0.01  # "within 1 point": primary-metric drop <= 0.01


class BenchModel:
    """A trained ONNX model with ground truth.

    Subclasses set `name`, `primary` (key of the primary metric: higher is better, in 0..1),
    `probe_range` ({input name: (low, high)} of real inputs) and implement `build`, `_evaluate`
    and `real_inputs`.
    """

    name: str = ""
    description: str = ""
    primary: str = ""
    # metrics that must also stay within 1 point for a result to count as "within 1 point" (e.g. the clean
    # accuracy of a detector whose primary metric is threshold-free)
    guards: tuple[str, ...] = ()
    probe_range: dict[str, tuple[float, float]] = {}

    def build(self) -> Path:
        """Build or extract the ONNX file into the cache once; return its path."""
        raise NotImplementedError

    _half: int | None = None

    def evaluate(self, model: onnx.ModelProto | str | os.PathLike, quick: bool = False, sess=None,
                 half: int | None = None) -> dict[str, float]:
        """Metrics of `model` on this model's ground truth (one onnxruntime session, batched runs; pass `sess`,
        a session on `model`, to reuse one). `half` 0 or 1: on the even or the odd samples only (the metric
        mode's bench searches on one half and is judged on the other)."""
        from ..common import session

        self._half = half
        try:
            metrics = self._evaluate(sess or session(model), quick)
        finally:
            self._half = None
        assert self.primary in metrics, (self.name, metrics)
        return metrics

    def subset(self, *samples):
        """The evaluation's samples (arrays or lists, first axis), restricted to the half asked for."""
        return samples if self._half is None else tuple(s[self._half::2] for s in samples)

    def _evaluate(self, sess, quick: bool) -> dict[str, float]:
        raise NotImplementedError

    def real_inputs(self, n: int = 16) -> dict[str, np.ndarray]:
        """A batch of `n` real inputs, for deviation on real data (first sample: latency input)."""
        raise NotImplementedError

    def within_one_point(self, reference: dict[str, float], metrics: dict[str, float]) -> bool:
        """The primary metric and every guard metric dropped by at most 0.01."""
        return within_one_point(reference, metrics, (self.primary, *self.guards))


def within_one_point(reference: dict[str, float], metrics: dict[str, float], keys) -> bool:
    return all(reference[k] - metrics[k] <= WITHIN_ONE_POINT + 1e-12 for k in keys)
