"""Adaptive weight hashing (RED step 1) and codebook storage.

Hashing: per layer, each output channel is normalised by its max-abs s_c, the normalised values
of all channels are pooled into one Gaussian KDE with bandwidth h = f·Silverman, the density's
minima cut the values into basins, and every value moves to a representative u: RED takes its
basin's mode; here the basins' means are refined by Lloyd's 1-D k-means (the KDE fixes how many
entries and where they start, Lloyd lowers their squared error: bench/scale_study.md). The
hashed weight is fl(u·s_c) (:func:`red_onnx.kde.hash_channels`), exactly what the stored codebook
form computes. Each layer offers the budget, per codebook size (N/8 and N/32 entries with uint16
indices, N weights; 256 with uint8), the smallest bandwidth factor f whose codebook fits it (a
wider one saves almost no more bytes, while the error grows with f); the budget ranks the layers
by their measured deviation and spends on hashing only what the MAC-saving passes left.

Storage (:func:`encode`, the pipeline's last step, exact): a layer whose weight takes at most 256
distinct values per channel scale (65 536 with ``codebook="auto"``) is stored as

    indices (uint8/uint16) → Cast(int32) → Gather(codebook) [→ Mul(per-channel scale)]

in standard ops; onnxruntime folds the chain at session creation, so inference speed is unchanged.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from numba import njit

from ..budget import Candidate
from ..context import Context, PassResult
from ..kde import PooledChannels, hash_channels
from ..layers import Layer, find_layers, unique_name
from ..model_io import to_light_model

NAME = "hash"
#: Bandwidth factors searched (× Silverman's bandwidth of the normalised weights).
FACTOR_RANGE = (1e-4, 4.0)
PRECISION = 1.05  # the factor found is within this ratio of the smallest that fits
MAX_PROBES = 24  # KDE runs per search at most (3 to 5 in practice)
#: Codebook entries allowed per index width, by ``--codebook`` setting.
INDEX_TYPES = {"uint8": ((256, np.uint8),), "auto": ((256, np.uint8), (65536, np.uint16)), "off": ()}
#: per-channel normalisation of the hashed weights (bench/hash_study.md: max-abs gives about 30%
#: less weight error at 256 entries than a power of two, and MobileNetV2 keeps 8 points more top-1)
SCALE = "maxabs"
#: representative (bench/scale_study.md, every layer at 256 entries: Lloyd gives the least weight
#: error and the least output deviation on real inputs on all 4 models studied; MobileNetV2 0.068,
#: against 0.077 for the basin means, 0.111 for RED's modes and 0.073 for uniform int8)
REPRESENTATIVE = "lloyd"
MIN_ELEMENTS = 1024  # smaller weights are not worth a codebook
NODE_OVERHEAD = 512  # bytes the Cast/Gather/Mul nodes and names add to the file, about


def run(ctx: Context) -> PassResult:
    """Hash layer weights with what the budget has left (values only; :func:`encode` stores them)."""
    start = time.perf_counter()
    counts = {"layers_hashed": 0}
    rows = []
    if ctx.budget is not None and ctx.tolerance > 0 and INDEX_TYPES[ctx.codebook]:
        candidates, hashed, codebooks = _propose(ctx)
        if candidates:
            model, arrays = to_light_model(ctx.graph.copy(), ctx.template)
            spent = ctx.budget.spend(model, candidates, lambda chosen: {c.data[0]: hashed[c.key] for c in chosen},
                                     arrays, measured_ranking=True)
            tensors = ctx.graph.tensors()
            for c in spent.accepted:
                name, factor, entries, error, scales, distinct = c.data
                tensors[name].values = hashed[c.key]
                ctx.scale_hints[name] = (scales, codebooks[c.key])  # hashed = fl(codebook[i] · scale)
                rows.append({"name": c.slot.split(":", 1)[1], "bandwidth_factor": factor, "modes": entries,
                             "distinct_before": distinct, "weight_error": round(error, 6)})
            counts["layers_hashed"] = len(spent.accepted)
            counts["deviation_allocated"] = round(spent.deviation_after, 6)
    return PassResult(NAME, counts["layers_hashed"] > 0, counts, rows, time.perf_counter() - start)


def _propose(ctx: Context) -> tuple[list[Candidate], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per layer and codebook size (:func:`_entry_targets`), the smallest bandwidth whose codebook
    fits: a wider bandwidth adds error and saves (almost) no more bytes. The layers are searched in
    threads (the KDE kernels release the GIL); each layer's result does not depend on the others."""
    layers = find_layers(ctx.graph, ctx.exclude)[0]
    with ThreadPoolExecutor(max_workers=max(1, min(len(layers), _cores()))) as pool:
        per_layer = list(pool.map(lambda layer: _layer_candidates(ctx, layer), layers))
    candidates, hashed, codebooks = [], {}, {}
    for found in per_layer:
        for c, values, codebook in found:
            candidates.append(c)
            hashed[c.key], codebooks[c.key] = values, codebook
    return candidates, hashed, codebooks


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _layer_candidates(ctx: Context, layer: Layer) -> list[tuple[Candidate, np.ndarray, np.ndarray]]:
    """One layer's candidates, each with its hashed weight (stored layout) and codebook."""
    w = layer.get_weight()
    if w.size < MIN_ELEMENTS or w.dtype not in (np.float16, np.float32, np.float64):
        return []
    norm = float(np.linalg.norm(w))
    before = len(np.unique(w))
    pooled, counts, out = None, {}, []  # shared by the searches at each limit
    for level, limit in enumerate(_entry_targets(w.size, ctx.codebook)):
        if before <= limit or _split_scales(layer, ctx.scale_hints.get(layer.weight.name), limit):
            continue  # encode stores it at this width as it is (exactly, maybe with channel scales)
        pooled = pooled or PooledChannels(w, True, scale=SCALE)
        found = fitting_hash(w, limit, pooled=pooled, counts=counts)
        if found is None:
            continue
        factor, (values, codebook, scales) = found
        saving = w.nbytes - _encoded_bytes(w, len(codebook), ctx.codebook)
        error = float(np.linalg.norm(values - w)) / norm if norm else 0.0
        c = Candidate(f"hash:{layer.name}:{level}", f"hash:{layer.name}", (0, 0, saving), error, level,
                      (layer.weight.name, factor, len(codebook), error, scales, before))
        out.append((c, layer.stored(values), codebook))
    return out


def _entry_targets(size: int, setting: str) -> list[int]:
    """Codebook sizes worth offering, mild to aggressive: for uint16 indices, the most entries
    (over 256) whose codebook costs at most 1/4 and 1/16 of the indices' bytes (N/8, N/32: the
    first saves a fifth less and, with 4x the entries, has about a quarter of the weight error);
    then 256 for uint8 indices."""
    widths = dict((np.dtype(t).itemsize, n) for n, t in INDEX_TYPES[setting])
    wide = [min(widths[2], size // d) for d in (8, 32)] if 2 in widths else []
    return list(dict.fromkeys(n for n in wide if n > 256)) + ([256] if 1 in widths else [])


def fitting_hash(w: np.ndarray, limit: int, start: float = 0.03, pooled: PooledChannels | None = None,
                 counts: dict[float, int] | None = None):
    """``(factor, hash_channels(w, factor))`` for about the smallest bandwidth factor in
    [FACTOR_RANGE] whose codebook has at most ``limit`` entries (to within a factor PRECISION),
    or None if even the widest does not fit.

    The number of modes n(f) falls as the bandwidth grows, about as 1/f: each probe aims at the
    crossing n = limit, interpolated in log f / log n between the nearest probes that do not fit
    (lo) and that fit (hi), at PRECISION^(±1/2) around it so that one more probe can close the
    bracket, kept inside the middle half of the bracket (so that it shrinks even where n is a
    step function of f). Until both sides are known, each probe moves at least 4x (n can be
    nearly flat in f: values with few duplicates). Probes only count the basins; the weight is
    hashed once, at the factor found. ``pooled`` and ``counts`` (factor → entries, filled in) may
    be shared by the searches of one weight at several limits."""
    f_min, f_max = FACTOR_RANGE
    pooled = pooled or PooledChannels(w, True, scale=SCALE)
    counts = {} if counts is None else counts

    def result(f):
        return f, hash_channels(w, f, per_channel=True, scale=SCALE, reference_bandwidth=pooled.reference,
                                representative=REPRESENTATIVE)

    # largest factor known not to fit, smallest known to fit
    lo = max((f for f, n in counts.items() if n > limit), default=None)
    hi = min((f for f, n in counts.items() if n <= limit), default=None)
    f = None if counts else min(max(start, f_min), f_max)
    for _ in range(MAX_PROBES):
        if f is not None:
            counts[f] = pooled.codebook_size(f)
            if counts[f] <= limit:
                hi = f if hi is None else min(hi, f)
            else:
                lo = f if lo is None else max(lo, f)
        if hi is not None and (hi <= f_min or lo is not None and hi <= lo * PRECISION):
            return result(hi)
        if hi is None and lo >= f_max:
            return None
        if lo is not None and hi is not None:  # log-log interpolation across the bracket
            t = np.log(counts[lo] / limit) / max(np.log(counts[lo] / counts[hi]), 1e-12)
            estimate = lo * (hi / lo) ** t
        elif hi is not None:  # only fitting probes so far: n ∝ 1/f, at least 4x narrower
            estimate = min(hi * counts[hi] / limit, hi / 4)
        else:  # only probes that do not fit: at least 4x wider
            estimate = max(lo * counts[lo] / limit, lo * 4)
        below, above = estimate / PRECISION ** 0.5, estimate * PRECISION ** 0.5
        # just past the crossing, on the side not yet known closely
        f = above if lo is not None and lo >= below else below if hi is not None and hi <= above else above
        if lo is not None and hi is not None:  # inside the middle half of the bracket (in log f)
            f = float(np.clip(f, lo * (hi / lo) ** 0.25, lo * (hi / lo) ** 0.75))
        f = float(min(max(f, f_min), f_max))
        if f in counts:  # no progress: split the bracket, or try the end of the range
            f = float(np.sqrt(lo * hi)) if lo is not None and hi is not None else (f_min if hi is not None else f_max)
    return result(hi) if hi is not None else None


def _encoded_bytes(w: np.ndarray, entries: int, setting: str) -> int:
    width = next(np.dtype(t).itemsize for n, t in INDEX_TYPES[setting] if entries <= n)
    return w.size * width + entries * w.dtype.itemsize + w.shape[0] * w.dtype.itemsize


# ---------------------------------------------------------------------------------------------
# codebook storage


def encode(ctx: Context) -> PassResult:
    """Store every linear layer's weight that has few distinct values as a codebook (exact, bit
    for bit). Shared weights too: storage does not change the values any user sees."""
    start = time.perf_counter()
    rows = []
    if INDEX_TYPES[ctx.codebook]:
        layers = {id(layer.weight): layer for layer in find_layers(ctx.graph, ctx.exclude)[0]}
        weights = {}
        for node in ctx.graph.nodes:
            if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.inputs) > 1 \
                    and isinstance(node.inputs[1], gs.Constant):
                weights.setdefault(id(node.inputs[1]), node.inputs[1])
        if ctx.exclude is not None:  # a weight any excluded node reads stays as it is
            weights = {k: w for k, w in weights.items() if not any(ctx.exclude.search(u.name) for u in w.outputs)}
        for key, weight in weights.items():
            row = _encode_weight(ctx.graph, weight, layers.get(key), ctx.codebook, ctx.scale_hints.get(weight.name))
            if row:
                rows.append(row)
    ctx.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    counts = {"weights_encoded": len(rows), "bytes_saved": sum(r["bytes_before"] - r["bytes_after"] for r in rows)}
    return PassResult("codebook", bool(rows), counts, rows, time.perf_counter() - start)


def _scale_shape(layer: Layer, channels: int, ndim: int) -> tuple[int, ...] | None:
    """Shape of a per-output-channel scale in the op's stored layout, or None."""
    if layer.op == "Conv":
        return (channels,) + (1,) * (ndim - 1)
    if layer.op == "Gemm" and layer.node.attrs.get("transB", 0):
        return (channels, 1)
    if layer.op in ("Gemm", "MatMul"):
        return (1, channels)
    if layer.op == "ConvTranspose" and layer.group == 1:
        return (1, channels) + (1,) * (ndim - 2)
    return None


def _split_scales(layer: Layer, hint, limit: int):
    """(normalised stored weight, scales in stored layout) with normalised · scales == weight
    exactly and at most ``limit`` distinct normalised values; None if no such split is found.

    ``hint``: per-channel scales (folded in by ``fold``), or ``(scales, codebook)`` from ``run``;
    with a codebook each normalised value is snapped to its nearest entry (w/s is not always
    the entry u that gave w = fl(u·s)), and the products are checked bit for bit."""
    view = layer.get_weight()
    shape = _scale_shape(layer, view.shape[0], view.ndim)
    if shape is None:
        return None
    flat = np.ascontiguousarray(view.reshape(view.shape[0], -1))
    scales, codebook = hint if isinstance(hint, tuple) else (hint, None)
    peak = np.max(np.abs(flat), axis=1).astype(np.float64)
    pow2 = np.where(peak > 0, np.ldexp(1.0, np.frexp(peak)[1]), 1.0).astype(view.dtype)
    tries = [(scales, codebook)] if scales is not None and len(scales) == view.shape[0] else []
    for scales, codebook in tries + [(pow2, None)]:
        scales = scales.astype(view.dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            normalised = (flat / np.where(scales != 0, scales, 1)[:, None]).astype(view.dtype)
        if codebook is not None and len(codebook):  # snapped: every value is an entry
            normalised = _snap(normalised, np.sort(codebook.astype(view.dtype)))
            normalised[scales == 0] = codebook[np.argmin(np.abs(codebook))]
            fits = len(codebook) <= limit
        else:
            scales = np.where(scales != 0, scales, 1).astype(view.dtype)
            fits = _distinct_bits(normalised, limit) is not None
        if fits and np.array_equal(_bits(normalised * scales[:, None]), _bits(flat)):
            return layer.stored(normalised.reshape(view.shape)), scales.reshape(shape)
    return None


@njit(cache=True, nogil=True)
def _nearest_entries(values, table, out):
    """out[i] = index of the entry of the sorted ``table`` nearest to values[i] (ties: the lower),
    as searchsorted's right neighbour and its left one compared, but O(1) per value: a bucket
    table over [table[0], table[-1]] gives each value a start a step or two from its place."""
    n = table.size
    lo, hi = float(table[0]), float(table[n - 1])
    buckets = 2 * n
    inv = (buckets - 1) / (hi - lo) if hi > lo else 0.0
    start = np.empty(buckets, np.int64)
    j = 0
    for k in range(buckets):  # first entry at or above the bucket's left end
        while j < n and (float(table[j]) - lo) * inv < k:
            j += 1
        start[k] = j
    for i in range(values.size):
        v = float(values[i])
        if n == 1 or v <= lo:
            out[i] = 0
            continue
        if v >= hi:
            out[i] = n - 1
            continue
        # entries before start[k] have (t - lo) * inv < k <= (v - lo) * inv, hence t < v (monotone)
        j = start[min(int((v - lo) * inv), buckets - 1)]
        while j < n and float(table[j]) < v:
            j += 1
        right = min(max(j, 1), n - 1)
        left = right - 1
        out[i] = left if abs(v - float(table[left])) <= abs(float(table[right]) - v) else right


def _wide(values: np.ndarray) -> np.ndarray:
    """1-D, contiguous, float16 widened to float32 (exactly; numba has no float16)."""
    return np.ascontiguousarray(values, np.float32 if values.dtype == np.float16 else values.dtype).reshape(-1)


def _snap(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Each value replaced by its nearest entry of the sorted ``codebook``."""
    pick = np.empty(values.size, np.int64)
    _nearest_entries(_wide(values), _wide(codebook), pick)
    return codebook[pick].reshape(values.shape)


def _indices(stored: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Position of each stored value's bit pattern in ``bits`` (sorted distinct patterns of them):
    looked up by value, then by pattern where the value is ambiguous (-0.0 and +0.0)."""
    codebook = bits.view(stored.dtype)
    order = np.argsort(codebook, kind="stable")
    idx = np.empty(stored.size, np.int64)
    _nearest_entries(_wide(stored), _wide(codebook[order]), idx)
    idx = order[idx]
    query = _bits(np.ascontiguousarray(stored)).reshape(-1)
    wrong = np.flatnonzero(bits[idx] != query)
    idx[wrong] = np.searchsorted(bits, query[wrong])
    return idx.reshape(stored.shape)


def _bits(values: np.ndarray) -> np.ndarray:
    """The values' bit patterns (so that -0.0 and +0.0 stay distinct, bit for bit)."""
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


def _distinct_bits(values: np.ndarray, limit: int | None = None) -> np.ndarray | None:
    """Sorted distinct bit patterns (a sort: np.unique on large integer arrays was ~100x slower);
    None if there are more than ``limit`` (found on a prefix where it can be: a shorter sort)."""
    b = _bits(np.ascontiguousarray(values)).reshape(-1)
    if limit is not None and b.size > 8 * limit and _distinct_bits(b[:8 * limit]).size > limit:
        return None
    b = np.sort(b)
    b = b[np.concatenate(([True], b[1:] != b[:-1]))] if b.size else b
    return None if limit is not None and b.size > limit else b


def _encode_weight(graph: gs.Graph, constant: gs.Constant, layer: Layer | None, setting: str,
                   hint) -> dict | None:
    stored = constant.values
    if stored.size < MIN_ELEMENTS or stored.dtype not in (np.float16, np.float32, np.float64):
        return None
    widest = INDEX_TYPES[setting][-1][0]
    raw = _distinct_bits(stored, widest)
    for limit, _ in INDEX_TYPES[setting]:  # the narrowest index that fits, then the smaller codebook
        options = [(raw, stored, None)] if raw is not None and len(raw) <= limit else []
        split = _split_scales(layer, hint, limit) if layer is not None else None
        if split is not None:
            options.append((_distinct_bits(split[0]), *split))
        if options:
            bits, stored, scales = min(options, key=lambda o: len(o[0]) + (o[2].size if o[2] is not None else 0))
            break
    else:
        return None
    codebook = bits.view(stored.dtype)
    index_type = next(t for n, t in INDEX_TYPES[setting] if len(codebook) <= n)
    indices = _indices(stored, bits).astype(index_type)
    before = constant.values.nbytes
    after = indices.nbytes + codebook.nbytes + (scales.nbytes if scales is not None else 0)
    if after + NODE_OVERHEAD >= before:
        return None
    name = constant.name
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    new = {part: unique_name(f"{name}_{part}", taken)
           for part in ("indices", "indices_int32", "codebook", "gathered", "scales", "decoded")}
    idx32 = gs.Variable(new["indices_int32"], dtype=np.int32)
    nodes = [gs.Node("Cast", unique_name(f"{name}_cast", taken), {"to": onnx.TensorProto.INT32},
                     [gs.Constant(new["indices"], indices)], [idx32])]
    book = gs.Constant(new["codebook"], codebook)
    decoded = gs.Variable(new["decoded"], dtype=stored.dtype)
    gather = unique_name(f"{name}_gather", taken)
    if scales is None:
        nodes.append(gs.Node("Gather", gather, {"axis": 0}, [book, idx32], [decoded]))
    else:
        gathered = gs.Variable(new["gathered"], dtype=stored.dtype)
        nodes += [gs.Node("Gather", gather, {"axis": 0}, [book, idx32], [gathered]),
                  gs.Node("Mul", unique_name(f"{name}_scale", taken),
                          inputs=[gathered, gs.Constant(new["scales"], scales)], outputs=[decoded])]
    for user in list(constant.outputs):
        user.inputs = [decoded if t is constant else t for t in user.inputs]
    graph.nodes.extend(nodes)
    return {"name": name, "codebook_entries": int(len(codebook)), "index": np.dtype(index_type).name,
            "per_channel_scale": scales is not None, "shared_by": len(nodes[-1].outputs[0].outputs),
            "bytes_before": int(before), "bytes_after": int(after)}
