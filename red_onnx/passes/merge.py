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

import time
from collections import Counter

import numpy as np

from .. import verify
from ..budget import Candidate, Spent
from ..context import Context, PassResult
from ..coupling import Space, channel_spaces, remove_channels
from ..layers import refresh_shapes
from ..model_io import to_light_model
from ..profile import digest

NAME = "merge"
EXACT_RTOL = 1e-5  # relative distance under which two rows are equal up to float rounding
EXERCISED = 0.05  # a channel whose mean |activation| on the probes is under 5% of the median is silent


def run(ctx: Context) -> PassResult:
    start = time.perf_counter()
    result = PassResult(NAME)
    counts = Counter()
    if ctx.lossy:
        spent = _spend(ctx)
        counts["near_merges_accepted"] = len(spent.accepted)
        counts["deviation_allocated"] = round(spent.deviation_after, 6)
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
            root, scale, dead = _memo_plan(ctx, space)
            merged = int(np.sum(root != np.arange(space.channels)))
            if merged or dead.any():
                rows.append({"name": space.name, "channels": space.channels,
                             "channels_after": space.channels - merged - int(dead.sum()),
                             "merged": merged, "dead": int(dead.sum())})
                apply_merges(space, root, scale, dead)
                counts["channels_merged"] += merged
                counts["dead_removed"] += int(dead.sum())
                if space.concats:
                    refresh_shapes(ctx.graph, ctx.template, ctx.shapes)
                    break
        else:
            break
    counts["spaces_frozen"] = len(result.left_alone)
    result.counts = dict(counts)
    result.modified = bool(counts["channels_merged"] or counts["dead_removed"])
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------
# exact merges


def exact_plan(space: Space, rtol: float = EXACT_RTOL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(root, scale, dead): channel c carries scale[c] × channel root[c]; dead channels carry 0."""
    c = space.channels
    rows = space.producer_rows()
    path = space.path_rows()
    norms = np.linalg.norm(rows, axis=1)
    dead = (norms == 0) if space.zero_preserving else np.zeros(c, bool)
    root, scale = np.arange(c), np.ones(c)
    segments = space.segments if space.segments is not None else np.zeros(c, int)
    for seg in np.unique(segments):  # a segment (or space) keeps a channel: no zero-width tensors
        members = np.flatnonzero(segments == seg)
        if dead[members].all():
            dead[members[0]] = False
    live = np.flatnonzero(~dead & (norms > 0))
    if len(live) < 2:
        return root, scale, dead
    if space.homogeneous:
        unit = rows[live] / norms[live, None]
        dist = np.sqrt(np.maximum(2.0 - 2.0 * unit @ unit.T, 0.0))
    else:
        dist = _pairwise(rows[live]) / norms[live, None]
    same_path = _equal_rows(path[live])
    match = (dist <= rtol) & same_path
    for a, ia in enumerate(live):
        if root[ia] != ia:
            continue
        for b in np.flatnonzero(match[a, a + 1:]) + a + 1:
            ib = live[b]
            if root[ib] == ib:
                root[ib] = ia
                scale[ib] = norms[ib] / norms[ia] if space.homogeneous else 1.0
    return root, scale, dead


def _memo_plan(ctx: Context, space: Space) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`exact_plan`, kept for the later builds of this call (keyed by the rows it reads)."""
    segments = space.segments if space.segments is not None else np.zeros(0, int)
    return ctx.memoized("exact plan", [space.producer_rows(), space.path_rows(), segments,
                                       np.array([space.homogeneous, space.zero_preserving])],
                        lambda: exact_plan(space))


def _pairwise(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(axis=1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))


def _equal_rows(path: np.ndarray) -> np.ndarray:
    if path.shape[1] == 0:
        return np.ones((len(path), len(path)), bool)
    _, label = np.unique(path, axis=0, return_inverse=True)  # equal rows share a label
    label = label.ravel()
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


def _spend(ctx: Context) -> Spent:
    spaces = [s for s in channel_spaces(ctx.graph, ctx.shapes, ctx.exclude) if not s.frozen and s.consumers]
    if not spaces:
        return Spent([], 0.0, 0.0, 0)
    exercised = _exercised(ctx, spaces)
    candidates = []
    info = {}
    for k, space in enumerate(spaces):
        cands, data = _near_candidates(space, k, ctx.shapes, exercised[k])
        candidates += cands
        info[k] = data
    if not candidates:
        return Spent([], 0.0, 0.0, 0)

    def materialize(chosen: list[Candidate]) -> dict[str, np.ndarray]:
        edits = {}
        for cand in chosen:  # one level (a number of merges) per space
            k, pairs = cand.data
            edits.update(_cluster_edits(spaces[k], info[k], pairs))
        return edits

    return ctx.spend(candidates, materialize, measured_ranking="levels")


def _exercised(ctx: Context, spaces: list[Space]) -> list[np.ndarray]:
    """Per space, the channels the allocation probes actually drive at the consumers' input.

    A channel the probes leave (nearly) silent, e.g. a ReLU unit that random inputs never open,
    would merge at no measured cost whatever real inputs do with it: such merges are not offered.
    Measured: on the captcha CRNN, merges of such channels cost 0 on uniform-noise probes and 2
    points of exact-match accuracy on real captchas.
    """
    names = list(dict.fromkeys(c.layer.node.inputs[0].name for space in spaces for c in space.consumers))
    model, arrays = to_light_model(ctx.graph.copy(), ctx.template)
    state = [model.SerializeToString(deterministic=True)]  # the large weights are placeholders here ...
    state += [f"{name}:{digest(v)}".encode() for name, v in arrays.items()]  # ... and digested here
    key = f"exercised {len(ctx.budget.probes)} " + digest(np.frombuffer(b"".join(state), np.uint8))
    if key in ctx.memo:  # the same model and probes in an earlier build of this call
        return ctx.memo[key]
    sess = verify.session(model, names, arrays=arrays)
    level = [np.zeros(space.channels) for space in spaces]
    for probe in ctx.budget.probes:
        outputs = dict(zip(names, sess.run(None, probe)))
        for k, space in enumerate(spaces):
            seen = np.zeros(space.channels)  # the most any consumer sees of each channel
            for consumer in space.consumers:
                lo, hi, shift, total = consumer.span(space.channels)
                x = np.moveaxis(np.abs(outputs[consumer.layer.node.inputs[0].name].astype(np.float64)), consumer.axis, 0)
                seen[lo:hi] = np.maximum(seen[lo:hi], x.reshape(total, -1)[lo + shift:hi + shift].mean(axis=1))
            level[k] += seen
    ctx.memo[key] = [lv > EXERCISED * max(float(np.median(lv)), 1e-30) for lv in level]
    return ctx.memo[key]


def _near_candidates(space: Space, k: int, shapes: dict, exercised: np.ndarray) -> tuple[list[Candidate], dict]:
    """The space's levels of near merges: each channel the probes exercise merged into its nearest
    compatible such channel, the pairs ordered by estimated error (residual row norm × consumer
    column norm); level ℓ takes the first :func:`_level_sizes` pairs."""
    rows = space.producer_rows()
    norms = np.linalg.norm(rows, axis=1)
    consumer_norms = space.consumer_norms()
    same_path = _equal_rows(space.path_rows())
    c = space.channels
    if c < 2:
        return [], {}
    if space.homogeneous:
        unit = rows / np.maximum(norms, 1e-300)[:, None]
        cos = unit @ unit.T
        score = np.where(same_path & (cos > 0), cos, -np.inf)
    else:
        score = np.where(same_path, -_pairwise(rows), -np.inf)
    np.fill_diagonal(score, -np.inf)
    score[:, ~exercised] = -np.inf
    score[~exercised, :] = -np.inf
    best = np.argmax(score, axis=1)
    saving = _channel_saving(space, shapes)
    tensors = tuple(t.name for p in space.producers for t in (p.weight, p.bias) if t is not None)
    pairs, errors = [], []
    for j in range(c):
        i = best[j]
        if not np.isfinite(score[j, i]) or norms[i] == 0:
            continue
        s = rows[j] @ rows[i] / (norms[i] ** 2) if space.homogeneous else 1.0
        pairs.append((j, int(i)))
        errors.append(np.linalg.norm(rows[j] - s * rows[i]) * consumer_norms[j])
    order = np.argsort(errors, kind="stable")
    pairs = [pairs[o] for o in order]
    cumulative = np.sqrt(np.cumsum(np.square(np.asarray(errors)[order])))
    cands = []
    for level, m in enumerate(_level_sizes(len(pairs))):
        cands.append(Candidate(key=f"merge:{space.name}:{m}", slot=f"merge:{k}", saving=tuple(m * x for x in saving),
                               error=float(cumulative[m - 1]), level=level, data=(k, pairs[:m]), tensors=tensors))
    weights = norms * np.maximum(consumer_norms, 1e-12)
    return cands, {"rows": rows, "weights": weights}


def _level_sizes(n: int) -> list[int]:
    """How many of a space's merges (the best first) each level takes: 1, 2, 3, 4, 6, 8, 11, 16, ...
    (about √2 apart, so the budget can stop within 1.4x of the most that fits), and all ``n``."""
    sizes = {min(n, round(2 ** (e / 2))) for e in range(int(2 * np.log2(max(n, 1))) + 2)}
    return sorted(m for m in sizes if m >= 1)


def _channel_saving(space: Space, shapes: dict) -> tuple[int, int, int]:
    """(MACs, params, bytes) saved by deleting one channel of the space."""
    macs = params = nbytes = 0
    for layer in space.producers:
        w = layer.get_weight()
        row = int(np.prod(w.shape[1:])) + (1 if layer.bias is not None else 0)
        out_shape = shapes.get(layer.output.name) or shapes.get(layer.node.outputs[0].name)
        spatial = int(np.prod(out_shape[2:])) if out_shape and layer.op in ("Conv", "ConvTranspose") else 1
        macs += spatial * int(np.prod(w.shape[1:]))
        params += row
        nbytes += row * w.dtype.itemsize
    for consumer in space.consumers:
        w = consumer.layer.get_weight()
        col = w.shape[0] * int(np.prod(w.shape[1:])) // consumer.span(space.channels)[3]
        out_shape = shapes.get(consumer.layer.node.outputs[0].name)
        spatial = int(np.prod(out_shape[2:])) if out_shape and consumer.layer.op == "Conv" else 1
        macs += spatial * col
        params += col
        nbytes += col * w.dtype.itemsize
    return macs, params, nbytes


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
    rows = info["rows"].copy()
    weights = info["weights"]
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
