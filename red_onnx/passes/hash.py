"""Adaptive weight hashing (RED step 1).

Hashing: per layer, each output channel is normalised by its max-abs s_c, the normalised values
of all channels are pooled into one Gaussian KDE with bandwidth h = f·Silverman, the density's
minima cut the values into basins, and every value moves to a representative u: RED takes its
basin's mode; here the basins' means are refined by Lloyd's 1-D k-means (the KDE fixes how many
entries and where they start, Lloyd lowers their squared error: bench/scale_study.md). The
hashed weight is fl(u·s_c) (:func:`red_onnx.kde.hash_channels`), exactly what the stored codebook
form computes. Each layer offers the budget, per codebook size (N/8 and N/32 entries with uint16
indices, N weights; 256 with uint8), the smallest bandwidth factor f whose codebook fits it (a
wider one saves almost no more bytes, while the error grows with f), and below them its values
rounded to float16 (half the bytes; a relative weight error near 2⁻¹², where 256 entries give
about 10⁻²: the level a layer too sensitive for any codebook can take); the budget ranks the layers
by their measured deviation and spends on hashing only what the MAC-saving passes left. The
hashed values are stored as codebooks, or as float16, by :mod:`red_onnx.passes.codebook`.
Weights that no layer owns are hashed the same way, row by row: an LSTM's, GRU's or RNN's W and
R, embedding tables, and weights several nodes share (:class:`red_onnx.layers.SharedWeight`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from .. import kde
from ..budget import Candidate
from ..context import Context, PassResult
from ..kde import PooledChannels, hash_channels
from ..layers import Layer, hashable_weights
from ..profile import digest
from .codebook import INDEX_TYPES, MIN_ELEMENTS, _snap, distinct_bits, half_exact, split_scales

NAME = "hash"
#: Bandwidth factors searched (× Silverman's bandwidth of the normalised weights).
FACTOR_RANGE = (1e-4, 4.0)
PRECISION = 1.05  # the factor found is within this ratio of the smallest that fits
MAX_PROBES = 24  # KDE runs per search at most (3 to 5 in practice)
#: a weight of at least this many values has its distinct values counted in a thread of its own
THREADED_COUNT = 2**22
#: the largest finite float16 value: a weight with a larger one is not offered float16 values
HALF_MAX = float(np.finfo(np.float16).max)
#: hashed weights kept for the later builds of a call (other tolerances), in bytes at most
MEMO_BYTES = 2**29
#: per-channel normalisation of the hashed weights (bench/hash_study.md: max-abs gives about 30%
#: less weight error at 256 entries than a power of two, and MobileNetV2 keeps 8 points more top-1)
SCALE = "maxabs"
#: representative (bench/scale_study.md, every layer at 256 entries: Lloyd gives the least weight
#: error and the least output deviation on real inputs on all 4 models studied; MobileNetV2 0.068,
#: against 0.077 for the basin means, 0.111 for RED's modes and 0.073 for uniform int8)
REPRESENTATIVE = "lloyd"


def start_warm_up() -> None:
    """Load, in a thread of its own, the compiled kernels that hashing and codebook storage of a
    float32 weight run: numba reads them from its cache on their first call in a process, 0.4 to
    0.6 s on this 2-core machine, which a caller would otherwise wait for in its first hash pass.
    Started where the caller then waits on onnxruntime (which releases the GIL). Once per process."""
    if not _warmed.acquire(blocking=False):
        return
    threading.Thread(target=_warm_up, name="red_onnx kernels", daemon=False).start()


_warmed = threading.Lock()


def _warm_up() -> None:
    try:
        w = np.random.default_rng(0).standard_normal((64, 32, 3, 3)).astype(np.float32)
        fitting_hash(w, 256)
        kde._convolve_direct(np.zeros(8), np.ones(3), 1)  # the sparse lattice's convolution
        _snap(np.zeros(4, np.float32), np.arange(2, dtype=np.float32))  # codebook storage's lookup
    except Exception:  # nothing lost: a kernel not loaded here is loaded on its first call
        pass


def run(ctx: Context) -> PassResult:
    """Hash layer weights with what the budget has left (values only; the codebook pass stores them)."""
    start = time.perf_counter()
    result = PassResult(NAME, counts={"layers_hashed": 0})
    if ctx.lossy and INDEX_TYPES[ctx.codebook]:  # with --codebook off, hashed values would save nothing
        candidates, hashed, codebooks = _propose(ctx, result)
        if candidates:
            spent = ctx.spend(candidates, lambda chosen: {c.data[0]: hashed[c.key] for c in chosen},
                              per_level=False)
            for c in spent.accepted:
                name, factor, entries, error, scales, distinct = c.data
                if entries is not None:  # else rounded to float16, which codebook stores as float16
                    ctx.hashed[name] = (scales, codebooks[c.key])  # hashed = fl(codebook[i] · scale)
                result.layers.append({"name": c.slot.split(":", 1)[1], "form": "codebook" if entries is not None else "float16",
                                      "bandwidth_factor": factor, "modes": entries, "distinct_before": distinct(),
                                      "weight_error": round(error, 6)})
            result.counts["layers_hashed"] = len(spent.accepted)
            result.counts["deviation_allocated"] = round(spent.deviation_after, 6)
    result.modified = result.counts["layers_hashed"] > 0
    result.seconds = time.perf_counter() - start
    return result


def _propose(ctx: Context, result: PassResult | None = None
             ) -> tuple[list[Candidate], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per layer and codebook size (:func:`_entry_targets`), the smallest bandwidth whose codebook
    fits: a wider bandwidth adds error and saves (almost) no more bytes. The layers are searched in
    threads (the KDE kernels release the GIL); each layer's result does not depend on the others."""
    layers = hashable_weights(ctx.graph, ctx.exclude)
    done = []

    def search(layer: Layer):
        w = layer.get_weight()
        key = f"hash candidates {layer.name} {layer.weight.name} {ctx.codebook} {digest(w)}"
        found = ctx.memo.get(key)
        if found is None:
            found = _layer_candidates(ctx, layer)
            if sum(v.nbytes for _, v, _ in found) + ctx.memo.get("hash bytes", 0) <= MEMO_BYTES:
                ctx.memo[key] = found  # a later build of this call hashing the same values reuses them
                ctx.memo["hash bytes"] = ctx.memo.get("hash bytes", 0) + sum(v.nbytes for _, v, _ in found)
        done.append(layer)
        ctx.progress("bandwidth searches, layers", len(done), len(layers))
        return found

    with ThreadPoolExecutor(max_workers=max(1, min(len(layers), _cores()))) as pool:
        per_layer = list(pool.map(search, layers))
    candidates, hashed, codebooks = [], {}, {}
    for layer, found in zip(layers, per_layer):
        if not found and result is not None:
            result.leave(layer.name, _why_not_hashed(ctx, layer))
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
    limits = _entry_targets(w.size, ctx.codebook)
    few = distinct_bits(w, max(limits, default=0))  # the distinct values, where no more than a codebook holds
    distinct = _distinct_count(w) if few is None else (lambda: len(few))
    # the codebook sizes found at each factor, shared by the searches at each limit, and by the
    # later builds of this call that hash the same values (their searches then start bracketed)
    counts = ctx.memo.setdefault(f"hash counts {digest(w)}", {})
    pooled, found, storable = None, {}, False
    for level, limit in enumerate(limits):
        fold_scales = (ctx.fold_scales.get(layer.weight.name), None)
        if few is not None and len(few) <= limit or split_scales(layer, fold_scales, limit):
            storable = True  # encode stores it at this width as it is (exactly, maybe with channel scales)
            continue
        pooled = pooled or PooledChannels(w, True, scale=SCALE)
        found[level] = fitting_hash(w, limit, pooled=pooled, counts=counts)
    out = []
    if not storable and w.dtype != np.float16 and np.isfinite(w).all() \
            and float(np.abs(w).max(initial=0)) <= HALF_MAX and not half_exact(w):
        # the mildest level: every value rounded to float16 (stored in half the bytes)
        values = w.astype(np.float16).astype(w.dtype)
        error = float(np.linalg.norm(values - w)) / norm if norm else 0.0
        c = Candidate(f"hash:{layer.name}:half", f"hash:{layer.name}", (0, 0, w.nbytes - w.size * 2), error, 0,
                      (layer.weight.name, None, None, error, None, distinct))
        out.append((c, layer.stored(values), np.empty(0, w.dtype)))  # no codebook
    for level, hashed in found.items():
        if hashed is None:
            continue
        factor, (values, codebook, scales) = hashed
        saving = w.nbytes - _encoded_bytes(w, len(codebook), ctx.codebook)
        error = float(np.linalg.norm(values - w)) / norm if norm else 0.0
        c = Candidate(f"hash:{layer.name}:{level}", f"hash:{layer.name}", (0, 0, saving), error, level + 1,
                      (layer.weight.name, factor, len(codebook), error, scales, distinct))
        out.append((c, layer.stored(values), codebook))
    return out


def _distinct_count(w: np.ndarray) -> Callable[[], int]:
    """A function returning ``len(np.unique(w))``; for a large weight counted in a thread (a sort,
    which releases the GIL) while the caller searches bandwidths: VGG-11's 25.7 M classifier
    weights take 1.25 s to count and 2.5 s to search, on a 2-core machine whose other core hashes
    the other layers in 1.4 s."""
    if w.size < THREADED_COUNT:
        return functools.cache(lambda: len(np.unique(w)))
    pool = ThreadPoolExecutor(1)
    counted = pool.submit(lambda: len(np.unique(w)))
    pool.shutdown(wait=False)
    return counted.result


def _why_not_hashed(ctx: Context, layer: Layer) -> str:
    w = layer.weight.values
    if w.size < MIN_ELEMENTS:
        return f"{w.size} weights, under the {MIN_ELEMENTS} worth a codebook"
    if w.dtype not in (np.float16, np.float32, np.float64):
        return f"{w.dtype} weights"
    return "already few-valued enough for its codebook, or no bandwidth fits one"


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
        return f, hash_channels(w, f, per_channel=True, scale=SCALE, pooled=pooled, representative=REPRESENTATIVE)

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
    """Bytes of ``w`` stored with a codebook of ``entries`` and per-channel scales."""
    width = next(np.dtype(t).itemsize for n, t in INDEX_TYPES[setting] if entries <= n)
    return w.size * width + entries * w.dtype.itemsize + w.shape[0] * w.dtype.itemsize
