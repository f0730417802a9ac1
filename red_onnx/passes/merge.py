"""Output merging (RED step 2): redundant output channels are merged into one, consumers rewired.

In a channel space (see :mod:`red_onnx.coupling`) let p_c be channel c's row over every producer
(weights and bias). If p_j = s·p_i with s > 0, equal per-channel path parameters, and s = 1 or a
positively homogeneous path, then channel j carries s times channel i wherever it is consumed, so::

    W_consumer[:, i] += s · W_consumer[:, j];   delete channel j everywhere

is exact. Channels with all-zero rows on a path that maps 0 to 0 carry 0 and are simply deleted.

Lossy: near-multiples (scale-aware: the direction of p_j close to p_i's) become budget candidates.
Accepting a set of them makes each cluster exactly redundant in weight space: members get
p_c = ⟨p_c, r⟩ r with r the unit direction of the cluster's weighted mean (weights ||p_c||·||W_c||,
so the channels that matter most move least; s = 1 and r the weighted mean row on non-homogeneous
paths); the exact rule above then removes them.
"""

from __future__ import annotations

import functools
import time
from collections import Counter

import numpy as np

from ..activations import channel_stats
from ..budget import Candidate, Spent
from ..context import Context, PassResult
from ..coupling import Space, channel_spaces, remove_channels
from ..layers import RECURRENT_OPS, Layer, SharedLinear, refresh_shapes
from ..profile import digest
from . import prune

NAME = "merge"
EXACT_RTOL = 1e-5  # relative distance under which two rows are equal up to float rounding
EXERCISED = 0.05  # a channel whose mean |activation| on the probes is under 5% of the median is silent


def run(ctx: Context) -> PassResult:
    start = time.perf_counter()
    result = PassResult(NAME)
    counts = Counter()
    added = []
    if ctx.lossy:
        pruning = "prune" in ctx.passes
        spent, added = spend(ctx, merging=True, pruning=pruning)
        counts["near_merges_accepted" if not pruning else "merge_and_prune_levels_accepted"] = len(spent.accepted)
        counts["deviation_allocated"] = round(spent.deviation_after, 6)
    remove_redundant(ctx, result, counts, merges=True)
    prune.drop_zero_biases(ctx.graph, added)
    result.counts = dict(counts)
    result.modified = bool(counts["channels_merged"] or counts["dead_removed"] or counts["channels_pruned"])
    result.seconds = time.perf_counter() - start
    return result


def remove_redundant(ctx: Context, result: PassResult, counts: Counter, merges: bool) -> None:
    """Delete, in every channel space, the channels that are exact multiples of another (with
    ``merges``), that carry 0, or that no consumer reads (:func:`exact_plan`), keeping each space's
    count a multiple of ``ctx.channel_align`` or its count before (keeping an exact duplicate is
    exact too)."""
    refresh_shapes(ctx.graph, ctx.template, ctx.shapes)
    rows, done = result.layers, set()
    while True:  # a merge before a Concat moves the offsets of the spaces after it: look again
        spaces = channel_spaces(ctx.graph, ctx.shapes, ctx.exclude)
        for space in spaces:
            if space.name in done:
                continue
            done.add(space.name)
            ctx.progress("exact merges, channel spaces", len(done), len(spaces))
            if space.frozen:
                result.leave(space.name, space.frozen)
                continue
            root, scale, dead, unread_channels = _memo_plan(ctx, space, merges)
            kept_back = align(root, scale, dead, ctx.channel_align, space.groups)
            unread = int(np.sum(dead & unread_channels))
            merged = int(np.sum(root != np.arange(space.channels)))
            if merged or dead.any():
                row = {"name": space.name, "channels": space.channels,
                       "channels_after": space.channels - merged - int(dead.sum()),
                       "merged": merged, "dead": int(dead.sum()) - unread, "pruned": unread}
                if kept_back:
                    row["kept_for_alignment"] = kept_back
                rows.append(row)
                apply_merges(space, root, scale, dead)
                counts["channels_merged"] += merged
                counts["dead_removed"] += int(dead.sum()) - unread
                counts["channels_pruned"] += unread
                if space.concats:
                    refresh_shapes(ctx.graph, ctx.template, ctx.shapes)
                    break
            elif kept_back:
                rows.append({"name": space.name, "channels": space.channels, "channels_after": space.channels,
                             "kept_for_alignment": kept_back})
        else:
            break
    counts["spaces_frozen"] = len(result.left_alone)


def align(root: np.ndarray, scale: np.ndarray, dead: np.ndarray, multiple: int, groups: int = 1) -> int:
    """Keep back removals (in place: a kept channel is its own root, at scale 1) so that the kept
    count is a multiple of ``multiple``, or the count before where that is less (``multiple`` 0:
    keep every channel), and, with ``groups`` (see :attr:`red_onnx.coupling.Space.groups`), as
    many are removed from every block; returns how many."""
    c = len(root)
    removed = np.flatnonzero((root != np.arange(c)) | dead)
    if len(removed) == 0 or multiple == 1 and groups == 1:
        return 0
    if groups == 1:
        kept = c - len(removed)
        target = c if multiple == 0 else min(c, -(-kept // multiple) * multiple)
        back = removed[::-1][:target - kept]  # the last ones: any is exact
    else:
        per_block = [removed[removed // (c // groups) == b] for b in range(groups)]
        k = min(min(len(r) for r in per_block), c // groups - 1)  # removals per block; a block keeps one
        while k and (multiple == 0 or multiple > 1 and (c - groups * k) % multiple):
            k -= 1
        back = np.concatenate([r[::-1][:len(r) - k] for r in per_block]).astype(int)
    root[back], scale[back], dead[back] = back, 1.0, False
    return len(back)


# ---------------------------------------------------------------------------------------------
# exact merges


def exact_plan(space: Space, rtol: float = EXACT_RTOL, merges: bool = True, unread: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(root, scale, dead): channel c carries scale[c] × channel root[c] (only itself without
    ``merges``); dead channels carry 0 or are read by no consumer (``unread``, if known)."""
    c = space.channels
    rows = space.producer_rows()
    path = space.path_rows()
    norms = np.linalg.norm(rows, axis=1)
    dead = (norms == 0) if space.zero_preserving else np.zeros(c, bool)
    dead |= space.consumer_norms() == 0 if unread is None else unread
    root, scale = np.arange(c), np.ones(c)
    segments = space.segments if space.segments is not None else np.zeros(c, int)
    for seg in np.unique(segments):  # a segment (or space) keeps a channel: no zero-width tensors
        members = np.flatnonzero(segments == seg)
        if dead[members].all():
            dead[members[0]] = False
    live = np.flatnonzero(~dead & (norms > 0))
    if len(live) < 2 or not merges:
        return root, scale, dead
    # channel b carries a multiple of a: equal directions (homogeneous path) or equal rows, within rtol
    x = rows[live] / norms[live, None] if space.homogeneous else rows[live]
    tol = rtol if space.homogeneous else rtol * norms[live]
    label = _path_labels(path[live])
    for a, b in _close_pairs(x, tol):
        ia, ib = live[a], live[b]
        if root[ia] == ia and root[ib] == ib and label[a] == label[b]:
            root[ib] = ia
            scale[ib] = norms[ib] / norms[ia] if space.homogeneous else 1.0
    return root, scale, dead


def _close_pairs(x: np.ndarray, tol: float | np.ndarray) -> list[tuple[int, int]]:
    """Pairs a < b (in order) with ||x_a − x_b|| ≤ tol (tol: a number, or per row a: tol[a]).

    Few rows: all pairs at once. Many long rows (VGG's 1024 × 25089 classifier took 3 s): only the
    pairs whose projections on a few random unit directions differ by at most tol (a necessary
    condition, |⟨x_a − x_b, r⟩| ≤ ||x_a − x_b||) are compared in full."""
    n = len(x)
    tol_a = np.broadcast_to(np.asarray(tol, np.float64), (n,))
    if n * n * x.shape[1] <= 2**26:
        a, b = np.nonzero(np.triu(_pairwise(x) <= tol_a[:, None], 1))
        return list(zip(a.tolist(), b.tolist()))
    r = np.random.default_rng(0).standard_normal((x.shape[1], 4))
    p = x @ (r / np.linalg.norm(r, axis=0))
    order = np.argsort(p[:, 0], kind="stable")
    first = p[order, 0]
    wide = float(tol_a.max())
    ends = np.searchsorted(first, first + wide, side="right")
    pairs = set()
    for i in range(n):
        for j in range(i + 1, ends[i]):
            a, b = sorted((int(order[i]), int(order[j])))
            if np.all(np.abs(p[a] - p[b]) <= tol_a[a]) and np.linalg.norm(x[a] - x[b]) <= tol_a[a]:
                pairs.add((a, b))
    return sorted(pairs)


def _memo_plan(ctx: Context, space: Space, merges: bool) -> tuple[np.ndarray, ...]:
    """:func:`exact_plan` (a copy), kept for the later builds of this call (keyed by the stored
    values it reads), and which channels no consumer reads."""
    segments = space.segments if space.segments is not None else np.zeros(0, int)
    unread = space.consumer_norms() == 0
    plan = ctx.memoized(f"exact plan {merges}", _stored(space) + [space.path_rows(), segments, unread],
                        lambda: exact_plan(space, merges=merges, unread=unread))
    return (*(a.copy() for a in plan), unread)


def _stored(space: Space) -> list[np.ndarray]:
    """What a space's producer rows and kind are computed from, for memo keys: the producers'
    weights and biases as stored (no float64 copy), their layouts, the path's kind."""
    layout = repr([(p.op, p.group, p.node.attrs.get("transB", 0), p.bias is None) for p in space.producers]
                  + [space.homogeneous, space.zero_preserving]).encode()
    return [t.values for p in space.producers for t in (p.weight, p.bias) if t is not None] + [
        np.frombuffer(layout, np.uint8)]


def _pairwise(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(axis=1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))


def _path_labels(path: np.ndarray) -> np.ndarray:
    """One label per channel: equal path parameters, equal labels."""
    if path.shape[1] == 0:
        return np.zeros(len(path), int)
    return np.unique(path, axis=0, return_inverse=True)[1].ravel()


def _equal_rows(path: np.ndarray) -> np.ndarray:
    label = _path_labels(path)
    return label[:, None] == label[None, :]


def apply_merges(space: Space, root: np.ndarray, scale: np.ndarray, dead: np.ndarray) -> None:
    """Delete every channel that is merged (root ≠ itself) or dead: channel c's contribution moves
    onto its root with its scale (:func:`red_onnx.coupling.remove_channels`)."""
    c = space.channels
    keep = np.flatnonzero((root == np.arange(c)) & ~dead)
    new_index = np.full(c, -1)
    new_index[keep] = np.arange(len(keep))
    mixing = np.zeros((c, len(keep)))  # consumer input c → kept channel, with its scale
    alive = ~dead
    mixing[np.flatnonzero(alive), new_index[root[alive]]] = scale[alive]
    remove_channels(space, keep, mixing)


# ---------------------------------------------------------------------------------------------
# near merges: budget candidates


def spend(ctx: Context, merging: bool, pruning: bool) -> tuple[Spent, list]:
    """Offer the budget, per channel space, levels of channel removals: each channel the probes
    exercise merged into its partner or pruned to a constant (:mod:`red_onnx.passes.prune`),
    whichever adds the smaller estimated error (:func:`_removals`), best first; level ℓ takes the
    first :func:`_level_sizes` removals. Returns what was spent and the layers that got a bias for it."""
    spaces = [s for s in channel_spaces(ctx.graph, ctx.shapes, ctx.exclude) if not s.frozen and s.consumers]
    if not spaces or ctx.channel_align == 0:
        return Spent([], 0.0, 0.0, 0), []
    added = prune.add_biases(ctx, spaces) if pruning else []
    stats = channel_stats(ctx, spaces, constants=pruning)
    mode = "+".join(kind for kind, on in (("merge", merging), ("prune", pruning)) if on)
    candidates, info = [], {}
    for k, space in enumerate(spaces):
        consumer_norms = space.consumer_norms()
        # the float64 rows only where needed (a later build's memo hit needs those of its merges
        # only): VGG-11's classifier rows are 205 MB, and all its spaces' took 1 s a build
        rows = functools.cache(space.producer_rows)
        removals = ctx.memoized(f"removals {mode}", _stored(space) + [consumer_norms, space.path_rows(), stats[k].seen],
                                lambda: _removals(space, rows(), consumer_norms, stats[k], merging, pruning))
        if not removals:
            continue
        saving = _channel_saving(space, ctx.shapes)
        edited = (space.producers if merging else []) + ([c.layer for c in space.consumers] if pruning else [])
        tensors = tuple(t.name for layer in edited for t in (layer.weight, layer.bias) if t is not None)
        info[k] = {"rows": rows, "constants": stats[k].constants, "weights": functools.cache(
            lambda rows=rows, norms=consumer_norms: np.linalg.norm(rows(), axis=1) * np.maximum(norms, 1e-12))}
        for level, taken in enumerate(_levels(removals, space, ctx.channel_align)):
            chosen, m = [(j, i) for _, j, i in taken], len(taken)
            key = f"{mode}:{space.name}:{m}:" + digest(np.asarray(chosen, np.int64))
            error = float(np.sqrt(sum(e * e for e, _, _ in taken)))
            candidates.append(Candidate(key=key, slot=f"{mode}:{k}", saving=tuple(m * x for x in saving),
                                        error=error, level=level, data=(k, chosen), tensors=tensors))
    if not candidates:
        return Spent([], 0.0, 0.0, 0), added

    def materialize(chosen: list[Candidate]) -> dict[str, np.ndarray]:
        edits = {}
        for cand in chosen:  # merges first: a layer's rows may merge while its input columns are pruned
            k, removals = cand.data
            pairs = [(j, i) for j, i in removals if i >= 0]
            if pairs:
                edits.update(_cluster_edits(spaces[k], info[k], pairs))
        for cand in chosen:
            k, removals = cand.data
            prune.edits(spaces[k], info[k]["constants"], np.array([j for j, i in removals if i < 0], int), edits)
        return edits

    return ctx.spend(candidates, materialize, per_level=True, share=ctx.removal_share), added


def _removals(space: Space, rows: np.ndarray, consumer_norms: np.ndarray, stats, merging: bool, pruning: bool
              ) -> list[tuple[float, int, int]]:
    """(estimated error, channel, partner or -1 to prune), best first: each channel the probes
    exercise once, by its cheaper removal; a channel pruned is no channel's partner.

    In weight space, times the channel's consumer column norm ||W_c[:, j]||: merging j into its
    nearest exercised channel i (cosine on a homogeneous path, distance otherwise; equal path
    parameters) costs ||p_j − s·p_i|| (s = ⟨p_j, p_i⟩ / ||p_i||² on a homogeneous path, else 1),
    pruning it (its weights to 0, its bias kept: a constant) ||w_j||, its weights without the bias."""
    norms = np.linalg.norm(rows, axis=1)
    exercised = stats.seen > EXERCISED * max(float(np.median(stats.seen)), 1e-30)
    options = []
    if merging and space.channels >= 2:
        same_path = _equal_rows(space.path_rows())
        if space.homogeneous:
            unit = rows / np.maximum(norms, 1e-300)[:, None]
            cos = unit @ unit.T
            score = np.where(same_path & (cos > 0), cos, -np.inf)
        else:
            score = np.where(same_path, -_pairwise(rows), -np.inf)
        np.fill_diagonal(score, -np.inf)
        score[:, ~exercised | (norms == 0)] = -np.inf
        best = np.argmax(score, axis=1)
        js = np.flatnonzero(exercised & np.isfinite(score[np.arange(space.channels), best]))
        partner = rows[best[js]]
        scale = ((rows[js] * partner).sum(axis=1) / norms[best[js]] ** 2)[:, None] if space.homogeneous else 1.0
        residual = np.linalg.norm(rows[js] - scale * partner, axis=1) * consumer_norms[js]
        options += [(float(e), int(j), int(best[j])) for e, j in zip(residual, js)]
    if pruning:
        weights = space.producer_weights()
        weight_norms = np.linalg.norm(weights.astype(np.float64), axis=1)
        options += [(float(weight_norms[j] * consumer_norms[j]), int(j), -1) for j in np.flatnonzero(exercised)]
    options.sort(key=lambda o: o[0])
    cluster = list(range(space.channels))  # union-find over the merges taken

    def find(x: int) -> int:
        while cluster[x] != x:
            cluster[x] = cluster[cluster[x]]
            x = cluster[x]
        return x

    removals, removed, pruned, targets = [], set(), set(), set()
    for error, j, i in options:
        if j in removed or (j in targets if i < 0 else i in pruned or find(i) == find(j)):
            continue
        removed.add(j)
        if i < 0:
            pruned.add(j)
        else:
            targets.add(i)
            cluster[find(j)] = find(i)
        removals.append((error, j, i))
    if len(removals) >= space.channels:  # a space keeps a channel
        removals = removals[:space.channels - 1]
    return removals


def _levels(removals: list[tuple[float, int, int]], space: Space, multiple: int) -> list[list[tuple[float, int, int]]]:
    """The removals each level takes, mild to aggressive: the first :func:`_level_sizes` of the
    list; in a space of grouped convs, the first k of every block (the blocks stay equal), for the
    k whose kept count is a multiple of ``multiple`` (or all)."""
    if space.groups == 1:
        return [removals[:m] for m in _level_sizes(len(removals), space.channels, multiple)]
    blocks = space.blocks()
    per_block = [[r for r in removals if blocks[r[1]] == b] for b in range(space.groups)]
    most = min(min(len(p) for p in per_block), space.channels // space.groups - 1)  # a block keeps a channel
    levels = []
    for k in _level_sizes(most):
        if multiple > 1 and (space.channels - space.groups * k) % multiple:
            continue
        levels.append(sorted((r for p in per_block for r in p[:k]), key=lambda r: r[0]))
    return levels


def _level_sizes(n: int, channels: int = 0, multiple: int = 1) -> list[int]:
    """How many of a space's merges (the best first) each level takes: 1, 2, 3, 4, 6, 8, 11, 16, ...
    (about √2 apart, so the budget can stop within 1.4x of the most that fits), and all ``n``; with a
    ``multiple`` (the latency guard's), only sizes that leave ``channels`` a multiple of it."""
    sizes = {min(n, round(2 ** (e / 2))) for e in range(int(2 * np.log2(max(n, 1))) + 2)}
    if multiple > 1:
        sizes = {m + (channels - m) % multiple for m in sizes} - {channels}
    return sorted(m for m in sizes if 1 <= m <= n)


def _channel_saving(space: Space, shapes: dict) -> tuple[int, int, int]:
    """(MACs, params, bytes) saved by deleting one channel of the space."""
    macs = params = nbytes = 0
    for layer in space.producers:
        w = layer.get_weight()
        row = int(np.prod(w.shape[1:])) + (1 if layer.bias is not None else 0)
        macs += _positions(layer, shapes) * int(np.prod(w.shape[1:]))
        params += row
        nbytes += row * w.dtype.itemsize
    for consumer in space.consumers:
        w = consumer.layer.get_weight()
        col = w.shape[0] * int(np.prod(w.shape[1:])) // consumer.span(space.channels)[3]
        macs += _positions(consumer.layer, shapes) * col
        params += col
        nbytes += col * w.dtype.itemsize
    return macs, params, nbytes


def _positions(layer: Layer, shapes: dict) -> int:
    """Positions at which a conv applies its kernel: its output's (Conv), its input's (ConvTranspose);
    its input's steps (a recurrent node, per direction), its input's rows (a MatMul: the tokens); 1
    for a Gemm, or an unknown shape; times the readers of a shared weight."""
    copies = len(layer.readers) if isinstance(layer, SharedLinear) else 1  # a shared weight: at each reader
    if layer.op in RECURRENT_OPS:
        shape = shapes.get(layer.node.inputs[0].name)
        return int(np.prod(shape[:-1])) if shape else 1
    if layer.op == "MatMul":  # on (N, T, C) tokens: once per token, as layers.node_macs counts it
        shape = shapes.get(layer.node.inputs[0].name)
        return copies * (int(np.prod(shape[:-1])) if shape and len(shape) > 1 else 1)
    if layer.op not in ("Conv", "ConvTranspose"):
        return copies
    shape = shapes.get((layer.node.outputs[0] if layer.op == "Conv" else layer.node.inputs[0]).name)
    return copies * int(np.prod(shape[2:])) if shape else copies


def _cluster_edits(space: Space, info: dict, pairs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Producer weights (stored layout) that make each accepted cluster exactly redundant."""
    c = space.channels
    parent = np.arange(c)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for j, i in pairs:
        a, b = find(j), find(i)
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = parent
    while True:  # path doubling: every channel's root (the smallest member of its cluster)
        up = roots[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    rows = info["rows"]().copy()
    weights = info["weights"]()
    order = np.argsort(roots, kind="stable")  # clusters by root, members ascending
    starts = np.flatnonzero(np.diff(roots[order], prepend=-1))
    sizes = np.diff(starts, append=c)
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = order[start:start + size]
        w = weights[members][:, None]
        if space.homogeneous:
            norms = np.linalg.norm(rows[members], axis=1, keepdims=True)
            direction = (w * rows[members] / np.maximum(norms, 1e-300)).sum(axis=0)
            direction /= np.linalg.norm(direction)
            rows[members] = np.maximum(rows[members] @ direction, 0.0)[:, None] * direction
        else:
            rows[members] = (w * rows[members]).sum(axis=0) / max(w.sum(), 1e-300)
    edits = {}
    col = 0
    for layer in space.producers:
        w = layer.get_weight()
        width = int(np.prod(w.shape[1:]))
        edits[layer.weight.name] = layer.stored(rows[:, col:col + width].reshape(w.shape))
        col += width
        bias = rows[:, col]
        col += 1
        if layer.bias is not None:
            edits[layer.bias.name] = bias.reshape(layer.bias.values.shape).astype(layer.bias.values.dtype)
    return edits
