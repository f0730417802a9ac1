"""Channel pruning: a channel replaced by a constant, folded into its consumers' biases.

Removing channel j of a channel space (see :mod:`red_onnx.coupling`) is merging it with a
constant neuron: its producers' weight rows w_j go to 0 and it carries c_j, its bias through the
path (ReLU, BN, ...), on every input. Each consumer c reads it as its input channel j (``block``
features after a Flatten) and is rewritten as::

    b_c += Σ_b W_c[:, j, b] · c_j[b];   W_c[:, j, :] = 0

then nobody reads channel j and the exact rule (:func:`red_onnx.passes.merge.remove_redundant`)
deletes it, with its producer rows and path parameters, everywhere at once.

Lossy: the error is about ||w_j||·||W_c[:, j]|| (the input's part the channel no longer carries),
in the units of a merge's ||p_j − s·p_i||·||W_c[:, j]||: merges and prunes of a space compete in one
sequence ordered by that estimate, each level measured by the budget (:mod:`red_onnx.activations`
reads c_j from one run with the weights zeroed; a padded conv on the path or among the consumers
makes the border differ, which the measurement covers). Weights, not the probes' activations,
choose: pruned to their means on random probes, channels that random inputs barely move cost the
MTCNN O-Net 13 points of AUC at a deviation where merges and separations cost 0.5.

Exact, at every tolerance: a channel whose producers' weight rows are already zero is that
constant on every input; where it is the same at every position and no consumer pads its input,
the fold is exact (the constant is read from one run of the graph on zero inputs).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..activations import consumer_inputs
from ..context import Context, PassResult
from ..coupling import Space, channel_spaces
from ..layers import Layer
from ..model_io import snapshot
from . import merge

NAME = "prune"
CONSTANT_RTOL = 1e-6  # a channel whose values agree to this (relative) at every position is constant


def run(ctx: Context) -> PassResult:
    start = time.perf_counter()
    result = PassResult(NAME)
    counts = Counter()
    added: list[Layer] = []
    if ctx.lossy and "merge" not in ctx.passes:  # with merge, its spend offers the prunes too
        spent, added = merge.spend(ctx, merging=False, pruning=True)
        counts["prunes_accepted"] = len(spent.accepted)
        counts["deviation_allocated"] = round(spent.deviation_after, 6)
    added += fold_constant_channels(ctx, result, counts)
    if "merge" not in ctx.passes or counts["constant_channels_folded"]:  # else merge removed them already
        merge.remove_redundant(ctx, result, counts, merges=False)
    drop_zero_biases(ctx.graph, added)
    result.counts = dict(counts)
    result.modified = bool(counts["dead_removed"] or counts["channels_pruned"])
    result.seconds = time.perf_counter() - start
    return result


def add_biases(ctx: Context, spaces: list[Space]) -> list[Layer]:
    """Give every consumer of ``spaces`` a bias of its full width (zeros where it had none), so that
    a pruned channel has somewhere to go; returns the layers that had none."""
    added = []
    for space in spaces:
        for consumer in space.consumers:
            layer = consumer.layer
            if layer.bias is None:
                added.append(layer)
            if layer.bias is None or layer.bias.values.size != layer.out_channels:
                layer.set_bias(layer.get_bias(), ctx.graph)
    return added


def drop_zero_biases(graph: gs.Graph, added: list[Layer]) -> None:
    """Remove the biases :func:`add_biases` added that are still zero (no channel was folded there)."""
    for layer in {id(layer): layer for layer in added}.values():
        if layer.bias is not None and not np.any(layer.bias.values):
            layer.remove_bias(graph)


def edits(space: Space, constants: list[np.ndarray], channels: np.ndarray, edited: dict[str, np.ndarray]) -> None:
    """Into ``edited`` (initializer → values, stored layout; read first where present): every
    consumer of ``space`` with ``channels`` replaced by ``constants`` (per consumer, (C, block))."""
    if len(channels) == 0:
        return
    c = space.channels
    for consumer, mean in zip(space.consumers, constants):
        layer = consumer.layer
        lo, hi, shift, total = consumer.span(c)
        chosen = channels[(channels >= lo) & (channels < hi)]
        if len(chosen) == 0:
            continue
        w = layer.viewed(edited.get(layer.weight.name, layer.weight.values))
        w3 = consumer.dense(w, total).copy()  # in its own dtype: VGG's classifier is 100 MB
        cols = w3[:, chosen + shift].astype(np.float64)
        value = np.repeat(mean[chosen], cols.shape[2] // mean.shape[1], axis=1)  # a conv's kernel sees one value
        bias = np.asarray(edited.get(layer.bias.name, layer.bias.values))
        edited[layer.bias.name] = layer.add_to_bias(bias, np.einsum("ojb,jb->o", cols, value))
        w3[:, chosen + shift] = 0.0
        edited[layer.weight.name] = layer.stored(consumer.compact(w3, w.shape[2:]) if layer.group > 1 else w3.reshape(w.shape))


def fold_constant_channels(ctx: Context, result: PassResult, counts: Counter) -> list[Layer]:
    """Fold every channel that is the same constant on every input into its consumers' biases
    (exact; see the module docstring); returns the layers that got a bias for it."""
    found = []
    for space in channel_spaces(ctx.graph, ctx.shapes, ctx.exclude):
        if space.frozen or not space.consumers:
            continue
        weights = space.producer_weights()
        biases = np.stack([p.get_bias() for p in space.producers], axis=1)
        constant = ~weights.any(axis=1) & (space.consumer_norms() > 0)
        if space.zero_preserving:
            constant &= biases.any(axis=1)  # a zero row carries 0: merge's dead channels
        if not constant.any():
            continue
        blocked = _not_a_bias(space)
        if blocked:
            result.leave(space.name, f"{int(constant.sum())} constant channel(s) kept: {blocked}")
            continue
        found.append((space, np.flatnonzero(constant)))
    if not found:
        return []
    values = _values_on_zero_input(ctx, [s for s, _ in found])
    added, edited = add_biases(ctx, [s for s, _ in found]), {}
    for (space, channels), per_consumer in zip(found, values):
        means, ok = [], np.ones(space.channels, bool)
        for consumer, x in zip(space.consumers, per_consumer):  # x: (C, block, positions)
            scale = np.maximum(np.abs(x).max(axis=(1, 2)), 1e-30)
            ok &= np.ptp(x, axis=2).max(axis=1) <= CONSTANT_RTOL * scale
            means.append(x[:, :, 0])
        chosen = channels[ok[channels]]
        edits(space, means, chosen, edited)
        counts["constant_channels_folded"] += len(chosen)
        if len(chosen) < len(channels):
            result.leave(space.name, f"{len(channels) - len(chosen)} channel(s) with zero weights vary across positions")
    tensors = ctx.graph.tensors()
    for name, values in edited.items():
        tensors[name].values = values
    return added


def _not_a_bias(space: Space) -> str | None:
    """Why a constant input channel is no constant bias for some consumer of ``space``, or None."""
    padded = [c.layer.name for c in space.consumers if _pads(c.layer)]
    if padded:
        return f"read by conv(s) that pad their input ({', '.join(padded)}), where the border would see 0"
    transposed = [c.layer.name for c in space.consumers if c.layer.op == "ConvTranspose"]
    if transposed:
        return f"read by ConvTranspose ({', '.join(transposed)}), whose outputs sum different numbers of its taps"
    return None


def _pads(layer: Layer) -> bool:
    if layer.op != "Conv":
        return False
    auto = layer.node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto not in ("NOTSET", "VALID") or bool(np.any(layer.node.attrs.get("pads", [])))


def _values_on_zero_input(ctx: Context, spaces: list[Space]) -> list[list[np.ndarray]]:
    """Per space and consumer, its input as (C, block, positions) on an all-zero input."""
    model, arrays = snapshot(ctx.graph, ctx.template)
    feeds = {t.name: np.zeros(ctx.shapes[t.name], np.dtype(t.dtype)) for t in ctx.graph.inputs}
    return consumer_inputs(model, arrays, spaces, feeds)
