"""Adaptive weight hashing by Gaussian kernel density estimation (RED, NeurIPS 2021).

Math.  For values ``x_1..x_n`` and bandwidth ``h`` the KDE is
``f(t) = 1/(n h) sum_i phi((t - x_i) / h)`` (``phi`` the standard normal pdf).
It is computed on a lattice ``t_k = t_0 + k*D``:

  1. linear binning: ``x`` at lattice position ``p = (x - t_0)/D``, ``k = floor(p)``,
     adds ``1 - (p - k)`` to ``c_k`` and ``p - k`` to ``c_{k+1}`` (in exact 2**-30 fixed point,
     so the result does not depend on the order of the values);
  2. discrete convolution ``f_k ∝ sum_j c_{k-j} g_j`` with the Gaussian sampled at
     ``j*D``, truncated at ``|j*D| <= T*h`` (``T = TRUNCATION = 5``; ``g_R / g_0 = 3.7e-6``).
     Direct (numba: skipping empty bins where fewer than 1 in 5 are non-empty, else one tap at
     a time over cache-sized tiles, vectorized, about 5x faster per product) when its cost in
     products of the sparse loop, ``min(nnz(c), size/5) * (2R+1)``, is at most
     ``2 * nfft * log2(nfft)``; numpy FFT otherwise (crossover measured by
     ``bench/kde_speed.py``). With the default lattice the kernel has 41 taps: direct.

Default lattice: ``D = min(h/4, range/1024)``, covering ``[min - T*h, max + T*h]`` but at most
``MAX_PAD`` steps beyond the values (further out the density is monotone: no extrema).  When
that exceeds ``MAX_GRID`` points (heavy tails: range >> h) the lattice is kept *sparse*: the
sorted values are cut into clusters wherever the truncated density is exactly zero between
them (``floor(p_{i+1}) - ceil(p_i) >= 2R + 2``); a cluster of one distinct value is a basin of
its own (its peak is the value), the others get lattice segments — same lattice, same result
as the dense one.  Only if even that exceeds ``MAX_GRID`` (or ``range / D > 2**50``) is ``D``
enlarged (graceful coarsening: isolated values still hash to themselves).  ``h >= 2*range``:
the KDE is concave over the values, hence unimodal: one basin (peak computed with
``h <= 64*range``, beyond which the lattice density is flat to rounding).

Extrema.  A maximal run of equal lattice values (a plateau) is one extremum, located at the
run's centre (so it may sit on a half step); a run is a maximum if both neighbouring runs
are lower, a minimum if both are higher, and outside the lattice counts as ``-inf`` (so
the lattice ends are never edges).  Maxima are density *peaks*; a single-point peak is
refined by a 3-point parabola through ``log f`` (exact for a Gaussian bump, ``|shift| < D/2``).
Minima are basin *edges*; a run of exact zeros between two groups of values (the kernel is
truncated) is an edge at its centre.  Basin ``k`` is ``[edges[k-1], edges[k])``.

Representative ("mode value") of a basin: **the member value nearest to the basin's density
peak** (``|x - peak|`` in float64, ties: the smaller value).  Hence a basin holding one distinct
value maps to that exact value (``h -> 0`` is the identity), the codebook is a subset of the
input values (exact in any float dtype, no rounding of a computed mean), and it is within the
lattice resolution of the KDE mode whenever the basin has a member near its peak.  Basins
without members (when ``h`` is about the spacing of the values a maximum can fall in a gap)
are absorbed: between two consecutive non-empty basins only the deepest edge (lowest
density, leftmost on ties) is kept.

``representative="mean"`` replaces that by the basin's mean, ``mode + mean(x - mode)`` in
float64 rounded to the dtype: the same basins (the same number of distinct values, the same
duplicates), the least squared error for them (one Lloyd step from the KDE's partition); a
basin of one distinct value still keeps it exactly.

``representative="lloyd"`` starts from those means and runs Lloyd's algorithm (1-D k-means):
each value to its nearest centre (cells cut at the midpoints), each centre to its cell's mean,
until the cells stop changing (at most ``LLOYD_STEPS`` steps; on the sorted values with prefix
sums a step costs O(log n) per cut next to a centre that moved).  The KDE fixes the number of
entries and where they start; Lloyd moves them to a local minimum of the squared error (at most
as many entries, never more error than the means of the KDE's basins).  Final means are ``first
member + mean(x - first member)`` in float64, so a cell of one distinct value keeps it exactly.

Speed (one core): min/max (numpy), binning (numba), then one numba pass that finds every
value's basin from a table over half-step sub-cells (one edge comparison only in sub-cells
within rounding of an edge) and the members nearest to the peaks (only for values in the
few sub-cells that can hold them), then a gather of the representatives.  Sparse lattices
(heavy tails) sort the values once and use binary search instead.  A bandwidth search only
needs the number of non-empty basins: :class:`PooledChannels` sorts the values once and counts
them from the edges by binary search, without labelling every value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

__all__ = [
    "TRUNCATION",
    "STEP_FRACTION",
    "MAX_GRID",
    "MIN_STEPS",
    "MAX_PAD",
    "Basins",
    "kde_density",
    "kde_basins",
    "basins",
    "hash_values",
    "hash_channels",
    "PooledChannels",
    "silverman_bandwidth",
    "scott_bandwidth",
]

#: kernel support radius, in bandwidths
TRUNCATION = 5.0
#: default lattice step, in bandwidths
STEP_FRACTION = 0.25
#: most lattice points (dense, or in all sparse segments together): ~100 MB of work arrays at most
MAX_GRID = 1 << 22
#: the default lattice has at least this many steps across the values' range (peak resolution)
MIN_STEPS = 1024
#: the lattice extends at most this many steps beyond the values (the kernel may reach further)
MAX_PAD = 4096
#: fixed-point unit of the binned weights (exact, order-independent sums)
ONE = 1 << 30
#: h >= 2 * range: one basin, its peak computed with h capped at this many ranges
UNIMODAL_CAP = 64.0
#: smallest lattice step (its inverse is finite)
_MIN_STEP = 2.0**-1000
#: lattice positions stay below this so that they are exact in float64 / int64
_MAX_POSITION = float(2**50)
#: FFT convolution when min(nnz, size / _SPARSE_RATIO) * taps > _FFT_RATIO * nfft * log2(nfft)
#: (the direct loops' cost in products of the sparse loop; measured: bench/kde_speed.py)
_FFT_RATIO = 2.0
#: FFT output below this fraction of its maximum is rounding noise: set to 0
_FFT_FLOOR = 1e-12
#: the direct convolution skips empty bins where fewer than 1 in _SPARSE_RATIO are non-empty; else
#: the vectorized tap loop runs, about that much faster per product (4-7x measured, one core)
_SPARSE_RATIO = 5
_TILE = 2048  # outputs per tile of the tap loop (a tile and its inputs stay in cache)


class Basins(NamedTuple):
    """Basins of attraction of the KDE's modes (all float64, increasing)."""

    modes: np.ndarray  #: (B,) representative of each basin (a member value)
    edges: np.ndarray  #: (B-1,) boundaries; basin k = [edges[k-1], edges[k])
    peaks: np.ndarray  #: (B,) density-peak location: plateau centre, log-parabola refined (isolated value: itself)
    counts: np.ndarray  #: (B,) number of values in each basin (int64)
    step: float  #: lattice step D, the resolution of peaks and edges


class _Lattice(NamedTuple):
    origin: float
    step: float
    R: int  # kernel half-width in lattice steps
    size: int  # dense: number of points; sparse: -1
    # sparse only
    u: np.ndarray | None = None  # sorted distinct values, float64
    ucount: np.ndarray | None = None  # their multiplicities
    cstart: np.ndarray | None = None  # cluster c = u[cstart[c]:cstart[c+1]]
    mat: np.ndarray | None = None  # clusters that get a lattice segment


# ----------------------------------------------------------------------------------------
# numba kernels


@njit(cache=True, nogil=True)
def _bin_dense(x, origin, inv_step, w, clamp):
    """Linear binning of unit weights: c_k += 1-(p-k), c_{k+1} += p-k, p = (x-t_0)/D.

    Weights are fixed point (``ONE = 2**30`` per value, int64): the sums are exact, so the
    result does not depend on the order of the values, and equals ``_bin_sparse``'s.
    ``clamp`` False: the caller checked ``0 <= p < w.size - 1`` at min(x) and max(x) (p is
    monotone in x), so no per-value bounds checks.
    """
    if not clamp:
        for i in range(x.size):
            p = (x[i] - origin) * inv_step
            k = int(p)
            f = np.int64((p - k) * ONE)
            w[k] += ONE - f
            w[k + 1] += f
        return
    top = w.size - 2
    for i in range(x.size):
        p = min(max((x[i] - origin) * inv_step, 0.0), top + 1.0)
        k = min(int(p), top)
        f = np.int64(min(p - k, 1.0) * ONE)
        w[k] += ONE - f
        w[k + 1] += f


@njit(cache=True, nogil=True)
def _bin_sparse(u, ucount, origin, inv_step, cstart, mat, seg_off, seg_lat, w):
    """Linear binning of the distinct values (weights = multiplicities) into the segments."""
    s = 0
    for c in range(cstart.size - 1):
        if not mat[c]:
            continue
        base = seg_off[s] - seg_lat[s]
        for i in range(cstart[c], cstart[c + 1]):
            p = (u[i] - origin) * inv_step
            k = math.floor(p)
            f = np.int64((p - k) * ONE)
            j = base + np.int64(k)
            n = np.int64(ucount[i])
            w[j] += n * (ONE - f)
            w[j + 1] += n * f
        s += 1


@njit(cache=True, nogil=True)
def _convolve_direct(w, g, R):
    """out_i = sum_j w_j g_{i-j+R}, |i-j| <= R, skipping empty bins (exact zeros stay zero)."""
    M = w.size
    out = np.zeros(M)
    for j in range(M):
        c = w[j]
        if c == 0.0:
            continue
        lo = j - R
        if lo < 0:
            lo = 0
        hi = j + R
        if hi > M - 1:
            hi = M - 1
        for i in range(lo, hi + 1):
            out[i] += c * g[i - j + R]
    return out


@njit(cache=True, nogil=True)
def _convolve_taps(w, g, R):
    """:func:`_convolve_direct` for mostly non-empty bins, bit for bit: every out_i adds the same
    products in the same order (j ascending, i.e. taps from the last), zeros included (adding +0.0
    to a non-negative sum changes nothing). One tap at a time over a tile of outputs that stays in
    cache: contiguous slices, which the compiler vectorizes (4-7x faster on dense bins)."""
    M = w.size
    out = np.zeros(M)
    for b0 in range(0, M, _TILE):
        b1 = min(b0 + _TILE, M)
        for t in range(2 * R, -1, -1):
            gt = g[t]
            off = R - t  # out_i += w_{i+off} g_t
            lo = max(b0, -off)
            n = min(b1, M - off) - lo
            if n <= 0:
                continue
            dst = out[lo:lo + n]
            src = w[lo + off:lo + off + n]
            for k in range(n):
                dst[k] += src[k] * gt
    return out


@njit(cache=True, nogil=True)
def _extrema(d, seg_start, seg_stop, seg_lat):
    """Run-length extrema of d per segment, outside = -inf.

    Returns peak positions (lattice units, plateau centre, single points refined by a
    log-parabola), edge positions doubled (integers: run start + run end), edge densities,
    and per-segment counts of peaks and edges.
    """
    n = d.size
    cap = n // 2 + seg_start.size + 1
    pk = np.empty(cap)
    e2 = np.empty(cap, np.int64)
    ev = np.empty(cap)
    npk = np.zeros(seg_start.size, np.int64)
    ned = np.zeros(seg_start.size, np.int64)
    a = 0
    b = 0
    for s in range(seg_start.size):
        lo = seg_start[s]
        hi = seg_stop[s]
        lat = seg_lat[s] - lo
        prev = -np.inf
        i = lo
        while i < hi:
            v = d[i]
            j = i
            while j + 1 < hi and d[j + 1] == v:
                j += 1
            nxt = d[j + 1] if j + 1 < hi else -np.inf
            if v > prev and v > nxt:
                pos = 0.5 * (2 * lat + i + j)  # exact: the same in dense and sparse lattices
                if i == j and i > lo and j + 1 < hi and prev > 0.0 and nxt > 0.0:
                    la = math.log(prev)
                    lb = math.log(v)
                    lc = math.log(nxt)
                    den = la - 2.0 * lb + lc
                    if den < 0.0:
                        pos += 0.5 * (la - lc) / den
                pk[a] = pos
                a += 1
                npk[s] += 1
            elif v < prev and v < nxt:
                e2[b] = 2 * lat + i + j
                ev[b] = v
                b += 1
                ned[s] += 1
            prev = v
            i = j + 1
    return pk[:a], e2[:b], ev[:b], npk, ned


@njit(cache=True, nogil=True)
def _assemble_sparse(u, cstart, mat, fl, ce, pk, e2, ev, npk, ned, origin, step):
    """Peaks, edges and edge densities, in value units, of all clusters in order."""
    C = cstart.size - 1
    nb = 0
    s = 0
    for c in range(C):
        if mat[c]:
            nb += npk[s]
            s += 1
        else:
            nb += 1
    peaks = np.empty(nb)
    edges = np.empty(max(nb - 1, 0))
    evals = np.empty(max(nb - 1, 0))
    a = 0  # peaks written
    b = 0  # edges written
    ip = 0
    ie = 0
    s = 0
    for c in range(C):
        if c > 0:  # edge between clusters: centre of the zero run (doubled: ce_A + fl_B)
            edges[b] = origin + step * (0.5 * (ce[cstart[c] - 1] + fl[cstart[c]]))
            evals[b] = 0.0
            b += 1
        if mat[c]:
            for t in range(npk[s]):
                peaks[a] = origin + step * pk[ip + t]
                a += 1
            for t in range(ned[s]):
                edges[b] = origin + step * (0.5 * e2[ie + t])
                evals[b] = ev[ie + t]
                b += 1
            ip += npk[s]
            ie += ned[s]
            s += 1
        else:
            peaks[a] = u[cstart[c]]
            a += 1
    return peaks, edges, evals


@njit(cache=True, nogil=True)
def _assign_reduce(x, origin, inv_half, table, cand, edges, peaks, best, bestd, lab):
    """lab[i] = basin of x[i]; best[b] = member of basin b nearest to peaks[b] (ties: smaller).

    Basin lookup per half-step sub-cell q: ``table[q] >= 0`` is the basin of every value in
    it, ``table[q] = -(e+1)`` means q is within rounding of edge e: ``b = e + (v >= edges[e])``.
    Only values in candidate sub-cells (those that can hold a nearest member) are compared.
    """
    qmax = table.size - 1
    for i in range(x.size):
        v = x[i]
        q = int(min(max((v - origin) * inv_half, 0.0), qmax))
        b = table[q]
        if b < 0:
            e = -b - 1
            b = e + (1 if v >= edges[e] else 0)
        lab[i] = b
        if cand[q]:
            dd = abs(v - peaks[b])
            if dd < bestd[b] or (dd == bestd[b] and v < best[b]):
                bestd[b] = dd
                best[b] = v


@njit(cache=True, nogil=True)
def _reduce_labels(x, lab, peaks, best, bestd):
    """As _assign_reduce, given every value's basin."""
    for i in range(x.size):
        v = x[i]
        b = lab[i]
        dd = abs(v - peaks[b])
        if dd < bestd[b] or (dd == bestd[b] and v < best[b]):
            bestd[b] = dd
            best[b] = v


@njit(cache=True, nogil=True)
def _nearest(x, t):
    """The value of x nearest to t (ties: the smaller)."""
    best = np.inf
    bestd = np.inf
    for i in range(x.size):
        v = x[i]
        dd = abs(v - t)
        if dd < bestd or (dd == bestd and v < best):
            bestd = dd
            best = v
    return best


@njit(cache=True, nogil=True)
def _gather(table, idx, out):
    """out[i] = table[idx[i]]."""
    for i in range(idx.size):
        out[i] = table[idx[i]]


@njit(cache=True, nogil=True)
def _gather_rows(codebook, lab, rows, s, zidx, out, idx):
    """Row c of out: ``codebook[l] * s[c]`` (IEEE product in the codebook's dtype), l = the next
    row of lab if rows[c] else zidx (all-zero rows are not in lab).  ``idx``: l, if not empty."""
    K = out.shape[1]
    r = 0
    for c in range(out.shape[0]):
        sc = s[c]
        if rows[c]:
            base = r * K
            for j in range(K):
                out[c, j] = codebook[lab[base + j]] * sc
            if idx.size:
                for j in range(K):
                    idx[c, j] = lab[base + j]
            r += 1
        else:
            z = codebook[zidx] * sc
            for j in range(K):
                out[c, j] = z
            if idx.size:
                for j in range(K):
                    idx[c, j] = zidx


@njit(cache=True, nogil=True)
def _count(idx, n):
    c = np.zeros(n, np.int64)
    for i in range(idx.size):
        c[idx[i]] += 1
    return c


@njit(cache=True, nogil=True)
def _keep_nonempty(counts, evals):
    """Absorb empty basins: between consecutive non-empty basins keep the deepest edge."""
    B = counts.size
    keep_e = np.zeros(max(B - 1, 0), np.bool_)
    prev = -1
    for b in range(B):
        if counts[b] > 0:
            if prev >= 0:
                e = prev
                for t in range(prev + 1, b):
                    if evals[t] < evals[e]:
                        e = t
                keep_e[e] = True
            prev = b
    return counts > 0, keep_e


@njit(cache=True, nogil=True)
def _sum_moments(x):
    """(sum, sum of squared deviations from the mean), float64, two passes, no temporaries."""
    s = 0.0
    for i in range(x.size):
        s += x[i]
    m = s / max(x.size, 1)
    q = 0.0
    for i in range(x.size):
        d = x[i] - m
        q += d * d
    return s, q


@njit(cache=True, nogil=True)
def _bucket_counts(bits, sign_shift, mask, shift):
    """Histogram of the top 16 bits of the order-preserving integer key of each float."""
    h = np.zeros(65536, np.int64)
    for i in range(bits.size):
        v = np.int64(bits[i])
        k = v ^ ((v >> sign_shift) & mask)
        h[(k >> shift) + 32768] += 1
    return h


@njit(cache=True, nogil=True)
def _bucket_collect(x, bits, sign_shift, mask, shift, marked, out):
    """The values whose key bucket is marked, in input order; returns how many."""
    n = 0
    for i in range(bits.size):
        v = np.int64(bits[i])
        k = v ^ ((v >> sign_shift) & mask)
        if marked[(k >> shift) + 32768]:
            out[n] = x[i]
            n += 1
    return n


def _order_statistics(work, ranks):
    """``np.sort(work)[ranks]`` in O(n): bucket the float keys by their top 16 bits, then sort
    only the values in the buckets holding the ranks (radix select; no full sort or copy)."""
    if work.dtype == np.float32:
        bits, sign_shift, mask, shift = work.view(np.int32), 31, 0x7FFFFFFF, 16
    else:
        bits, sign_shift, mask, shift = work.view(np.int64), 63, 0x7FFFFFFFFFFFFFFF, 48
    h = _bucket_counts(bits, sign_shift, mask, shift)
    cum = np.cumsum(h)
    b = np.searchsorted(cum, ranks, side="right")  # bucket of each rank
    marked = np.zeros(65536, np.bool_)
    marked[b] = True
    out = np.empty(int(h[marked].sum()), work.dtype)
    _bucket_collect(work, bits, sign_shift, mask, shift, marked, out)
    out.sort()
    below = np.cumsum(np.where(marked, h, 0)) - h  # values of marked buckets before bucket b
    return out[below[b] + (ranks - (cum[b] - h[b]))].astype(np.float64)


# ----------------------------------------------------------------------------------------
# lattice


def _prepare(values):
    """(array, contiguous 1-D float32/float64 working copy or view, min, max)."""
    a = np.asarray(values)
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"expected float16/float32/float64 values, got {a.dtype}")
    work = np.ascontiguousarray(a.reshape(-1), dtype=np.float32 if a.dtype == np.float16 else a.dtype)
    if work.size == 0:
        return a, work, 0.0, 0.0
    lo = float(work.min())
    hi = float(work.max())
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"values contain NaN ({int(np.isnan(work).sum())} of {work.size})")
    if math.isinf(lo) or math.isinf(hi):
        raise ValueError("values contain inf")
    return a, work, lo, hi


def _check_bandwidth(bandwidth):
    h = float(bandwidth)
    if not (h > 0.0 and math.isfinite(h)):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    return h


@njit(cache=True, nogil=True)
def _runs(xs):
    """Distinct values of sorted xs (float64) and their multiplicities (float64)."""
    u = np.empty(xs.size)
    c = np.empty(xs.size)
    m = 0
    for i in range(xs.size):
        if m and xs[i] == u[m - 1]:
            c[m - 1] += 1.0
        else:
            u[m] = xs[i]
            c[m] = 1.0
            m += 1
    return u[:m].copy(), c[:m].copy()


def _distinct(work):
    return _runs(np.sort(work))


def _cells(u, origin, step):
    """Lowest and highest lattice point that the binning of each value of u touches:
    ``floor(p)`` and ``floor(p) + 1`` unless the fixed-point fraction is 0 (as ``_bin_*``)."""
    p = (u - origin) * (1.0 / step)
    fl = np.floor(p)
    return fl, fl + (((p - fl) * ONE).astype(np.int64) > 0)


def _plan(work, xmin, xmax, h, grid_size, all_clusters=False, dense=False):
    """Choose the lattice (see the module docstring); ``dense``: never sparse."""
    if grid_size is not None:
        gs = int(grid_size)
        if gs < 2:
            raise ValueError(f"grid_size must be >= 2, got {grid_size!r}")
        origin = xmin - TRUNCATION * h
        step = max((xmax - xmin + 2.0 * TRUNCATION * h) / (gs - 1), _MIN_STEP)
        if not (math.isfinite(origin) and step > 0.0 and math.isfinite(step)):
            raise ValueError(f"bandwidth {h!r} too large for values in [{xmin!r}, {xmax!r}]")
        return _Lattice(origin, step, int(min(TRUNCATION * h / step, gs)), gs)
    span = xmax - xmin
    step = h * STEP_FRACTION
    step = min(step, span / MIN_STEPS if span > 0.0 else max(abs(xmin), 1.0))
    step = max(step, _MIN_STEP)  # subnormal ranges / bandwidths: keep 1/step finite
    if span / step > _MAX_POSITION:
        step = span / _MAX_POSITION
    u = ucount = None
    while True:
        R = int(min(TRUNCATION * h / step, 2.0**40))
        pad = min(R, MAX_PAD)
        origin = xmin - (pad + 1) * step
        if not (math.isfinite(origin) and math.isfinite(xmax + (pad + 1) * step)):
            raise ValueError(f"bandwidth {h!r} too large for values in [{xmin!r}, {xmax!r}]")
        M = int(math.ceil((xmax - origin) / step)) + pad + 2
        if M <= MAX_GRID or dense:
            return _Lattice(origin, step, min(R, M), M)
        # sparse: here step >= h/4, so R <= 20 = pad
        if u is None:
            u, ucount = _distinct(work)
        fl, ce = _cells(u, origin, step)
        cut = np.flatnonzero(fl[1:] - ce[:-1] >= 2 * R + 2) + 1
        cstart = np.concatenate(([0], cut, [u.size])).astype(np.int64)
        mat = np.ones(cstart.size - 1, np.bool_) if all_clusters else np.diff(cstart) > 1
        points = float(np.sum((ce[cstart[1:] - 1] - fl[cstart[:-1]] + 2 * R + 3)[mat]))
        if points <= MAX_GRID:
            return _Lattice(origin, step, R, -1, u, ucount, cstart, mat)
        step *= max(2.0, points / MAX_GRID)


def _kernel(h, step, R):
    j = np.arange(-R, R + 1, dtype=np.float64) * (step / h)
    return np.exp(-0.5 * j * j)


def _convolve(w, g, R):
    nnz = int(np.count_nonzero(w))
    nfft = 1 << (w.size + 2 * R).bit_length()
    sparse = nnz * _SPARSE_RATIO < w.size
    if min(nnz, w.size / _SPARSE_RATIO) * (2 * R + 1) <= _FFT_RATIO * nfft * math.log2(nfft):
        return _convolve_direct(w, g, R) if sparse else _convolve_taps(w, g, R)
    full = np.fft.irfft(np.fft.rfft(w, nfft) * np.fft.rfft(g, nfft), nfft)
    out = full[R : R + w.size]
    out[out < _FFT_FLOOR * out.max()] = 0.0
    return np.ascontiguousarray(out)


def _segments(lat):
    """Sparse lattice segments: (cluster bounds fl/ce per distinct value, seg lattice start, offsets)."""
    fl, ce = _cells(lat.u, lat.origin, lat.step)
    cs = lat.cstart
    seg_lat = (fl[cs[:-1]] - lat.R - 1)[lat.mat].astype(np.int64)
    seg_len = (ce[cs[1:] - 1] + lat.R + 1)[lat.mat].astype(np.int64) - seg_lat + 1
    seg_off = np.concatenate(([0], np.cumsum(seg_len))).astype(np.int64)
    return fl, ce, seg_lat, seg_off


def _lattice_density(work, lat, h, lo, hi):
    """Unnormalised lattice density (sum_j c_{k-j} g_j), binned weights c, and segments."""
    g = _kernel(h, lat.step, lat.R)
    inv = 1.0 / lat.step
    if lat.size > 0:
        w = np.zeros(lat.size, np.int64)
        ends = (np.array([lo, hi], np.float64) - lat.origin) * inv  # lo, hi: min and max of work
        _bin_dense(work, lat.origin, inv, w, not (ends[0] >= 0.0 and ends[1] < lat.size - 1))
        d = _convolve(w.astype(np.float64), g, lat.R)
        z = np.zeros(1, np.int64)
        return d, w, z, np.array([lat.size], np.int64), z, None
    fl, ce, seg_lat, seg_off = _segments(lat)
    w = np.zeros(int(seg_off[-1]), np.int64)
    _bin_sparse(lat.u, lat.ucount, lat.origin, inv, lat.cstart, lat.mat, seg_off, seg_lat, w)
    d = _convolve(w.astype(np.float64), g, lat.R)
    return d, w, seg_off[:-1].copy(), seg_off[1:].copy(), seg_lat, (fl, ce)


# ----------------------------------------------------------------------------------------
# public API


def kde_density(values: np.ndarray, bandwidth: float, grid_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grid points ``t`` and the Gaussian KDE ``f(t)`` there, normalised so that ``sum f * D = 1``.

    ``grid_size`` None: the default lattice (module docstring: ``D = min(h/4, range/1024)``,
    ``[min - 5h, max + 5h]`` or ``MAX_PAD`` steps beyond the values, whichever is narrower); for
    values with a huge range the grid is piecewise regular (the stretches where the truncated
    density is exactly zero are left out).  ``grid_size`` given: that many points evenly spaced
    over ``[min - 5h, max + 5h]``.  Empty values give two empty arrays.
    """
    _, work, lo, hi = _prepare(values)
    h = _check_bandwidth(bandwidth)
    if work.size == 0:
        return np.empty(0), np.empty(0)
    lat = _plan(work, lo, hi, h, grid_size, all_clusters=True)
    d, _, s0, s1, slat, _ = _lattice_density(work, lat, h, lo, hi)
    if lat.size > 0:
        k = np.arange(lat.size, dtype=np.float64)
    else:
        k = (np.arange(s1[-1]) + np.repeat(slat - s0, s1 - s0)).astype(np.float64)
    return lat.origin + lat.step * k, d / (d.sum() * lat.step)


@njit(cache=True, nogil=True)
def _subcell_lookup(edges, origin, step, Q, delta):
    """table[q] for sub-cell q = [origin + step*q/2, origin + step*(q+1)/2) widened by delta
    (rounding of the values' positions): its basin, or -(e+1) if edge e lies in it; empty if
    some sub-cell holds two edges (rounding too coarse for the lookup)."""
    table = np.empty(Q, np.int32)
    ne = edges.size
    elo = 0
    ehi = 0
    for q in range(Q):
        left = origin + step * (0.5 * q) - delta if q > 0 else -np.inf
        right = origin + step * (0.5 * (q + 1)) + delta if q < Q - 1 else np.inf
        while elo < ne and edges[elo] <= left:
            elo += 1
        while ehi < ne and edges[ehi] <= right:
            ehi += 1
        if ehi - elo > 1:
            return np.empty(0, np.int32)
        table[q] = elo if ehi == elo else -(elo + 1)
    return table


def _subcell_table(edges, lat, xabs):
    """Basin lookup over half-step sub-cells (see ``_assign_reduce``); None if rounding makes it unsafe."""
    Q = 2 * lat.size
    delta = 16.0 * np.finfo(np.float64).eps * (xabs + abs(lat.origin) + lat.step * Q)
    table = _subcell_lookup(edges, lat.origin, lat.step, Q, delta)
    return table if table.size == Q else None


def _candidate_cells(w, el, pk, Q):
    """Half-step sub-cells that can hold the member nearest to some basin's peak.

    A lattice point k with binned weight c_k > 0 has a value within [k-1, k+1); if that
    window (plus a margin) lies inside basin b, b's nearest member is within |k - peak_b| + 1
    of its peak.  Basins without such a point are scanned whole.  (Lattice units.)
    """
    B = pk.size
    lo_e = np.concatenate(([-np.inf], el))
    hi_e = np.concatenate((el, [np.inf]))
    kk = np.flatnonzero(w > 0.0).astype(np.float64)
    bk = np.searchsorted(el, kk, side="right")
    ok = (kk - 1.5 >= lo_e[bk]) & (kk + 1.5 <= hi_e[bk])
    D = np.full(B, np.inf)
    np.minimum.at(D, bk[ok], np.abs(kk[ok] - pk[bk[ok]]) + 1.0)
    fin = np.isfinite(D)
    a = np.where(fin, 2.0 * (pk - D), 2.0 * lo_e)
    b = np.where(fin, 2.0 * (pk + D), 2.0 * hi_e)
    qa = np.clip(np.floor(np.nan_to_num(a, neginf=-1.0, posinf=Q)) - 1, 0, Q - 1).astype(np.int64)
    qb = np.clip(np.floor(np.nan_to_num(b, neginf=-1.0, posinf=Q)) + 1, 0, Q - 1).astype(np.int64)
    mark = np.zeros(Q + 1, np.int64)
    np.add.at(mark, qa, 1)
    np.add.at(mark, qb + 1, -1)
    return np.cumsum(mark[:-1]) > 0


def _label_dtype(B, int32):
    if int32 or B > 65536:
        return np.int32
    return np.uint8 if B <= 256 else np.uint16


def _unimodal(work, lo, hi, h, grid_size, int32):
    """One basin (``h >= 2 * range``: the KDE is concave over the values, so unimodal).

    The peak is the lattice argmax (plateau centre, log-parabola refined) for
    ``min(h, UNIMODAL_CAP * range)``: beyond that the density's curvature over the lattice
    drowns in rounding, and the peak moves by < 1e-3 of the range.
    """
    span = hi - lo
    step = 0.0
    if span > 0.0:
        lat = _plan(work, lo, hi, min(h, UNIMODAL_CAP * span), grid_size, dense=True)  # <= 9220 points
        d = _lattice_density(work, lat, min(h, UNIMODAL_CAP * span), lo, hi)[0]
        i = int(np.argmax(d))
        j = i + int(np.argmax(d[i:] != d[i])) - 1 if np.any(d[i:] != d[i]) else d.size - 1
        pos = 0.5 * (i + j)
        if i == j and 0 < i < d.size - 1 and d[i - 1] > 0.0 and d[i + 1] > 0.0:
            la, lb, lc = np.log(d[i - 1 : i + 2])
            if la - 2.0 * lb + lc < 0.0:
                pos += 0.5 * (la - lc) / (la - 2.0 * lb + lc)
        peak = lat.origin + lat.step * pos
        rep = _nearest(work, peak)
        step = lat.step
    else:
        peak = rep = lo
    info = Basins(np.array([rep]), np.empty(0), np.array([peak]), np.array([work.size], np.int64), step)
    return info, np.zeros(work.size, _label_dtype(1, int32)), None


def _analyze(work, lo, hi, h, grid_size, int32=False):
    """Basins of ``work`` (``counts`` left None), every value's basin label, and ``index``.

    Labels refer to the basins before empty ones were dropped: basin ``index[label]``
    (``index`` None: the identity).
    """
    if h >= 2.0 * (hi - lo):
        return _unimodal(work, lo, hi, h, grid_size, int32)
    lat = _plan(work, lo, hi, h, grid_size)
    d, w, s0, s1, slat, sparse = _lattice_density(work, lat, h, lo, hi)
    pk, e2, ev, npk, ned = _extrema(d, s0, s1, slat)
    origin, step = lat.origin, lat.step
    lab = None
    if lat.size > 0:
        el = 0.5 * e2
        peaks = origin + step * pk
        edges = origin + step * el
        B = peaks.size
        best = np.full(B, np.inf)
        bestd = np.full(B, np.inf)
        table = _subcell_table(edges, lat, max(abs(lo), abs(hi)))
        if table is not None:
            cand = _candidate_cells(w, el, pk, table.size)
            lab = np.empty(work.size, _label_dtype(B, int32))
            _assign_reduce(work, origin, 2.0 / step, table, cand, edges, peaks, best, bestd, lab)
        else:  # rounding too coarse for the sub-cell table: binary search
            lab = np.searchsorted(edges, work, side="right").astype(_label_dtype(B, int32))
            _reduce_labels(work, lab, peaks, best, bestd)
        nonempty = np.isfinite(bestd).astype(np.int64)
    else:
        fl, ce = sparse
        peaks, edges, ev = _assemble_sparse(lat.u, lat.cstart, lat.mat, fl, ce, pk, e2, ev, npk, ned, origin, step)
        ulab = np.searchsorted(edges, lat.u, side="right")
        B = peaks.size
        nonempty = np.bincount(ulab, minlength=B)
        first = np.searchsorted(ulab, np.arange(B), side="left")
        last = np.maximum(np.searchsorted(ulab, np.arange(B), side="right") - 1, 0)  # empty: dropped below
        first = np.minimum(first, last)
        j = np.clip(np.searchsorted(lat.u, peaks), first, last)  # nearest member is u[j] or u[j-1]
        jm = np.maximum(j - 1, first)
        while True:  # smaller members at the same float distance (ties: the smaller)
            tie = (jm > first) & (np.abs(lat.u[np.maximum(jm - 1, 0)] - peaks) == np.abs(lat.u[jm] - peaks))
            if not tie.any():
                break
            jm = np.where(tie, jm - 1, jm)
        take_lower = np.abs(lat.u[jm] - peaks) <= np.abs(lat.u[j] - peaks)  # ties: the smaller
        best = np.where(take_lower, lat.u[jm], lat.u[j])
    keep_b, keep_e = _keep_nonempty(nonempty, ev)
    index = None
    if not keep_b.all():
        peaks, best, edges = peaks[keep_b], best[keep_b], edges[keep_e]
        index = np.maximum(np.cumsum(keep_b) - 1, 0)
    if lab is None:  # sparse lattice: binary search over the final edges
        lab = np.searchsorted(edges, work, side="right").astype(_label_dtype(edges.size + 1, int32))
        index = None
    return Basins(best, edges, peaks, None, step), lab, index


def kde_basins(values: np.ndarray, bandwidth: float, grid_size: int | None = None) -> Basins:
    """Modes (representatives), edges, density peaks and member counts of the KDE's basins."""
    _, work, lo, hi = _prepare(values)
    h = _check_bandwidth(bandwidth)
    if work.size == 0:
        e = np.empty(0)
        return Basins(e, e.copy(), e.copy(), np.empty(0, np.int64), 0.0)
    info, lab, index = _analyze(work, lo, hi, h, grid_size)
    counts = _count(lab, info.modes.size if index is None else index.size)
    if index is not None:
        counts = np.bincount(index, weights=counts, minlength=info.modes.size).astype(np.int64)
    return info._replace(counts=counts)


def basins(values: np.ndarray, bandwidth: float, grid_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(modes, edges)``: sorted basin representatives and the ``len(modes) - 1`` edges between them.

    A value ``x`` with ``edges[k-1] <= x < edges[k]`` belongs to basin ``k`` and hashes to ``modes[k]``.
    """
    b = kde_basins(values, bandwidth, grid_size)
    return b.modes, b.edges


def _hash_flat(work, lo, hi, h, grid_size, labels, representative="mode", sorted_work=None):
    """Hashed values (dtype of ``work``) or basin indices (``labels`` True: int32; "compact":
    uint8/uint16/int32, the smallest that fits), and the float64 representatives; ``sorted_work``:
    ``np.sort(work)``, if known (Lloyd's steps run on it)."""
    if representative not in ("mode", "mean", "lloyd"):
        raise ValueError(f"representative must be 'mode', 'mean' or 'lloyd', got {representative!r}")
    if work.size == 0:
        return (np.empty(0, np.int32) if labels else work.copy()), np.empty(0)
    if representative == "lloyd":
        reps, starts = _lloyd(work, _kde_edges(work, lo, hi, h, grid_size), sorted_work)
        if not labels:  # each value's cell entry written directly
            out = np.empty_like(work)
            _cells_of(work, starts, np.empty(0, np.int32), reps.astype(work.dtype), out)
            return out, reps
        lab = np.empty(work.size, _label_dtype(reps.size, labels is True))
        _cells_of(work, starts, lab, reps[:0], reps[:0])
        index = None
    else:
        info, lab, index = _analyze(work, lo, hi, h, grid_size, int32=labels is True)
        reps = info.modes if representative == "mode" else _basin_means(work, lab, index, info.modes)
    if labels:
        if index is not None:
            _gather(index.astype(lab.dtype), lab, lab)
        return lab, reps
    table = reps.astype(work.dtype)
    if index is not None:
        table = table[index]
    out = np.empty_like(work)
    _gather(table, lab, out)
    return out, reps


@njit(cache=True, nogil=True)
def _offset_sums(x, lab, ref, acc, cnt):
    """acc[b] += x[i] - ref[b], cnt[b] += 1 over the values i of label b."""
    for i in range(x.size):
        b = lab[i]
        acc[b] += x[i] - ref[b]
        cnt[b] += 1.0


def _basin_means(work, lab, index, modes):
    """Mean of each basin's members, as ``mode + mean(x - mode)`` in float64 (so a basin of one
    distinct value keeps that value exactly)."""
    ref = modes if index is None else modes[index]
    acc, cnt = np.zeros(ref.size), np.zeros(ref.size)
    _offset_sums(work, lab, ref, acc, cnt)
    if index is not None:
        acc = np.bincount(index, weights=acc, minlength=modes.size)
        cnt = np.bincount(index, weights=cnt, minlength=modes.size)
    return modes + acc / np.maximum(cnt, 1.0)


LLOYD_STEPS = 1000  #: at most (244 of the 247 layer hashes the pass makes on 4 bench models stop before)


def _lloyd(work, edges, xs=None):
    """Lloyd's 1-D k-means from the KDE's basins (cut at ``edges``): ``(sorted final centres,
    float64; the smallest value of each centre's cell, ascending)``. A value ``x`` belongs to the
    last cell whose smallest value is ``<= x``. ``xs``: ``np.sort(work)``, if known."""
    xs = np.sort(work) if xs is None else xs
    prefix = np.empty(xs.size // PREFIX_BLOCK + 1)
    _prefix_sums(xs, prefix)
    bounds = np.concatenate(([0], _first_at_least(xs, edges), [xs.size]))
    # one step more: the first only moves the cuts from the basin edges to the means' midpoints
    starts = _lloyd_cells(xs, prefix, bounds, LLOYD_STEPS + 1)
    return _cell_means(xs, starts), xs[starts].astype(np.float64)


@njit(cache=True, nogil=True)
def _first_at_least(xs, keys):
    """For each key, the first index i with xs[i] >= key (``xs`` sorted), compared in float64: as
    ``np.searchsorted(xs, keys, "left")``, which would first copy float32 ``xs`` to float64."""
    out = np.empty(keys.size, np.int64)
    for j in range(keys.size):
        lo, hi = 0, xs.size
        while lo < hi:
            m = (lo + hi) // 2
            if float(xs[m]) < keys[j]:
                lo = m + 1
            else:
                hi = m
        out[j] = lo
    return out


PREFIX_BLOCK = 64  #: prefix sums are kept every PREFIX_BLOCK values (1/64 of the memory)


@njit(cache=True, nogil=True)
def _prefix_sums(xs, out):
    """out[b] = xs[0] + ... + xs[b·PREFIX_BLOCK − 1], summed in order in float64."""
    acc = 0.0
    out[0] = 0.0
    for i in range(xs.size):
        acc += float(xs[i])
        if (i + 1) % PREFIX_BLOCK == 0:
            out[(i + 1) // PREFIX_BLOCK] = acc


@njit(cache=True, nogil=True)
def _prefix_at(xs, prefix, i):
    """xs[0] + ... + xs[i − 1], the same float64 additions in the same order as one running sum."""
    b = i // PREFIX_BLOCK
    acc = prefix[b]
    for t in range(b * PREFIX_BLOCK, i):
        acc += float(xs[t])
    return acc


@njit(cache=True, nogil=True)
def _lloyd_cells(xs, prefix, bounds, steps):
    """Lloyd steps on sorted ``xs`` (``prefix``: its blocked cumulative sums) from the cells
    ``xs[bounds[j]:bounds[j+1]]``, until no cell changes: each centre moves to its cell's mean
    (empty cells are dropped), then each cut to the midpoint of its two centres, found by binary
    search between the two cells' old ends (the new midpoint lies within them). Returns the
    first index of each final cell."""
    k = 0
    for j in range(bounds.size - 1):  # drop empty cells
        if bounds[j + 1] > bounds[j]:
            bounds[k] = bounds[j]
            k += 1
    bounds[k] = xs.size
    b = bounds[: k + 1].copy()
    pb = np.empty(k + 1)  # the prefix sum at each cut, recomputed only where the cut moves
    for j in range(k + 1):
        pb[j] = _prefix_at(xs, prefix, b[j])
    c = np.empty(k)
    moved = np.ones(k + 1, np.bool_)  # cuts moved in the last step: only their cells' centres change
    fresh = np.empty(k, np.bool_)
    for _ in range(steps):
        for j in range(k):
            fresh[j] = moved[j] or moved[j + 1]
            if fresh[j]:
                c[j] = (pb[j + 1] - pb[j]) / (b[j + 1] - b[j])
        changed = False
        moved[:] = False
        for j in range(1, k):
            if not (fresh[j - 1] or fresh[j]):
                continue  # both centres as in the last step: so is the midpoint, and the cut
            mid = 0.5 * (c[j - 1] + c[j])
            lo, hi = b[j - 1], b[j + 1]  # bracket: cut j-1 (just moved, mid_{j-1} < mid), xs[hi-1] >= c[j] >= mid
            while lo < hi:  # first index with xs >= mid
                m = (lo + hi) // 2
                if xs[m] < mid:
                    lo = m + 1
                else:
                    hi = m
            if lo != b[j]:
                changed = True
                moved[j] = True
                b[j] = lo
                pb[j] = _prefix_at(xs, prefix, lo)
        if not changed:
            break
        m = 0  # drop cells left empty
        total = pb[k]
        for j in range(k):
            if b[j + 1] > b[j]:
                b[m] = b[j]
                pb[m] = pb[j]
                m += 1
        b[m] = xs.size
        pb[m] = total
        if m < k:  # cells renumbered: recompute every centre
            moved[:] = True
        k = m
    return b[:k].copy()


_COUNT_CELLS = 12  #: up to this many cells, counting beats the bucket table (2-3x on 50 M values)


@njit(cache=True, nogil=True)
def _cells_of(x, starts, out, entries, values):
    """out[i] = the last k with starts[k] <= x[i] (``starts`` ascending, starts[0] <= min x), as
    ``searchsorted(starts[1:], x, "right")`` but O(1) per value: a table over max(8k, 1024) equal
    buckets of [starts[0], starts[-1]] gives each value the first start at or above its bucket
    (few starts per bucket: the scan after it is short and predictable); up to _COUNT_CELLS
    cells, a count of the starts <= x[i]. With ``values`` non-empty, values[i] = entries[k] is
    written instead of out[i]."""
    direct = values.size > 0
    k = starts.size
    if k <= _COUNT_CELLS:  # few cells: count the starts at or below each value, no branches
        for i in range(x.size):
            v = x[i]
            j = 0
            for t in range(1, k):
                j += starts[t] <= v
            if direct:
                values[i] = entries[j]
            else:
                out[i] = j
        return
    lo, hi = starts[0], starts[k - 1]
    buckets = max(8 * k, 1024)
    inv = (buckets - 1) / (hi - lo) if hi > lo else 0.0
    first = np.empty(buckets, np.int64)
    j = 0
    for b in range(buckets):
        while j < k and (starts[j] - lo) * inv < b:
            j += 1
        first[b] = j
    for i in range(x.size):
        v = x[i]
        if v >= hi:
            j = k
        else:
            j = first[min(int((v - lo) * inv), buckets - 1)]  # starts before j are < v (monotone)
            while j < k and starts[j] <= v:
                j += 1
        if direct:
            values[i] = entries[j - 1]
        else:
            out[i] = j - 1


@njit(cache=True, nogil=True)
def _cell_means(xs, starts):
    """Mean of each cell ``xs[starts[k]:starts[k+1]]`` of the sorted values, as its first value +
    the mean of the offsets from it (float64)."""
    out = np.empty(starts.size)
    for k in range(starts.size):
        a, b = starts[k], starts[k + 1] if k + 1 < starts.size else xs.size
        ref = float(xs[a])
        acc = 0.0
        for i in range(a, b):
            acc += float(xs[i]) - ref
        out[k] = ref + acc / (b - a)
    return out


def hash_values(
    values: np.ndarray,
    bandwidth: float,
    grid_size: int | None = None,
    *,
    return_indices: bool = False,
    representative: str = "mode",
):
    """Replace every value by the representative of its KDE basin.

    ``representative``: ``"mode"`` (RED: the member nearest to the basin's density peak),
    ``"mean"`` (the basin's mean, rounded to the dtype: one Lloyd step from the KDE's partition,
    the least squared error for the same basins) or ``"lloyd"`` (those means refined by Lloyd's
    algorithm until its cells are stable: the basins move, their number does not grow).

    Returns ``(hashed, codebook)``: ``hashed`` has the shape and dtype of ``values``,
    ``codebook`` holds its sorted distinct values (same dtype), one per non-empty basin (means:
    non-decreasing, two may round to the same value).
    ``return_indices=True`` adds ``indices`` (int32, shape of ``values``) with
    ``hashed == codebook[indices]``.
    """
    a, work, lo, hi = _prepare(values)
    h = _check_bandwidth(bandwidth)
    out, reps = _hash_flat(work, lo, hi, h, grid_size, return_indices, representative)
    codebook = reps.astype(a.dtype)
    if return_indices:
        idx = out.reshape(a.shape)
        return codebook[idx], codebook, idx
    return out.astype(a.dtype, copy=False).reshape(a.shape), codebook


def _scales(flat, scale):
    """Per-row scales in the rows' dtype; 0 exactly for all-zero rows."""
    m = np.max(np.abs(flat), axis=1)
    if scale == "maxabs":
        s = m
    elif scale == "std":
        s = flat.std(axis=1, dtype=np.float64).astype(flat.dtype)
        s = np.where(s > 0, s, m)  # constant rows: their max-abs
    elif scale == "pow2":  # 2**e > m (2**(e-1) if 2**e overflows the dtype): s*(w/s) == w
        e = np.frexp(m.astype(np.float64))[1]
        with np.errstate(over="ignore"):
            s = np.ldexp(1.0, e).astype(flat.dtype)
        s = np.where(np.isfinite(s), s, np.ldexp(1.0, e - 1).astype(flat.dtype))
        s[m == 0] = 0
    else:
        raise ValueError(f"scale must be 'maxabs', 'std' or 'pow2', got {scale!r}")
    if not np.all(np.isfinite(s)):
        raise ValueError("weight contains NaN or inf")
    return s.astype(flat.dtype)


def _normalise(w, per_channel, scale):
    """(per-row scales, rows with a nonzero scale, normalised values of those rows)."""
    if w.ndim == 0:
        return np.ones((), w.dtype), np.ones(1, np.bool_), w.reshape(1, 1)
    flat = w.reshape(w.shape[0], w.size // max(w.shape[0], 1))
    if per_channel and flat.size:
        s = _scales(flat, scale)
        rows = s != 0
        u = (flat / s[:, None] if rows.all() else flat[rows] / s[rows, None]).astype(w.dtype, copy=False)
        return s, rows, u
    return np.ones(w.shape[0], w.dtype), np.ones(w.shape[0], np.bool_), flat


def _kde_edges(work, lo, hi, h, grid_size):
    """The density's minima, ascending, those of empty basins included: a value ``v`` is in basin
    ``#{e : edges[e] <= v}``, as ``_analyze`` assigns it (dropping the edges of empty basins
    moves no value). Empty when the KDE is unimodal (``h >= 2 * range``)."""
    if work.size == 0 or h >= 2.0 * (hi - lo):
        return np.empty(0)
    lat = _plan(work, lo, hi, h, grid_size)
    d, _, s0, s1, slat, sparse = _lattice_density(work, lat, h, lo, hi)
    pk, e2, ev, npk, ned = _extrema(d, s0, s1, slat)
    if lat.size > 0:
        return lat.origin + lat.step * (0.5 * e2)
    fl, ce = sparse
    return _assemble_sparse(lat.u, lat.cstart, lat.mat, fl, ce, pk, e2, ev, npk, ned, lat.origin, lat.step)[1]


def _count_nonempty(sorted_work, lo, hi, h, grid_size):
    """Number of non-empty basins of ``sorted_work`` (sorted ascending) at bandwidth ``h``: the
    codebook size of :func:`_hash_flat`, from the edges alone, without labelling every value."""
    below = _first_at_least(sorted_work, _kde_edges(sorted_work, lo, hi, h, grid_size))
    return int(np.count_nonzero(np.diff(below, prepend=0, append=sorted_work.size)))


class PooledChannels:
    """The values :func:`hash_channels` pools for one weight, prepared once for a search over
    bandwidth factors: ``reference`` is their Silverman bandwidth (the ``h`` of factor 1) and
    :meth:`codebook_size` the number of entries ``hash_channels(weight, factor, ...)`` gives."""

    def __init__(self, weight: np.ndarray, per_channel: bool, *, scale: str = "maxabs"):
        _, rows, u = _normalise(np.asarray(weight), per_channel, scale)
        _, work, self._lo, self._hi = _prepare(u)
        self._sorted = np.sort(work)
        self._all_zero_rows = not rows.all()
        self.reference = silverman_bandwidth(work) if work.size else 1.0

    def codebook_size(self, factor: float) -> int:
        n = _count_nonempty(self._sorted, self._lo, self._hi, float(factor) * self.reference, None)
        return max(n, 1) if self._all_zero_rows else n


def hash_channels(
    weight: np.ndarray,
    bandwidth_factor: float,
    per_channel: bool,
    *,
    scale: str = "maxabs",
    grid_size: int | None = None,
    return_indices: bool = False,
    reference_bandwidth: float | None = None,
    representative: str = "mode",
    pooled: PooledChannels | None = None,
):
    """Hash a weight tensor with one codebook shared by its output channels (axis 0).

    ``per_channel``: channel ``c`` is normalised, ``u_c = w_c / s_c`` (``s_c`` its max-abs,
    ``"std"``, or ``"pow2"`` — the power of two above the max-abs, which makes ``s*(w/s) == w``),
    all channels' ``u`` are pooled into one KDE with ``h = bandwidth_factor * silverman(u)``,
    and ``hashed = codebook[indices] * s[:, None, ...]`` computed in the weight's dtype — exactly
    what onnxruntime's ``Gather(codebook, indices)`` then ``Mul(scales)`` yields.  An all-zero
    channel gets ``s_c = 0`` (it stays exactly zero and is left out of the KDE; its indices
    point at the codebook entry of least magnitude).  Without ``per_channel`` the whole tensor
    is hashed with ``s = 1`` (``scales`` are ones), i.e. ``hash_values(w, f * silverman(w))``.

    ``representative``: as in :func:`hash_values`.

    ``reference_bandwidth``: Silverman's bandwidth of the pooled values if already known;
    ``pooled``: this weight's :class:`PooledChannels` (its bandwidth and sorted values are reused,
    so that a search over factors computes them once).

    Returns ``(hashed, codebook, scales)`` (``scales`` shape ``(C,)``, or ``()`` for a 0-d
    weight), plus ``indices`` (int32, shape of ``weight``) if ``return_indices``.
    """
    w = np.asarray(weight)
    if w.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"expected a float16/float32/float64 weight, got {w.dtype}")
    f = float(bandwidth_factor)
    if not (f > 0.0 and math.isfinite(f)):
        raise ValueError(f"bandwidth_factor must be a positive finite number, got {bandwidth_factor!r}")
    s, rows, u = _normalise(w, per_channel, scale)
    _, work, lo, hi = _prepare(u)
    if pooled is not None:
        reference_bandwidth = pooled.reference
    elif reference_bandwidth is None:
        reference_bandwidth = silverman_bandwidth(work) if work.size else 1.0
    h = f * reference_bandwidth
    lab, modes = _hash_flat(work, lo, hi, h, grid_size, "compact", representative,
                            pooled._sorted if pooled is not None else None)
    if modes.size == 0 and not rows.all():  # only all-zero channels: any codebook will do
        modes = np.zeros(1)
    codebook = modes.astype(w.dtype)
    zidx = int(np.argmin(np.abs(modes))) if modes.size else 0  # for all-zero channels
    if w.ndim and w.dtype != np.float16:
        out = np.empty((rows.size, w.size // max(rows.size, 1)), w.dtype)
        idx = np.empty(out.shape if return_indices else (0, 0), np.int32)
        _gather_rows(codebook, lab, rows, s, zidx, out, idx)
        hashed = out.reshape(w.shape)
        idx = idx.reshape(w.shape) if return_indices else None
    else:  # float16 (numba has no float16 arithmetic) and 0-d: numpy, same IEEE products
        idx = np.full((rows.size, w.size // max(rows.size, 1)), zidx, np.int32)
        if rows.any():
            idx[rows] = lab.reshape(int(rows.sum()), -1)
        idx = idx.reshape(w.shape)
        hashed = (codebook[idx] * s.reshape(s.shape + (1,) * (w.ndim - s.ndim))).astype(w.dtype, copy=False)
    return (hashed, codebook, s, idx) if return_indices else (hashed, codebook, s)


def _spread(values, robust):
    _, work, _, _ = _prepare(values)
    n = work.size
    if n < 2:
        return n, 0.0
    _, q = _sum_moments(work)
    sd = math.sqrt(q / (n - 1))
    if robust:  # quartiles as np.quantile(method="linear"): order statistics at (n-1)*q, interpolated
        r = (n - 1) * np.array([0.25, 0.75])
        lo = np.floor(r).astype(np.int64)
        v = _order_statistics(work, np.concatenate((lo, np.minimum(lo + 1, n - 1))))
        q25, q75 = v[:2] + (v[2:] - v[:2]) * (r - lo)
        iqr = float(q75 - q25) / 1.3489795
        if 0.0 < iqr < sd:
            return n, iqr
    return n, sd


def _fallback(values):
    """Bandwidth for values with no spread: any positive h gives one mode; use |x| * 2**-20 or 1."""
    a = np.asarray(values, dtype=np.float64)
    m = float(np.max(np.abs(a))) if a.size else 0.0
    return m * 2.0**-20 if m > 0 and math.isfinite(m) else 1.0


def silverman_bandwidth(values: np.ndarray) -> float:
    """Silverman's rule of thumb ``0.9 * min(sd, IQR/1.349) * n**(-1/5)`` (sd: ddof=1).

    Falls back to ``sd`` when the IQR is 0, and to a positive constant when ``sd`` is 0.
    """
    n, sp = _spread(values, robust=True)
    return 0.9 * sp * n ** -0.2 if sp > 0 else _fallback(values)


def scott_bandwidth(values: np.ndarray) -> float:
    """Scott's rule ``1.059 * sd * n**(-1/5)`` (sd: ddof=1); a positive constant when ``sd`` is 0."""
    n, sp = _spread(values, robust=False)
    return 1.059 * sp * n ** -0.2 if sp > 0 else _fallback(values)
