"""What runs of the graph show of each channel space at its consumers' inputs.

For channel j of a space, read by consumer c as a_j (c's input channel; a Flatten block of
``block`` features per channel before a Gemm):

- ``seen[j]``: on the allocation probes, the most any consumer sees of it, mean |a_j|. A channel
  the probes leave silent is not offered to the lossy passes: its measured cost would say nothing
  about real inputs (on the captcha CRNN, merges of such channels cost 0 on uniform-noise probes
  and 2 points of exact-match accuracy on real captchas).
- ``constants[c][j]``: what consumer c reads of channel j once its producers' weight rows are zero
  (its bias through the path: ReLU, BN, ...), per block position, shape (C, block): the constant a
  pruned channel leaves behind, the same on every input (averaged over positions, where a padded
  depthwise conv on the path makes the border differ); for a ConvTranspose, times the share of
  its taps an output receives, so that folding it over all taps adds its mean contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import verify
from .coupling import Space
from .model_io import snapshot
from .profile import digest


@dataclass
class SpaceStats:
    seen: np.ndarray
    constants: list[np.ndarray]  # per consumer of the space, in order


def channel_stats(ctx, spaces: list[Space], constants: bool = True) -> list[SpaceStats]:
    """Two runs: the current graph on the allocation probes, and (one probe; with ``constants``)
    the graph with every space's producer weights zero; kept in ``ctx.memo`` for later builds of
    the same model."""
    names = list(dict.fromkeys(c.layer.node.inputs[0].name for space in spaces for c in space.consumers))
    model, arrays = snapshot(ctx.graph, ctx.template)
    state = [model.SerializeToString(deterministic=True)]  # the large weights are placeholders here ...
    state += [f"{name}:{digest(v)}".encode() for name, v in arrays.items()]  # ... and digested here
    key = f"channel stats {len(ctx.budget.probes)} {constants} " + digest(np.frombuffer(b"".join(state), np.uint8))
    if key not in ctx.memo:  # else: the same model and probes in an earlier build of this call
        probes = ctx.budget.probes
        seen = _seen(verify.session(model, names, arrays=arrays), names, probes, spaces)
        values = [[] for _ in spaces]
        if constants:
            zeroed = dict(arrays)
            for space in spaces:
                for p in space.producers:
                    zeroed[p.weight.name] = np.zeros_like(p.weight.values)
            values = [[x.mean(axis=2) * _taps_per_output(c.layer, x.shape[2], ctx.shapes)
                       for c, x in zip(space.consumers, per)]
                      for space, per in zip(spaces, consumer_inputs(model, zeroed, spaces, probes[0]))]
        ctx.memo[key] = [SpaceStats(s, v) for s, v in zip(seen, values)]
    return ctx.memo[key]


def _taps_per_output(layer, positions: int, shapes: dict) -> float:
    """For a ConvTranspose, the share of its kernel's taps an output receives on average (its
    input's positions over its output's): a constant input channel adds Σ taps · this per output
    on average (1/4 at stride 2 with a 2×2 kernel); 1 for the other consumers, which read every tap."""
    out = shapes.get(layer.node.outputs[0].name) if layer.op == "ConvTranspose" else None
    return positions / float(np.prod(out[2:])) if out and np.prod(out[2:]) else 1.0


def consumer_inputs(model, arrays: dict[str, np.ndarray], spaces: list[Space], feeds: dict[str, np.ndarray]
                    ) -> list[list[np.ndarray]]:
    """Per space and consumer, its input on one run of ``model`` (weights ``arrays``) on ``feeds``
    (:func:`read_input`)."""
    names = list(dict.fromkeys(c.layer.node.inputs[0].name for space in spaces for c in space.consumers))
    outputs = dict(zip(names, verify.session(model, names, arrays=arrays).run(None, feeds)))
    return [[read_input(outputs, c, space) for c in space.consumers] for space in spaces]


def read_input(outputs: dict, consumer, space: Space) -> np.ndarray:
    """The consumer's input as (C, block, positions) over the space's channels (zero outside its range)."""
    lo, hi, shift, total = consumer.span(space.channels)
    x = np.moveaxis(np.asarray(outputs[consumer.layer.node.inputs[0].name], np.float64), consumer.axis, 0)
    x = x.reshape(total, consumer.block, -1)[lo + shift:hi + shift]
    full = np.zeros((space.channels,) + x.shape[1:])
    full[lo:hi] = x
    return full


def _seen(sess, names, probes, spaces) -> list[np.ndarray]:
    """Per space, each channel's mean |a| over the probes, at the consumer that sees the most of it."""
    level = [np.zeros(space.channels) for space in spaces]
    for probe in probes:
        outputs = dict(zip(names, sess.run(None, probe)))
        means = {}  # per consumer input and layout: each input channel's mean |a| (one pass, float32)
        for k, space in enumerate(spaces):
            per_consumer = np.zeros((len(space.consumers), space.channels))
            for i, c in enumerate(space.consumers):
                lo, hi, shift, total = c.span(space.channels)
                key = (c.layer.node.inputs[0].name, c.axis, total)
                if key not in means:
                    x = np.moveaxis(np.abs(np.asarray(outputs[key[0]])), c.axis, 0)
                    means[key] = x.reshape(total, -1).mean(axis=1, dtype=np.float64)
                per_consumer[i, lo:hi] = means[key][lo + shift:hi + shift]
            level[k] += per_consumer.max(axis=0)
    return [lv / len(probes) for lv in level]
