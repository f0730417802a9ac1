"""Digits CNN and digits ResNet (trained by models/build_models.py on sklearn's 8x8 digits)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

from ..common import REPO_DIR, run_batched
from .base import BenchModel


@functools.cache
def _split():
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    from models.build_models import digits_split

    return digits_split()  # x_train, y_train, x_test [N,1,8,8] in 0..1, y_test


class Digits(BenchModel):
    primary = "accuracy"
    probe_range = {"input": (0.0, 1.0)}

    def __init__(self, name: str, filename: str, description: str):
        self.name, self.filename, self.description = name, filename, description

    def build(self) -> Path:
        path = REPO_DIR / "models" / self.filename
        if not path.exists():  # owned by models/: never rebuilt from here
            raise FileNotFoundError(f"{path} is missing: run `python models/build_models.py`")
        return path

    def _evaluate(self, sess, quick: bool) -> dict[str, float]:
        _, _, x, y = _split()  # 540 test images; small enough to keep whole in quick mode
        x, y = self.subset(x, y)
        logits = run_batched(sess, {"input": x}, batch=256)[0]
        return {"accuracy": float(np.mean(logits.argmax(1) == y))}

    def real_inputs(self, n: int = 16) -> dict[str, np.ndarray]:
        return {"input": _split()[2][:n]}


def models() -> list[BenchModel]:
    return [
        Digits("digits_cnn", "digits_cnn.onnx", "3-conv CNN + 2 Gemm on 8x8 digits (BatchNormalization kept)"),
        Digits("digits_resnet", "digits_resnet.onnx", "small ResNet (4 residual Adds) on 8x8 digits"),
    ]
