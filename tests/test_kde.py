"""KDE hashing (red_onnx.kde): agreement with scipy's gaussian_kde, edge cases, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from red_onnx import kde

scipy_stats = pytest.importorskip("scipy.stats")


def mixture(seed: int, n: int = 1500) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    mu = rng.uniform(-3, 3, k)
    sd = rng.uniform(0.15, 0.6, k)
    comp = rng.integers(0, k, n)
    return (mu[comp] + sd[comp] * rng.standard_normal(n)).astype(np.float64)


def run_extrema(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain-python reference: centres (index units) of maximal/minimal runs, outside = -inf."""
    runs = []  # (start, end, value)
    i = 0
    while i < d.size:
        j = i
        while j + 1 < d.size and d[j + 1] == d[i]:
            j += 1
        runs.append((i, j, d[i]))
        i = j + 1
    maxs, mins = [], []
    for r, (a, b, v) in enumerate(runs):
        prev = runs[r - 1][2] if r else -np.inf
        nxt = runs[r + 1][2] if r + 1 < len(runs) else -np.inf
        if v > prev and v > nxt:
            maxs.append(0.5 * (a + b))
        elif v < prev and v < nxt:
            mins.append(0.5 * (a + b))
    return np.array(maxs), np.array(mins)


def check_partition(x: np.ndarray, hashed: np.ndarray, codebook: np.ndarray, b: kde.Basins) -> None:
    """Every value hashes to the representative of the basin it lies in, and stays within it."""
    xf = x.astype(np.float64).ravel()
    hf = hashed.astype(np.float64).ravel()
    assert np.all(np.diff(b.modes) > 0) and np.all(np.diff(b.edges) > 0)
    assert b.edges.size == b.modes.size - 1
    assert np.array_equal(np.unique(hf), codebook.astype(np.float64))
    assert np.array_equal(codebook.astype(np.float64), b.modes)
    k = np.searchsorted(b.edges, xf, side="right")  # edges[k-1] <= x < edges[k]
    assert np.array_equal(hf, b.modes[k])
    lo = np.concatenate(([xf.min()], b.edges))
    hi = np.concatenate((b.edges, [xf.max()]))
    assert np.all(lo <= b.modes) and np.all(b.modes <= hi)
    assert np.array_equal(np.searchsorted(b.edges, b.modes, side="right"), np.arange(b.modes.size))
    assert np.all(np.abs(xf - hf) <= hi[k] - lo[k])
    assert b.counts.sum() == xf.size and np.all(b.counts > 0)
    assert np.array_equal(b.counts, np.bincount(k, minlength=b.modes.size))


# ---------------------------------------------------------------------------------- scipy agreement


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_modes_and_edges_match_scipy(seed, factor):
    x = mixture(seed)
    h = factor * kde.silverman_bandwidth(x)
    grid, dens = kde.kde_density(x, h)
    b = kde.kde_basins(x, h)
    step = grid[1] - grid[0]
    assert np.allclose(np.diff(grid), step) and step <= h / 4 * (1 + 1e-12)
    assert grid[0] <= x.min() - 4 * h and grid[-1] >= x.max() + 4 * h
    ref = scipy_stats.gaussian_kde(x, bw_method=h / x.std(ddof=1))(grid)
    assert np.abs(dens - ref).max() <= 2e-3 * ref.max()
    maxs, mins = run_extrema(ref)
    peaks = grid[0] + step * maxs
    edges = grid[0] + step * mins
    assert b.peaks.size == peaks.size and b.edges.size == edges.size
    assert np.abs(b.peaks - peaks).max() <= 2 * step
    if edges.size:
        assert np.abs(b.edges - edges).max() <= 2 * step
    hashed, codebook = kde.hash_values(x, h)
    check_partition(x, hashed, codebook, b)


def test_density_integrates_to_one_and_fft_path_agrees():
    x = mixture(11, 3000)
    h = kde.silverman_bandwidth(x)
    grid, dens = kde.kde_density(x, h)
    assert abs(dens.sum() * (grid[1] - grid[0]) - 1) < 1e-12
    fine_grid, fine = kde.kde_density(x, h, grid_size=1 << 15)  # 2R+1 ~ 7000 taps: FFT convolution
    assert fine_grid.size == 1 << 15 and abs(fine.sum() * (fine_grid[1] - fine_grid[0]) - 1) < 1e-12
    ref = scipy_stats.gaussian_kde(x, bw_method=h / x.std(ddof=1))(fine_grid)
    assert np.abs(fine - ref).max() <= 1e-4 * ref.max()
    default, fft = kde.kde_basins(x, h), kde.kde_basins(x, h, grid_size=1 << 15)
    assert default.peaks.size == fft.peaks.size
    assert np.abs(default.peaks - fft.peaks).max() <= 2 * default.step


@pytest.mark.parametrize("size, taps, fill", [(1, 20, 1.0), (30, 20, 1.0), (5000, 20, 1.0), (5000, 20, 0.3),
                                               (3000, 600, 1.0), (70, 600, 0.5)])
def test_tap_loop_convolution_equals_the_sparse_one_bit_for_bit(size, taps, fill):
    """The vectorized tap loop (dense bins) and the scatter loop that skips empty bins add the same
    products in the same order: bit-identical densities, tiles and array ends included."""
    rng = np.random.default_rng(size + taps)
    w = (rng.integers(0, 1 << 31, size) * (rng.random(size) < fill)).astype(np.float64)
    g = np.exp(-0.5 * (np.arange(-taps, taps + 1) / (taps / 5)) ** 2)
    expected = kde._convolve_direct(w, g, taps)
    assert np.array_equal(kde._convolve_taps(w, g, taps).view(np.int64), expected.view(np.int64))
    assert np.allclose(expected, np.convolve(w, g)[taps:taps + size], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- edge cases


def test_empty():
    for shape in [(0,), (3, 0)]:
        x = np.zeros(shape, np.float32)
        hashed, codebook = kde.hash_values(x, 0.1)
        assert hashed.shape == shape and hashed.dtype == np.float32 and codebook.size == 0
    modes, edges = kde.basins(np.zeros(0), 1.0)
    assert modes.size == 0 and edges.size == 0
    grid, dens = kde.kde_density(np.zeros(0), 1.0)
    assert grid.size == 0 and dens.size == 0


@pytest.mark.parametrize("h", [1e-9, 0.1, 1e6])
def test_constant(h):
    x = np.full((4, 5), 0.3, np.float32)
    hashed, codebook = kde.hash_values(x, h)
    assert np.array_equal(hashed, x) and hashed.dtype == np.float32 and codebook.tolist() == [np.float32(0.3)]
    modes, edges = kde.basins(x, h)
    assert modes.tolist() == [float(np.float32(0.3))] and edges.size == 0


def test_two_valued():
    x = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    hashed, codebook = kde.hash_values(x, 0.1)
    assert np.array_equal(hashed, x) and codebook.tolist() == [0.0, 1.0]
    modes, edges = kde.basins(x, 0.1)
    assert modes.tolist() == [0.0, 1.0] and edges.size == 1 and abs(edges[0] - 0.5) <= 0.1 / 4
    hashed, codebook = kde.hash_values(x, 3.0)  # one mode, pulled towards the heavier value
    assert codebook.tolist() == [0.0] and np.all(hashed == 0.0)
    _, codebook = kde.hash_values(np.array([1.0, 2.0]), 10.0)  # symmetric: tie -> smaller
    assert codebook.tolist() == [1.0]


@pytest.mark.parametrize("values", [[0.7], [0.2, -0.4], [1.0, 1.5, -3.0], [5.0, 5.0, 5.000001]])
def test_tiny(values):
    x = np.array(values, np.float32)
    for h in [1e-9, 1e-3, 0.3, 1.0, 100.0, 1e30]:
        hashed, codebook = kde.hash_values(x, h)
        check_partition(x, hashed, codebook, kde.kde_basins(x, h))
    assert np.array_equal(kde.hash_values(x, 1e-9)[0], x)
    assert kde.hash_values(x, 1e30)[1].size == 1


def test_heavy_tails_sparse_lattice_equals_dense(monkeypatch):
    x = np.random.default_rng(5).standard_cauchy(20000).astype(np.float32)
    h = kde.silverman_bandwidth(x)
    dense = kde.kde_basins(x, h)
    hashed, codebook = kde.hash_values(x, h)
    check_partition(x, hashed, codebook, dense)
    assert 10 < codebook.size < 2000
    far = np.abs(x) > 1e3  # isolated outliers are their own modes
    assert far.sum() > 3 and np.array_equal(hashed[far], x[far])
    monkeypatch.setattr(kde, "MAX_GRID", 1 << 14)  # forces the sparse lattice
    sparse = kde.kde_basins(x, h)
    assert np.array_equal(sparse.modes, dense.modes) and np.array_equal(sparse.edges, dense.edges)
    assert np.array_equal(sparse.counts, dense.counts)
    assert np.array_equal(kde.hash_values(x, h)[0], hashed)
    monkeypatch.setattr(kde, "MAX_GRID", 1 << 10)  # forces coarsening: still a valid hashing
    hashed2, codebook2 = kde.hash_values(x, h)
    check_partition(x, hashed2, codebook2, kde.kde_basins(x, h))
    assert codebook2.size < codebook.size and np.array_equal(hashed2[np.abs(x) > 1e5], x[np.abs(x) > 1e5])


def test_empty_basins_are_absorbed(monkeypatch):
    # h ~ spacing of the values: the KDE has maxima whose basins hold no value
    x = np.r_[np.random.default_rng(1909).uniform(0, 1, 12), 1000.0]
    h = 0.5 / 12
    lat = kde._plan(x, x.min(), x.max(), h, None)
    d, _, s0, s1, slat, _ = kde._lattice_density(x, lat, h, x.min(), x.max())
    assert kde._extrema(d, s0, s1, slat)[0].size > kde.hash_values(x, h)[1].size  # some basin was empty
    dense = kde.kde_basins(x, h)
    check_partition(x, *kde.hash_values(x, h), dense)
    monkeypatch.setattr(kde, "MAX_GRID", 4096)  # sparse lattice, same step
    sparse = kde.kde_basins(x, h)
    assert sparse.step == dense.step
    assert np.array_equal(sparse.modes, dense.modes) and np.array_equal(sparse.edges, dense.edges)
    check_partition(x, *kde.hash_values(x, h), sparse)


def test_huge_range():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.standard_normal(1000), [-1e6, 3e7, 3e7 + 0.5, 2.5e5]])
    hashed, codebook = kde.hash_values(x, 0.01)  # range / step ~ 1e10: sparse lattice
    check_partition(x, hashed, codebook, kde.kde_basins(x, 0.01))
    assert np.array_equal(hashed[-4:], x[-4:]) and codebook.size > 50
    absurd = np.array([-1e30, -1.0, -0.999, 0.0, 0.001, 1e-30, 2.0, 3e25])  # coarsened, still a partition
    hashed, codebook = kde.hash_values(absurd, 0.01)
    check_partition(absurd, hashed, codebook, kde.kde_basins(absurd, 0.01))
    assert codebook[0] == -1e30 and codebook[-1] == 3e25
    sub = np.array([5e-324, 0.0, 1e-310, 0.0])  # subnormal range and bandwidths
    for h in [1e-320, 1e-300, 1.0]:
        for grid_size in [None, 100]:
            hashed, codebook = kde.hash_values(sub, h, grid_size)
            check_partition(sub, hashed, codebook, kde.kde_basins(sub, h, grid_size))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_and_shape_preserved(dtype):
    x = mixture(3, 600).reshape(6, 10, 10).astype(dtype)
    hashed, codebook = kde.hash_values(x, 0.3)
    assert hashed.dtype == dtype and codebook.dtype == dtype and hashed.shape == x.shape
    assert set(np.unique(hashed).tolist()) <= set(x.ravel().tolist())  # the codebook is made of weights
    check_partition(x, hashed, codebook, kde.kde_basins(x, 0.3))
    hashed, codebook, idx = kde.hash_values(x, 0.3, return_indices=True)
    assert idx.shape == x.shape and np.array_equal(codebook[idx], hashed)


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        kde.hash_values(np.array([0.0, np.nan, 1.0], np.float32), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        kde.silverman_bandwidth(np.array([np.nan]))
    with pytest.raises(ValueError, match="inf"):
        kde.basins(np.array([0.0, np.inf]), 0.1)
    for h in [0.0, -1.0, np.nan, np.inf]:
        with pytest.raises(ValueError, match="bandwidth"):
            kde.hash_values(np.ones(3), h)
    with pytest.raises(TypeError):
        kde.hash_values(np.arange(3), 1.0)
    with pytest.raises(ValueError, match="grid_size"):
        kde.kde_density(np.ones(3), 1.0, grid_size=1)


# ---------------------------------------------------------------------------------- behaviour


def test_tiny_bandwidth_is_identity():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10000).astype(np.float32)
    for h in [1e-12, 1e-9]:  # sparse lattice: every value isolated
        assert np.array_equal(kde.hash_values(x, h)[0], x)
    y = np.arange(50) * 0.01 + rng.uniform(-1e-3, 1e-3, 50)  # dense lattice, gaps >= 8h
    hashed, codebook = kde.hash_values(y, 0.001)
    assert codebook.size == 50 and np.array_equal(hashed, y)


def test_large_bandwidth_one_mode():
    x = mixture(4, 2000).astype(np.float32)
    for h in [2 * np.ptp(x), 1e3, 1e300]:
        hashed, codebook = kde.hash_values(x, h)
        assert codebook.size == 1
        assert abs(float(codebook[0]) - x.mean()) < 0.05 * np.ptp(x)  # wide kernel: mode -> mean


def test_distinct_values_non_increasing_in_bandwidth():
    for seed in range(3):
        x = mixture(seed, 4000).astype(np.float32)
        s = kde.silverman_bandwidth(x)
        counts = [kde.hash_values(x, f * s)[1].size for f in np.geomspace(0.01, 20, 25)]
        assert all(a >= b for a, b in zip(counts, counts[1:])), counts
        assert counts[0] > 100 and counts[-1] == 1


def test_plateaus_and_extrema():
    d = np.array([0, 1, 2, 2, 1, 0, 0, 1, 3, 3, 3, 1, 1, 2, 0], np.float64)
    z = np.zeros(1, np.int64)
    pk, e2, ev, npk, ned = kde._extrema(d, z, np.array([d.size]), z)
    assert pk.tolist() == [2.5, 9.0, 13.0] and (e2 / 2).tolist() == [5.5, 11.5] and ev.tolist() == [0, 1]
    maxs, mins = run_extrema(d)
    assert maxs.tolist() == pk.tolist() and mins.tolist() == (e2 / 2).tolist()
    keep_b, keep_e = kde._keep_nonempty(np.array([1, 0, 0, 2]), np.array([3.0, 1.0, 2.0]))
    assert keep_b.tolist() == [True, False, False, True] and keep_e.tolist() == [False, True, False]


def test_bandwidth_rules():
    x = np.random.default_rng(2).standard_normal(5000)
    n, sd = x.size, x.std(ddof=1)
    iqr = np.subtract(*np.quantile(x, [0.75, 0.25])) / 1.3489795
    assert kde.silverman_bandwidth(x) == pytest.approx(0.9 * min(sd, iqr) * n ** -0.2)
    scipy_scott = scipy_stats.gaussian_kde(x, bw_method="scott").factor * sd
    assert kde.scott_bandwidth(x) == pytest.approx(1.059 * scipy_scott)
    assert kde.silverman_bandwidth(np.full(7, 2.0)) > 0 and kde.scott_bandwidth(np.zeros(1)) > 0
    assert kde.silverman_bandwidth(np.r_[np.zeros(100), 1.0]) > 0  # IQR 0 -> sd
    rng = np.random.default_rng(3)  # the radix-select quartiles behind it
    for dtype in [np.float32, np.float64]:
        for v in [rng.standard_cauchy(3001), np.round(rng.standard_normal(999)), np.r_[-0.0, 0.0, -1e-30, 5.0],
                  np.array([2.5])]:
            v = v.astype(dtype)
            ranks = rng.integers(0, v.size, 7)
            assert np.array_equal(kde._order_statistics(v, ranks), np.sort(v)[ranks].astype(np.float64))


# ---------------------------------------------------------------------------------- properties

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
arrays = st.one_of(
    hnp.arrays(np.float64, st.integers(1, 300), elements=finite),
    hnp.arrays(np.float64, st.integers(1, 300), elements=st.sampled_from([-2.0, -1.5, 0.0, 0.25, 0.3, 7.0])),
    st.integers(1, 400).flatmap(lambda n: st.integers(0, 2**32 - 1).map(
        lambda s: np.random.default_rng(s).standard_normal(n) * np.random.default_rng(s).uniform(1e-3, 10))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays, log_h=st.floats(-4, 2), dtype=st.sampled_from([np.float32, np.float64]))
def test_hash_properties(x, log_h, dtype):
    x = x.astype(dtype)
    h = 10.0**log_h
    hashed, codebook = kde.hash_values(x, h)
    b = kde.kde_basins(x, h)
    check_partition(x, hashed, codebook, b)
    assert hashed.dtype == dtype and np.isin(hashed, codebook).all()
    if np.unique(x).size == 1:
        assert np.array_equal(hashed, x)
    perm = np.random.default_rng(x.size).permutation(x.size)  # exact binning: order does not matter
    assert np.array_equal(kde.hash_values(x[perm], h)[0], hashed[perm])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays, log_h=st.floats(-4, 2), dtype=st.sampled_from([np.float32, np.float64]))
def test_mean_representative_properties(x, log_h, dtype):
    """The same basins as the mode; each value is replaced by its basin's mean (to the dtype's
    rounding), which never has more squared error than the mode; a one-valued basin keeps its value."""
    x = x.astype(dtype)
    h = 10.0**log_h
    _, modes, idx = kde.hash_values(x, h, return_indices=True)
    hashed, means, idx_mean = kde.hash_values(x, h, return_indices=True, representative="mean")
    assert np.array_equal(idx_mean, idx) and hashed.dtype == dtype and means.size == modes.size
    assert np.array_equal(kde.hash_values(x, h, representative="mean")[0], hashed)
    x64 = x.astype(np.float64)
    for k in range(means.size):
        members = x64[idx == k]
        if np.unique(members).size == 1:
            assert means[k] == members[0]
        else:
            fi = np.finfo(dtype)  # rounding to the dtype (subnormals too), and summation error in float64
            tol = 2 * fi.eps * abs(members.mean()) + fi.smallest_subnormal + 4 * members.size * 2.0**-52 * np.abs(members).max()
            assert abs(means[k] - members.mean()) <= tol
    eps = 4 * np.finfo(dtype).eps * np.abs(x64).max()
    assert np.sum((hashed - x64) ** 2) <= np.sum((modes[idx] - x64) ** 2) + x.size * eps**2 + 1e-300
    with pytest.raises(ValueError, match="representative"):
        kde.hash_values(x, h, representative="median")


def _lloyd_oracle(x, centres):
    """Plain Lloyd: every value to its nearest centre (ties at a midpoint: the upper), centres to
    their cells' means (empty cells dropped), until the assignment repeats."""
    c, previous = np.unique(centres), None
    while True:
        cell = np.searchsorted(0.5 * (c[1:] + c[:-1]), x, side="right")
        if previous is not None and np.array_equal(cell, previous):
            return c
        used = np.unique(cell)
        c = np.array([x[cell == k].mean() for k in used])
        previous = np.searchsorted(used, cell)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays, log_h=st.floats(-4, 2), dtype=st.sampled_from([np.float32, np.float64]))
@example(x=np.array([-0.2] + [0.0] * 94), log_h=0.0, dtype=np.float64)  # SSEs 12 ulps apart under np.sum
@example(x=np.array([1.17549435e-38, 0.0]), log_h=0.0, dtype=np.float32)  # an SSE of 7e-77: float32 bound math underflowed
def test_lloyd_representative_properties(x, log_h, dtype):
    """Lloyd from the basin means: the centres a plain Lloyd loop reaches from the same start, at
    most as many entries and never more squared error than the means, each value at its nearest
    entry, a one-valued cell exact."""
    x = x.astype(dtype)
    h = 10.0**log_h
    mean_hashed, means, _ = kde.hash_values(x, h, return_indices=True, representative="mean")
    hashed, centres, idx = kde.hash_values(x, h, return_indices=True, representative="lloyd")
    assert hashed.dtype == dtype and centres.size <= means.size
    assert np.array_equal(kde.hash_values(x, h, representative="lloyd")[0], hashed)
    x64 = x.astype(np.float64)
    oracle = _lloyd_oracle(x64, np.unique(means.astype(np.float64)))
    fi = np.finfo(dtype)
    tol = 4 * fi.eps * np.abs(x64).max() + fi.smallest_subnormal
    summed = tol + 4 * x.size * 2.0**-52 * np.abs(x64).max()  # float64 summation error of a mean
    assert oracle.size == centres.size and np.allclose(centres, oracle, rtol=0, atol=summed)
    for k in range(centres.size):
        members = x64[idx == k]
        assert members.size and (np.unique(members).size > 1 or centres[k] == members[0])
    nearest = np.abs(x64[:, None] - centres.astype(np.float64)[None, :]).min(1)
    assert np.all(np.abs(hashed - x64) <= nearest + 2 * tol)
    # exact sums of the squared errors: np.sum's rounding (about log2(n) ulps) would decide a near tie;
    # each stored value is within tol of its exact centre, so ||h − x|| <= ||m − x|| + sqrt(n)·tol
    mean_sse = math.fsum((mean_hashed - x64) ** 2)
    bound = (math.sqrt(mean_sse * (1 + 8 * float(fi.eps))) + math.sqrt(x.size) * float(tol)) ** 2
    assert math.fsum((hashed - x64) ** 2) <= bound + 1e-300


@pytest.mark.parametrize("k", [1, 2, 7, 300])
def test_cells_of_matches_searchsorted(k):
    """The bucket lookup that labels Lloyd's cells agrees with binary search, values on the cell
    starts and at both ends included."""
    rng = np.random.default_rng(k)
    x = (rng.laplace(size=5000) * 0.1).astype(np.float32)
    starts = np.unique(np.concatenate(([x.min()], rng.choice(x, k - 1)))).astype(np.float64)
    x = np.concatenate((x, starts.astype(np.float32), [x.max()]))
    out = np.empty(x.size, np.int32)
    entries = np.arange(starts.size, dtype=np.float32) * 3 + 1
    kde._cells_of(x, starts, out, entries[:0], entries[:0])
    assert np.array_equal(out, np.searchsorted(starts[1:], x, side="right"))
    values = np.empty_like(x)
    kde._cells_of(x, starts, out[:0], entries, values)  # the entries written directly
    assert np.array_equal(values, entries[out])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lloyd_search_helpers_match_numpy(dtype):
    """The blocked prefix sums give the running float64 sum at every index bit for bit, and the
    binary search in float64 agrees with np.searchsorted (ties and both ends included)."""
    rng = np.random.default_rng(3)
    xs = np.sort(rng.standard_normal(1000).astype(dtype))  # not a multiple of the block
    xs[500:600] = xs[500]
    blocks = np.empty(xs.size // kde.PREFIX_BLOCK + 1)
    kde._prefix_sums(xs, blocks)
    running = np.concatenate(([0.0], np.cumsum(xs.astype(np.float64))))
    assert all(kde._prefix_at(xs, blocks, i) == running[i] for i in range(xs.size + 1))
    keys = np.sort(np.concatenate((rng.standard_normal(50), xs[[0, 500, 999]].astype(np.float64), [-10.0, 10.0],
                                   np.nextafter(xs[[500]].astype(np.float64), -1))))
    assert np.array_equal(kde._first_at_least(xs, keys), np.searchsorted(xs, keys, side="left"))


def test_lloyd_lowers_error_on_heavy_tails():
    """Where the KDE's basins fit badly (Laplace values, one bandwidth for the whole range), Lloyd
    keeps the number of entries and cuts the error several times."""
    x = np.random.default_rng(0).laplace(size=20_000)
    mean_err = np.linalg.norm(kde.hash_values(x, 0.05, representative="mean")[0] - x)
    hashed, centres = kde.hash_values(x, 0.05, representative="lloyd")
    assert centres.size == kde.hash_values(x, 0.05, representative="mean")[1].size
    assert np.linalg.norm(hashed - x) < 0.3 * mean_err


@settings(max_examples=40, deadline=None)
@given(x=arrays, log_h=st.floats(-3, 1))
def test_sparse_lattice_matches_dense(x, log_h):
    h = 10.0**log_h
    dense = kde.kde_basins(x, h)
    saved = kde.MAX_GRID
    kde.MAX_GRID = 64
    try:
        sparse = kde.kde_basins(x, h)
        hashed, codebook = kde.hash_values(x, h)
    finally:
        kde.MAX_GRID = saved
    check_partition(x, hashed, codebook, sparse)
    if sparse.step == dense.step:  # not coarsened: identical to the dense lattice's result
        assert np.array_equal(sparse.modes, dense.modes) and np.array_equal(sparse.edges, dense.edges)


# ---------------------------------------------------------------------------------- per channel


def _onnxruntime_gather_mul(codebook, idx, scales_b):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["codebook", "idx"], ["g"], axis=0), helper.make_node("Mul", ["g", "s"], ["y"])],
        "hash", [helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scales_b.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(codebook, "codebook"),
                     numpy_helper.from_array(idx.astype(np.int64), "idx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"s": scales_b})[0]


@pytest.mark.parametrize("representative", ["mode", "mean", "lloyd"])
@pytest.mark.parametrize("scale", ["maxabs", "std", "pow2"])
def test_hash_channels_is_gather_times_scale_bit_for_bit(scale, representative):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((16, 8, 3, 3)) * rng.uniform(0.01, 3.0, (16, 1, 1, 1))).astype(np.float32)
    w[3] = 0.0  # an all-zero channel
    w[5, 0, 0, 0] = 0.0
    hashed, codebook, scales, idx = kde.hash_channels(w, 0.1, per_channel=True, scale=scale, return_indices=True,
                                                      representative=representative)
    assert hashed.dtype == codebook.dtype == scales.dtype == np.float32 and scales.shape == (16,)
    assert scales[3] == 0 and np.all(scales[np.arange(16) != 3] > 0)
    assert idx.shape == w.shape and idx.dtype == np.int32
    sb = scales.reshape(16, 1, 1, 1)
    assert np.array_equal((codebook[idx] * sb).view(np.uint32), hashed.view(np.uint32))
    assert np.array_equal(_onnxruntime_gather_mul(codebook, idx, sb).view(np.uint32), hashed.view(np.uint32))
    assert np.all(hashed[3] == 0) and 10 < codebook.size < 200
    err = np.linalg.norm((hashed - w).reshape(16, -1), axis=1)
    assert np.all(err <= 0.1 * np.linalg.norm(w.reshape(16, -1), axis=1))  # every channel keeps its scale
    h2, c2, s2 = kde.hash_channels(w, 0.1, per_channel=True, scale=scale, representative=representative)
    assert np.array_equal(h2, hashed) and np.array_equal(c2, codebook) and np.array_equal(s2, scales)


def test_hash_channels_identity_and_per_tensor():
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((8, 50)) * rng.uniform(0.1, 2.0, (8, 1))).astype(np.float32)
    hashed, codebook, scales = kde.hash_channels(w, 1e-9, per_channel=True, scale="pow2")
    assert np.array_equal(hashed, w) and np.all(np.log2(scales) % 1 == 0)  # powers of two: exact round trip
    hashed, codebook, scales = kde.hash_channels(w, 0.3, per_channel=False)
    assert np.all(scales == 1) and scales.shape == (8,)
    ref, ref_cb = kde.hash_values(w, 0.3 * kde.silverman_bandwidth(w))
    assert np.array_equal(hashed, ref) and np.array_equal(codebook, ref_cb)
    h16, cb16, s16 = kde.hash_channels(w.astype(np.float16), 0.3, per_channel=True)
    assert h16.dtype == cb16.dtype == s16.dtype == np.float16
    for shape in [(3, 0), (0, 4), ()]:
        z = np.zeros(shape, np.float32)
        hz, cz, sz = kde.hash_channels(z, 0.3, per_channel=True)
        assert hz.shape == shape and np.all(hz == 0)
    hz, cz, sz, iz = kde.hash_channels(np.zeros((2, 3), np.float32), 0.3, per_channel=True, return_indices=True)
    assert np.all(hz == 0) and np.all(sz == 0) and np.array_equal(cz[iz] * sz[:, None], hz)
    with pytest.raises(ValueError, match="bandwidth_factor"):
        kde.hash_channels(w, 0.0, per_channel=True)
    with pytest.raises(ValueError, match="scale"):
        kde.hash_channels(w, 0.1, per_channel=True, scale="nope")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays, rows=st.integers(1, 6), log_f=st.floats(-5, 1), scale=st.sampled_from(["maxabs", "pow2"]),
       dtype=st.sampled_from([np.float32, np.float64]), zero_row=st.booleans())
def test_pooled_codebook_size_is_hash_channels_codebook_size(x, rows, log_f, scale, dtype, zero_row):
    """The count a bandwidth search probes with equals the codebook the weight then gets."""
    w = np.resize(x, (rows, max(x.size // rows, 1))).astype(dtype)
    if zero_row:
        w[0] = 0
    pooled = kde.PooledChannels(w, True, scale=scale)
    f = 10.0**log_f
    hashed, codebook, _ = kde.hash_channels(w, f, per_channel=True, scale=scale, reference_bandwidth=pooled.reference)
    assert pooled.codebook_size(f) == codebook.size
    assert np.array_equal(hashed, kde.hash_channels(w, f, per_channel=True, scale=scale)[0])
