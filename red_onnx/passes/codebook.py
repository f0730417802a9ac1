"""Codebook storage (always runs, last, exact): a weight (a linear layer's, a recurrent node's, an
embedding table, or one several nodes share) that takes at most 256 distinct values per channel
scale (65 536 with ``codebook="auto"``) is stored as

    indices (uint8/uint16) → Cast(int32) → Gather(codebook) [→ Mul(per-channel scale)]

in standard ops; onnxruntime folds the chain at session creation, so inference speed is unchanged.
A float16 weight with scales is decoded in float32 and Cast to float16 (onnxruntime's CPU provider
has no float16 Mul, so it could not fold the chain and decoded it on every run: a UNet 1.6x slower).
Weights become few-valued by hashing (:mod:`red_onnx.passes.hash`) or were so already.

A float32 or float64 weight whose every value is a float16 value (rounded so by hashing's float16
level, or so already) and that no codebook stores in fewer bytes is stored as float16 → Cast(its
type): half the bytes (a quarter of float64's), exact, and folded at session creation too.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from numba import njit

from ..context import Context, PassResult
from ..layers import (LINEAR_OPS, RECURRENT_OPS, Layer, SharedWeight, hashable_weights, taken_names,
                      unique_name)

NAME = "codebook"
#: Codebook entries allowed per index width, by ``--codebook`` setting.
INDEX_TYPES = {"uint8": ((256, np.uint8),), "auto": ((256, np.uint8), (65536, np.uint16)), "off": ()}
MIN_ELEMENTS = 1024  # smaller weights are not worth a codebook
NODE_OVERHEAD = 512  # bytes the Cast/Gather/Mul nodes and names add to the file, about
#: a float16 stored weight's sample checked before all its values (most float32 weights fail there)
HALF_SAMPLE = 4096


def run(ctx: Context) -> PassResult:
    """Store every weight that has few distinct values as a codebook (exact, bit for bit). Shared
    weights and embedding tables too: storage does not change the values any user sees."""
    start = time.perf_counter()
    result = PassResult(NAME)
    rows = result.layers
    if INDEX_TYPES[ctx.codebook]:
        layers = {id(layer.weight): layer for layer in hashable_weights(ctx.graph, ctx.exclude)}
        weights = {}
        for node in ctx.graph.nodes:
            if node.op in LINEAR_OPS and len(node.inputs) > 1 \
                    and isinstance(node.inputs[1], gs.Constant):
                weights.setdefault(id(node.inputs[1]), node.inputs[1])
        weights.update({key: layer.weight for key, layer in layers.items()})
        if ctx.exclude is not None:  # a weight any excluded node reads stays as it is
            weights = {k: w for k, w in weights.items() if not any(ctx.exclude.search(u.name) for u in w.outputs)}
        for key, weight in weights.items():
            hint = ctx.hashed.get(weight.name) or (ctx.fold_scales.get(weight.name), None)
            row = _encode_weight(ctx, weight, layers.get(key), hint)
            if isinstance(row, str):
                result.leave(layers[key].name if key in layers else weight.name, row)
            else:
                rows.append(row)
    ctx.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result.counts = {"weights_encoded": len(rows), "bytes_saved": sum(r["bytes_before"] - r["bytes_after"] for r in rows)}
    result.modified = bool(rows)
    result.seconds = time.perf_counter() - start
    return result


def _scale_shape(layer: Layer, channels: int, ndim: int) -> tuple[int, ...] | None:
    """Shape of a per-output-channel scale in the op's stored layout, or None."""
    if isinstance(layer, SharedWeight):  # rows along the first axis
        return (channels,) + (1,) * (layer.weight.values.ndim - 1)
    if layer.op == "Conv":
        return (channels,) + (1,) * (ndim - 1)
    if layer.op == "Gemm" and layer.node.attrs.get("transB", 0):
        return (channels, 1)
    if layer.op in ("Gemm", "MatMul"):
        return (1, channels)
    if layer.op == "ConvTranspose" and layer.group == 1:
        return (1, channels) + (1,) * (ndim - 2)
    if layer.op in RECURRENT_OPS:  # rows of (directions, gates·H, I or H)
        return layer.weight.values.shape[:2] + (1,)
    return None


def split_scales(layer: Layer, hint: tuple[np.ndarray | None, np.ndarray | None], limit: int):
    """(normalised stored weight, scales in stored layout) with normalised · scales == weight
    exactly and at most ``limit`` distinct normalised values; None if no such split is found.

    ``hint``: ``(scales, None)`` with the per-channel scales fold multiplied in, or ``(scales,
    codebook)`` from ``hash``;
    with a codebook each normalised value is snapped to its nearest entry (w/s is not always
    the entry u that gave w = fl(u·s)), and the products are checked bit for bit."""
    view = layer.get_weight()
    shape = _scale_shape(layer, view.shape[0], view.ndim)
    if shape is None:
        return None
    flat = np.ascontiguousarray(view.reshape(view.shape[0], -1))
    scales, codebook = hint
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
            fits = distinct_bits(normalised, limit) is not None
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


def distinct_bits(values: np.ndarray, limit: int | None = None) -> np.ndarray | None:
    """Sorted distinct bit patterns (a sort: np.unique on large integer arrays was ~100x slower);
    None if there are more than ``limit``. A large array is first sampled across its length: more
    than ``limit`` there, or (the common case) every value among the sample's, found in one pass."""
    b = _bits(np.ascontiguousarray(values)).reshape(-1)
    sample = 8 * (limit or 4096)
    if b.size > sample and values.dtype.kind == "f":
        head = distinct_bits(b[::b.size // sample][:sample])  # a sample across all channels: more than the limit, or likely all
        if limit is not None and head.size > limit:
            return None
        table = head.view(values.dtype)
        if np.isfinite(table).all():  # every value one of them? found in O(n), without sorting n values
            order = np.argsort(table, kind="stable")
            pick = np.empty(b.size, np.int64)
            _nearest_entries(_wide(b.view(values.dtype)), _wide(table[order]), pick)
            if np.array_equal(head[order][pick], b):
                return head
    b = np.sort(b)
    b = b[np.concatenate(([True], b[1:] != b[:-1]))] if b.size else b
    return None if limit is not None and b.size > limit else b


def _encode_weight(ctx: Context, constant: gs.Constant, layer: Layer | None,
                   hint: tuple[np.ndarray | None, np.ndarray | None]) -> dict | str:
    """Replace ``constant`` by its codebook form; returns the report row, or why it stays plain."""
    stored = constant.values
    if stored.size < MIN_ELEMENTS:
        return f"{stored.size} weights, under the {MIN_ELEMENTS} worth a codebook"
    if stored.dtype not in (np.float16, np.float32, np.float64):
        return f"{stored.dtype} weights"
    layout = repr((ctx.codebook, [h is None for h in hint], layer and (
        type(layer).__name__, layer.op, layer.group, layer.node.attrs.get("transB", 0))))
    form = ctx.memoized("codebook form " + layout, [stored] + [h for h in hint if h is not None],
                        lambda: _codebook_form(stored, layer, ctx.codebook, hint))
    before = stored.nbytes
    half = stored.dtype != np.float16 and half_exact(stored)
    if isinstance(form, str):
        return _store_half(ctx, constant) if half else form
    codebook, indices, scales = form
    widened = scales is not None and codebook.dtype == np.float16
    if widened:  # onnxruntime CPU has no float16 Mul to fold at session creation: decode in float32, then
        codebook, scales = codebook.astype(np.float32), scales.astype(np.float32)  # Cast (exact: see below)
    after = indices.nbytes + codebook.nbytes + (scales.nbytes if scales is not None else 0)
    if half and stored.size * 2 < after:
        return _store_half(ctx, constant)
    if after + NODE_OVERHEAD >= before:
        return "a codebook would not make it smaller"
    graph, name = ctx.graph, constant.name
    taken = taken_names(graph)
    new = {part: unique_name(f"{name}_{part}", taken)
           for part in ("indices", "indices_int32", "codebook", "gathered", "scales", "decoded")}
    idx32 = gs.Variable(new["indices_int32"], dtype=np.int32)
    nodes = [gs.Node("Cast", unique_name(f"{name}_cast", taken), {"to": onnx.TensorProto.INT32},
                     [gs.Constant(new["indices"], indices)], [idx32])]
    book = gs.Constant(new["codebook"], codebook)
    decoded = gs.Variable(new["decoded"], dtype=codebook.dtype)
    gather = unique_name(f"{name}_gather", taken)
    if scales is None:
        nodes.append(gs.Node("Gather", gather, {"axis": 0}, [book, idx32], [decoded]))
    else:
        gathered = gs.Variable(new["gathered"], dtype=codebook.dtype)
        nodes += [gs.Node("Gather", gather, {"axis": 0}, [book, idx32], [gathered]),
                  gs.Node("Mul", unique_name(f"{name}_scale", taken),
                          inputs=[gathered, gs.Constant(new["scales"], scales)], outputs=[decoded])]
    if widened:  # a product of two float16 values is exact in float32, so one rounding: float16's own Mul
        narrowed = gs.Variable(unique_name(f"{name}_decoded16", taken), dtype=np.float16)
        nodes.append(gs.Node("Cast", unique_name(f"{name}_cast16", taken), {"to": onnx.TensorProto.FLOAT16},
                             [decoded], [narrowed]))
        decoded = narrowed
    for user in list(constant.outputs):
        user.inputs = [decoded if t is constant else t for t in user.inputs]
    graph.nodes.extend(nodes)
    return {"name": name, "form": "codebook", "codebook_entries": int(len(codebook)), "index": indices.dtype.name,
            "per_channel_scale": scales is not None, "shared_by": len(nodes[-1].outputs[0].outputs),
            "bytes_before": int(before), "bytes_after": int(after)}


def half_exact(values: np.ndarray) -> bool:
    """Whether every value is a float16 value (bit for bit once widened back: -0.0 stays -0.0)."""
    flat = values.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        for sample in (flat[::max(1, flat.size // HALF_SAMPLE)], flat):
            if not np.array_equal(_bits(sample.astype(np.float16).astype(values.dtype)), _bits(sample)):
                return False
    return True


def _store_half(ctx: Context, constant: gs.Constant) -> dict | str:
    """Replace ``constant`` (float16 values in float32 or float64) by float16 → Cast."""
    stored = constant.values
    before, after = stored.nbytes, stored.size * 2
    if after + NODE_OVERHEAD >= before:
        return "float16 storage would not make it smaller"
    taken = taken_names(ctx.graph)
    name = constant.name
    decoded = gs.Variable(unique_name(f"{name}_decoded", taken), dtype=stored.dtype)
    half = gs.Constant(unique_name(f"{name}_float16", taken), stored.astype(np.float16))
    cast = gs.Node("Cast", unique_name(f"{name}_cast", taken),
                   {"to": onnx.helper.np_dtype_to_tensor_dtype(stored.dtype)}, [half], [decoded])
    for user in list(constant.outputs):
        user.inputs = [decoded if t is constant else t for t in user.inputs]
    ctx.graph.nodes.append(cast)
    return {"name": name, "form": "float16", "codebook_entries": None, "index": None, "per_channel_scale": False,
            "shared_by": len(decoded.outputs), "bytes_before": int(before), "bytes_after": int(after)}


def _codebook_form(stored: np.ndarray, layer: Layer | None, setting: str,
                   hint: tuple[np.ndarray | None, np.ndarray | None]) -> tuple | str:
    """(codebook, indices, per-channel scales or None) with ``codebook[indices] · scales ==
    stored`` bit for bit and the narrowest index type of ``setting``; or why there is none."""
    widest = INDEX_TYPES[setting][-1][0]
    raw = distinct_bits(stored, widest)
    for limit, _ in INDEX_TYPES[setting]:  # the narrowest index that fits, then the smaller codebook
        options = [(raw, stored, None)] if raw is not None and len(raw) <= limit else []
        split = split_scales(layer, hint, limit) if layer is not None else None
        if split is not None:
            options.append((distinct_bits(split[0]), *split))
        if options:
            bits, stored, scales = min(options, key=lambda o: len(o[0]) + (o[2].size if o[2] is not None else 0))
            break
    else:
        return f"more than {widest} distinct values (per channel scale)"
    codebook = bits.view(stored.dtype)
    index_type = next(t for n, t in INDEX_TYPES[setting] if len(codebook) <= n)
    return codebook, _indices(stored, bits).astype(index_type), scales
