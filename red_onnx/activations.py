"""What the allocation probes show of each channel space at its consumers' inputs.

For channel j of a space, read by consumer c as a_j (c's input channel; a Flatten block of
``block`` features per channel before a Gemm), over every probe and position:

- ``seen[j]``: the most any consumer sees of it, mean |a_j| (a channel the probes leave silent is
  not offered to the lossy passes: its measured cost would say nothing about real inputs);
- ``means[c][j]``: mean a_j per block position, shape (C, block): what pruning replaces it by;
- ``spread[j]`` = Σ_c ||W_c[:, j]||² · mean (a_j − μ_j)²: squared estimate of the output error of
  replacing a_j by its mean (pruning);
- ``residual[j]`` = Σ_c ||W_c[:, j]||² · mean (a_j − s_j·a_p)² for the partner p = ``partners[j]``
  at scale s_j: squared estimate of the error of merging j into p (inf without a partner).

Both estimates are in the same units, so merges and prunes can be ordered in one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import verify
from .coupling import Space
from .model_io import to_light_model
from .profile import digest


@dataclass
class SpaceStats:
    seen: np.ndarray
    means: list[np.ndarray]  # per consumer of the space, in order
    spread: np.ndarray
    residual: np.ndarray


def channel_stats(ctx, spaces: list[Space], partners: list[np.ndarray], scales: list[np.ndarray]) -> list[SpaceStats]:
    """One run of the current graph on the allocation probes; kept in ``ctx.memo`` for later builds
    of the same model, probes and partners."""
    names = list(dict.fromkeys(c.layer.node.inputs[0].name for space in spaces for c in space.consumers))
    model, arrays = to_light_model(ctx.graph.copy(), ctx.template)
    state = [model.SerializeToString(deterministic=True)]  # the large weights are placeholders here ...
    state += [f"{name}:{digest(v)}".encode() for name, v in arrays.items()]  # ... and digested here
    state += [digest(np.asarray(p)).encode() + digest(np.asarray(s)).encode() for p, s in zip(partners, scales)]
    key = f"channel stats {len(ctx.budget.probes)} " + digest(np.frombuffer(b"".join(state), np.uint8))
    if key not in ctx.memo:  # else: the same model and probes in an earlier build of this call
        ctx.memo[key] = _measure(verify.session(model, names, arrays=arrays), names, ctx.budget.probes, spaces,
                                 partners, scales)
    return ctx.memo[key]


def _measure(sess, names, probes, spaces, partners, scales) -> list[SpaceStats]:
    sums = [[None] * len(s.consumers) for s in spaces]  # per consumer: [Σa (C, block), Σ|a|, Σa², Σ(a − s·a_p)², n]
    for probe in probes:
        outputs = dict(zip(names, sess.run(None, probe)))
        for k, space in enumerate(spaces):
            for m, consumer in enumerate(space.consumers):
                lo, hi, shift, total = consumer.span(space.channels)
                x = np.moveaxis(np.asarray(outputs[consumer.layer.node.inputs[0].name], np.float64), consumer.axis, 0)
                x = x.reshape(total, consumer.block, -1)[lo + shift:hi + shift]  # (channels lo..hi, block, positions)
                p = partners[k][lo:hi] - lo
                ok = (p >= 0) & (p < hi - lo)
                diff = x - scales[k][lo:hi, None, None] * x[np.where(ok, p, 0)]
                resid = np.where(ok, (diff * diff).sum(axis=(1, 2)), np.inf)
                part = [x.sum(axis=2), np.abs(x).sum(axis=(1, 2)), (x * x).sum(axis=(1, 2)), resid, x.shape[2]]
                acc = sums[k][m]
                sums[k][m] = part if acc is None else [a + b for a, b in zip(acc, part)]
    stats = []
    for k, space in enumerate(spaces):
        c = space.channels
        seen, spread, residual, means = np.zeros(c), np.zeros(c), np.zeros(c), []
        for consumer, (s1, sabs, s2, sres, n) in zip(space.consumers, sums[k]):
            lo, hi, shift, _ = consumer.span(c)
            count = n  # positions, summed over the probes
            mean = s1 / count  # (channels, block)
            full = np.zeros((c, consumer.block))
            full[lo:hi] = mean
            means.append(full)
            w2 = (consumer.columns(c)[:, lo + shift:hi + shift] ** 2).sum(axis=(0, 2))
            seen[lo:hi] = np.maximum(seen[lo:hi], sabs / (count * consumer.block))
            var = np.maximum(s2 / (count * consumer.block) - (mean * mean).mean(axis=1), 0.0)
            spread[lo:hi] += w2 * var
            residual[lo:hi] += np.where(np.isfinite(sres), w2 * sres / (count * consumer.block), np.inf)
        stats.append(SpaceStats(seen, means, spread, residual))
    return stats
