"""Speed of KDE hashing (density + basins + assignment) on one core.

    python -m bench.kde_speed                 # 50M float32 weights (also written to bench/kde_speed.md)
    python -m bench.kde_speed --n 5000000     # smaller

Times, on a normal-mixture float32 tensor with h = Silverman's bandwidth:

* numba: ``red_onnx.kde.hash_values`` (min/max, linear binning, direct convolution, extrema,
  basin lookup + nearest-member reduction, gather), best of ``--repeat`` runs, after a warm-up;
  the JIT compile time (cold cache, in a fresh cache folder) is reported separately;
* numba + Lloyd: the same with ``representative="lloyd"``, what the hash pass uses (the KDE's
  edges only, then a sort of the values, prefix sums, the Lloyd steps from the basins and a lookup
  of each value's cell), also at a bandwidth halved until the codebook has 200 entries or more;
* numpy: ``np.histogram`` binning + ``np.convolve`` + extrema + ``np.searchsorted`` + take,
  on the same lattice (its representatives are lattice peaks, not member values);
* scipy: ``gaussian_kde`` evaluated on the same lattice, timed on a 1e5-value subsample and
  extrapolated linearly to the full size (it is O(n * grid)); assignment not included.

Also measured: the basin count alone (``kde.PooledChannels.codebook_size``, what each probe of
the hash pass's bandwidth search computes; the values sorted once beforehand), numba basin
assignment vs ``np.searchsorted``, and the direct vs FFT convolution crossover that sets
``red_onnx.kde._FFT_RATIO``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["NUMBA_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
if "--warm-cache" not in sys.argv:
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="kde_speed_numba_")

import numpy as np  # noqa: E402


def mixture(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    comp = rng.integers(0, 3, n)
    mu = np.array([-0.05, 0.0, 0.04])
    sd = np.array([0.01, 0.02, 0.008])
    x = rng.standard_normal(n, dtype=np.float32)
    x *= sd.astype(np.float32)[comp]
    x += mu.astype(np.float32)[comp]
    return x


def best_of(fn, repeat: int, clock=time.perf_counter) -> float:
    ts = []
    for _ in range(repeat):
        t = clock()
        fn()
        ts.append(clock() - t)
    return min(ts)


def wall_cpu(fn, repeat: int) -> tuple[float, float]:
    """Best wall-clock and best CPU (process) seconds over ``repeat`` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - w)
    return min(walls), min(cpus)


def numpy_hash(x: np.ndarray, h: float, origin: float, step: float, M: int) -> np.ndarray:
    """Plain numpy KDE hashing on the lattice t_k = origin + k*step (k < M)."""
    counts, _ = np.histogram(x, bins=M, range=(origin - 0.5 * step, origin + (M - 0.5) * step))
    R = int(5.0 * h / step)
    j = np.arange(-R, R + 1) * (step / h)
    d = np.convolve(counts.astype(np.float64), np.exp(-0.5 * j * j), mode="same")
    grid = origin + step * np.arange(M)
    inner = d[1:-1]
    peaks = grid[1:-1][(inner > d[:-2]) & (inner >= d[2:])]
    edges = grid[1:-1][(inner < d[:-2]) & (inner <= d[2:])]
    edges = edges[(edges > peaks[0]) & (edges < peaks[-1])] if peaks.size else edges
    reps = peaks.astype(x.dtype)
    return reps[np.searchsorted(edges, x)] if reps.size else x.copy()


def crossover(kde) -> float:
    """Median over sizes of (direct s per MAC) / (FFT s per nfft*log2 nfft)."""
    ratios = []
    rng = np.random.default_rng(1)
    for M, R in ((1 << 12, 64), (1 << 14, 256), (1 << 16, 512), (1 << 18, 256)):
        w = rng.random(M)
        g = np.exp(-0.5 * (np.arange(-R, R + 1) / (R / 5)) ** 2)
        kde._convolve_direct(w[:16], g, R)
        t_direct = best_of(lambda: kde._convolve_direct(w, g, R), 3) / (M * (2 * R + 1))
        nfft = 1 << (M + 2 * R).bit_length()
        t_fft = best_of(lambda: np.fft.irfft(np.fft.rfft(w, nfft) * np.fft.rfft(g, nfft), nfft), 3)
        ratios.append(t_fft / (nfft * np.log2(nfft)) / t_direct)
    return float(np.median(ratios))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scipy-n", type=int, default=100_000)
    ap.add_argument("--warm-cache", action="store_true", help="use the normal numba cache (compile time ~0)")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    from red_onnx import kde

    import_s = time.perf_counter() - t
    small = mixture(2000, seed=3)
    t = time.perf_counter()
    kde.hash_values(small, kde.silverman_bandwidth(small))
    compile_s = time.perf_counter() - t

    x = mixture(args.n)
    t = time.perf_counter()
    h = kde.silverman_bandwidth(x)
    silverman_s = time.perf_counter() - t

    hashed, codebook = kde.hash_values(x, h)
    numba_s = wall_cpu(lambda: kde.hash_values(x, h), args.repeat)
    lloyd_s = wall_cpu(lambda: kde.hash_values(x, h, representative="lloyd"), args.repeat)
    # the same with about 256 entries, as a uint8 codebook has (more cells: more Lloyd steps, and a
    # bucket lookup instead of a count per value): the bandwidth halved until it has that many
    pooled = kde.PooledChannels(x, per_channel=False)
    h256 = h
    while pooled.codebook_size(h256 / pooled.reference) < 200:
        h256 /= 2
    entries = kde.hash_values(x, h256, representative="lloyd")[1].size
    lloyd256_s = wall_cpu(lambda: kde.hash_values(x, h256, representative="lloyd"), args.repeat)

    lo, hi = float(x.min()), float(x.max())
    lat = kde._plan(x, lo, hi, h, None)
    numpy_s = wall_cpu(lambda: numpy_hash(x, h, lat.origin, lat.step, lat.size), 1)

    factor = h / pooled.reference
    assert pooled.codebook_size(factor) == len(codebook)
    count_s = wall_cpu(lambda: pooled.codebook_size(factor), args.repeat)

    rows = [("numba (red_onnx.kde.hash_values)", args.n, numba_s, ""),
            ("numba + Lloyd centres (representative=\"lloyd\", the hash pass's)", args.n, lloyd_s,
             "+ a sort, prefix sums, the Lloyd steps from the basins, a cell lookup per value"),
            (f"numba + Lloyd centres, {entries} entries (h/{h / h256:g})", args.n, lloyd256_s,
             "about as many entries as a uint8 codebook holds"),
            ("basin count only (kde.PooledChannels.codebook_size)", args.n, count_s,
             "a bandwidth-search probe; the one sort per weight not included"),
            ("numpy (histogram + convolve + searchsorted)", args.n, numpy_s, "")]
    try:
        from scipy.stats import gaussian_kde

        sub = x[: args.scipy_n].astype(np.float64)
        grid = lat.origin + lat.step * np.arange(lat.size)
        est = gaussian_kde(sub, bw_method=h / sub.std(ddof=1))
        scale = args.n / sub.size
        scipy_s = tuple(t * scale for t in wall_cpu(lambda: est(grid), 1))
        rows.append((f"scipy gaussian_kde on the {lat.size} grid points", args.n, scipy_s,
                     f"extrapolated (x{scale:.0f}) from {sub.size:,} values; density only"))
    except ImportError:
        pass

    # phases of the numba path (CPU seconds)
    c = {}
    c["min/max + NaN check (numpy)"] = best_of(lambda: kde._prepare(x), args.repeat, time.process_time)
    inv = 1.0 / lat.step
    c["linear binning (numba)"] = best_of(
        lambda: kde._bin_dense(x, lat.origin, inv, np.zeros(lat.size, np.int64), False), args.repeat, time.process_time)
    c["density, extrema, basin lookup + nearest members (numba)"] = best_of(
        lambda: kde._analyze(x, lo, hi, h, None), args.repeat, time.process_time) - c["linear binning (numba)"]
    info, lab, _ = kde._analyze(x, lo, hi, h, None)
    out = np.empty_like(x)
    reps = info.modes.astype(x.dtype)
    c["gather representatives (numba)"] = best_of(lambda: kde._gather(reps, lab, out), args.repeat, time.process_time)

    # basin assignment alone: np.searchsorted + take instead of the numba lookup
    search_s = best_of(lambda: reps[np.searchsorted(info.edges, x, side="right")], 1, time.process_time)

    lines = []

    def out(text=""):
        print(text)
        lines.append(text)

    out(f"# KDE hashing speed, 1 core (NUMBA_NUM_THREADS=1), {args.n:,} float32 weights\n")
    out(f"bandwidth h = {h:.4g} (Silverman, {silverman_s:.2f} s, not included below), lattice {lat.size} "
        f"points (step {lat.step:.3g}), {len(codebook)} modes")
    out(f"numba JIT compile (cold cache, all kernels for float32): {compile_s:.2f} s; import {import_s:.2f} s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    out("| method | weights | wall s | CPU s | weights/s (wall) | weights/s (CPU) | note |")
    out("|---|---:|---:|---:|---:|---:|---|")
    for name, n, (wall, cpu), note in rows:
        out(f"| {name} | {n:,} | {wall:.3f} | {cpu:.3f} | {n / wall:,.0f} | {n / cpu:,.0f} | {note} |")
    out("\nnumba path, CPU seconds by phase:\n")
    out("| phase | CPU s |")
    out("|---|---:|")
    for name, t in c.items():
        out(f"| {name} | {t:.3f} |")
    out(f"\nassignment by np.searchsorted(edges, x) + take instead: {search_s:.3f} CPU s "
        f"(numba lookup: part of the third phase)")
    out(f"direct/FFT crossover constant (FFT s per n log2 n / direct s per MAC): {crossover(kde):.1f} "
        f"(kde._FFT_RATIO = {kde._FFT_RATIO})")

    if args.n == 50_000_000:
        Path(__file__).with_name("kde_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
