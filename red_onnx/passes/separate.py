"""Uneven depthwise separation ("input splitting") of convolutions (RED++).

Math.  A Conv with weight ``W`` of shape ``(O, I/g, *k)`` and ``g`` groups
computes, for output channel ``o`` of group ``G`` and local input channel ``i``
of that group, ``y_o = sum_i W[o, i] * x_{G*I/g + i}`` (``*`` = correlation with
the conv's strides / dilations / pads).  Per group ``G`` and input channel ``i``
let ``M = W[G*Og:(G+1)*Og, i].reshape(Og, K)`` (``Og = O/g``, ``K = prod(k)``).
Any factorisation ``M = A @ B`` with ``A`` ``(Og, u)`` and ``B`` ``(u, K)`` gives

    y_o = sum_i sum_j A[o, j] * (B[j] * x_i)

i.e. ``Gather`` (input channel ``i`` repeated ``u_i`` times, axis 1) ->
depthwise Conv (``group = sum u``, weight = all rows ``B[j]`` stacked,
``(sum u, 1, *k)``, original strides / dilations / pads / auto_pad) -> 1x1 Conv
(weight built from the columns of the ``A``'s, original bias).  MACs per output
pixel go from ``O * (I/g) * K`` to ``U*K + O*U/pg`` (``U`` = depthwise channels,
``pg`` = group of the 1x1 conv).

Factorisations:
  * exact, "distinct kernels up to a scalar": rows of ``M`` that are +-scalar
    multiples of each other share one kernel (``B`` = the representatives,
    ``A`` = the scalars, one non-zero per row); zero rows need no kernel,
  * exact, numerical rank: truncated SVD at ``sigma > rtol * sigma_max``,
  * lossy: SVD truncated at a chosen per-channel rank (Eckart-Young optimal).
``plan_exact`` takes, per channel, the smaller of the two exact counts.

Layout decisions:
  * depthwise channel order is group-major, then input-channel-major, so when
    every ``u_i`` equals ``m`` the Gather indices are ``repeat(arange(I), m)``
    but only m = 1 drops the Gather (a plain depthwise Conv): onnxruntime runs a
    depth-multiplier Conv (``group = I``, ``I*m`` outputs) much slower than
    Gather + depthwise (``group = I*m``), measured in ``SeparationPlan.uses_gather``.
  * ``g > 1``: the 1x1 Conv is either a group-``g`` Conv (each group's block of
    depthwise channels padded with zero kernels to the largest group's count --
    the padding costs depthwise MACs) or a dense 1x1 Conv with a block-diagonal
    weight; whichever has fewer MACs (ties: grouped).  Both are exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..budget import Candidate
from ..context import Context, PassResult
from ..layers import find_layers, unique_name

__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_LADDER_ERRORS",
    "SeparationPlan",
    "conv_weight",
    "plan_exact",
    "plan_lowrank",
    "lowrank_weight",
    "lowrank_ladder",
    "apply_plan",
]

DEFAULT_RTOL = 1e-6
#: relative Frobenius weight errors at which ``lowrank_ladder`` cuts by default
DEFAULT_LADDER_ERRORS = (1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3)


# --------------------------------------------------------------------------- #
# plan
# --------------------------------------------------------------------------- #
@dataclass
class SeparationPlan:
    """A separation of one Conv weight ``W`` (O, I/g, *k) into Gather->dw->1x1.

    ``u[G][i]``: kernels for local input channel ``i`` of group ``G`` (true
    counts, zero-kernel padding excluded).  ``depthwise_weight`` (U, 1, *k),
    ``gather_indices`` (U,) int64 (global input channel of each depthwise
    channel), ``pointwise_weight`` (O, U / pointwise_group): the 1x1 Conv
    weight as ONNX wants it (spatial dims dropped); for ``pointwise_group = 1``
    it is the full (O, U) matrix (block-diagonal when g > 1), for
    ``pointwise_group = g`` row ``o`` of group G holds the columns of block G
    (``dense_pointwise()`` expands it to (O, U)).
    ``W'[o, i] = sum_{c: gather[c] = i} P[o, c] * dw[c]``, P = dense_pointwise().
    ``weight_error`` = ||W - W'||_F / ||W||_F measured in float64 on the
    factors as stored (float rounding only, <= ~rtol, for exact plans).
    """

    u: list[np.ndarray]
    depthwise_weight: np.ndarray
    pointwise_weight: np.ndarray
    gather_indices: np.ndarray
    pointwise_group: int
    macs_per_pixel_before: int
    macs_per_pixel_after: int
    exact: bool
    weight_error: float
    group: int
    weight_shape: tuple[int, ...]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.group

    @property
    def depthwise_channels(self) -> int:
        return int(self.depthwise_weight.shape[0])

    @property
    def uses_gather(self) -> bool:
        """False when every input channel has one kernel, in order: a plain depthwise conv.

        A depth multiplier m > 1 keeps the Gather: measured with onnxruntime 1.32 (CPU, one
        thread), a Conv with ``group = I`` and ``m·I`` outputs ran 1.2-1.8x slower than
        Gather + a Conv with ``group = m·I`` (its depthwise fast path needs one output per group).
        """
        return not np.array_equal(self.gather_indices, np.arange(self.in_channels))

    @property
    def saving(self) -> float:
        """Fraction of MACs removed: 1 - after / before (negative = more work)."""
        return 1.0 - self.macs_per_pixel_after / self.macs_per_pixel_before

    def worthwhile(self, min_saving: float = 0.1) -> bool:
        return self.saving >= min_saving

    def dense_pointwise(self) -> np.ndarray:
        """Full (O, U) pointwise matrix (block-diagonal for a grouped 1x1 conv)."""
        pg = self.pointwise_group
        if pg == 1:
            return self.pointwise_weight
        o, blk = self.pointwise_weight.shape
        out = np.zeros((o, blk * pg), dtype=self.pointwise_weight.dtype)
        og = o // pg
        for gi in range(pg):
            out[gi * og:(gi + 1) * og, gi * blk:(gi + 1) * blk] = \
                self.pointwise_weight[gi * og:(gi + 1) * og]
        return out

    def reconstruct(self) -> np.ndarray:
        """``W'`` (float64, weight shape) represented by the plan."""
        o, ig = self.weight_shape[:2]
        og = o // self.group
        k = int(np.prod(self.kernel_shape))
        dw = self.depthwise_weight.reshape(-1, k).astype(np.float64)
        pw = self.pointwise_weight.astype(np.float64)
        blk = pw.shape[1]
        out = np.zeros((o, ig, k))
        order = np.argsort(self.gather_indices, kind="stable")
        chans = self.gather_indices[order]
        bounds = np.searchsorted(chans, np.arange(self.in_channels + 1))
        for ch in range(self.in_channels):
            cols = order[bounds[ch]:bounds[ch + 1]]
            if cols.size:
                gi, i = divmod(ch, ig)
                rows = slice(gi * og, (gi + 1) * og)
                local = cols - gi * blk if self.pointwise_group > 1 else cols
                out[rows, i] = pw[rows][:, local] @ dw[cols]
        return out.reshape(self.weight_shape)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_weight(weight, group: int) -> np.ndarray:
    if isinstance(weight, gs.Constant):
        if weight.export_dtype != weight.dtype:
            raise ValueError(f"weight {weight.name!r}: unsupported dtype {weight.export_dtype}")
        weight = weight.values
    elif isinstance(weight, gs.Tensor):
        raise ValueError(f"weight {weight.name!r} is not a constant")
    if not isinstance(weight, np.ndarray):
        raise ValueError(f"weight is not a constant array ({type(weight).__name__})")
    if not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"weight dtype {weight.dtype} is not floating point")
    if weight.ndim < 3:
        raise ValueError(f"conv weight must be (O, I/g, *k), got shape {weight.shape}")
    if int(np.prod(weight.shape[2:])) == 1:
        raise ValueError("kernel size 1: the conv is already pointwise")
    group = int(group)
    if group < 1 or weight.shape[0] % group:
        raise ValueError(f"group {group} does not divide {weight.shape[0]} output channels")
    if min(weight.shape) == 0:
        raise ValueError(f"empty weight {weight.shape}")
    if not np.isfinite(weight).all() or float(np.abs(weight).max()) > 1e30:  # LAPACK's SVD may never return
        raise ValueError("non-finite or huge (> 1e30) weight values")
    return weight


def conv_weight(node: gs.Node) -> tuple[np.ndarray, int]:
    """``(weight, group)`` of a Conv node; ValueError if it cannot be separated."""
    if node.op != "Conv":
        raise ValueError(f"node {node.name!r} is {node.op}, not Conv")
    if len(node.inputs) < 2:
        raise ValueError(f"Conv {node.name!r} has no weight input")
    group = int(node.attrs.get("group", 1))
    return _check_weight(node.inputs[1], group), group


def _channel_matrices(w: np.ndarray, group: int) -> np.ndarray:
    """(g, Ig, Og, K) float64: M[G, i] = W[G*Og:(G+1)*Og, i] flattened."""
    o, ig = w.shape[:2]
    return (w.astype(np.float64).reshape(group, o // group, ig, -1)
            .transpose(0, 2, 1, 3))


def _layout(u: np.ndarray, o: int, k: int) -> tuple[int, np.ndarray, int]:
    """For counts ``u`` (g, Ig): (pointwise_group, padding per group, MACs/pixel)."""
    g = u.shape[0]
    ug = u.sum(axis=1)
    total = int(ug.sum())
    dense_n = max(total, 1)
    dense = dense_n * k + o * dense_n
    dense_pad = np.zeros(g, dtype=np.int64)
    dense_pad[0] = dense_n - total
    if g == 1:
        return 1, dense_pad, dense
    blk = max(int(ug.max()), 1)
    grouped = g * blk * k + o * blk
    if grouped <= dense:
        return g, (blk - ug).astype(np.int64), grouped
    return 1, dense_pad, dense


def _macs_before(shape: tuple[int, ...]) -> int:
    return int(shape[0] * shape[1] * np.prod(shape[2:]))


def _svd(m: np.ndarray):
    """Batched thin SVD of (..., Og, K) float64."""
    return np.linalg.svd(m, full_matrices=False)


def _distinct_factor(m: np.ndarray, zero_tol: float, rtol: float, limit: int):
    """Exact factor of ``m`` (Og, K) by kernels equal up to a +-scalar.

    Rows with norm <= zero_tol are zero (no kernel).  Leader clustering on the
    normalised rows n: the first unassigned row leads and takes every
    unassigned row with ||n_j -+ n_lead|| <= rtol, i.e. |n_j . n_lead| >=
    1 - rtol^2/2 (one vectorised pass per kernel), so each row is approximated
    to relative error <= rtol.  ``A[j] = (row_j . b) / (b . b)`` for its kernel
    ``b`` (leaders are reproduced exactly).  Returns A (Og, d), B (d, K), or
    None as soon as d would exceed ``limit``.
    """
    norms = np.linalg.norm(m, axis=1)
    idx = np.flatnonzero(norms > zero_tol)
    if idx.size == 0:
        return np.zeros((m.shape[0], 0)), np.zeros((0, m.shape[1]))
    r = m[idx]
    n = r / norms[idx, None]
    thr = 1.0 - 0.5 * rtol * rtol
    cluster = np.empty(idx.size, dtype=np.int64)
    leaders: list[int] = []
    free = np.arange(idx.size)
    while free.size:
        if len(leaders) >= limit:
            return None
        lead = free[0]
        hit = np.abs(n[free] @ n[lead]) >= thr
        hit[0] = True
        cluster[free[hit]] = len(leaders)
        leaders.append(lead)
        free = free[~hit]
    b = r[leaders]
    bc = b[cluster]
    a = np.einsum("ij,ij->i", r, bc) / np.einsum("ij,ij->i", bc, bc)
    A = np.zeros((m.shape[0], len(leaders)))
    A[idx, cluster] = a
    return A, b


def _numerical_ranks(s: np.ndarray, rtol: float, zero_tol: float) -> np.ndarray:
    """Ranks from singular values (..., q): count(sigma > rtol*sigma_max), 0 if
    sigma_max <= zero_tol."""
    smax = s[..., 0]
    r = (s > rtol * smax[..., None]).sum(axis=-1)
    return np.where(smax > zero_tol, r, 0)


def _build_plan(weight: np.ndarray, group: int, factors, exact: bool) -> SeparationPlan:
    """Assemble a plan from per-(group, channel) factors (A (Og, u), B (u, K))."""
    o, ig = weight.shape[:2]
    kshape = weight.shape[2:]
    k = int(np.prod(kshape))
    og = o // group
    u = np.array([[f[1].shape[0] for f in row] for row in factors], dtype=np.int64)
    pg, pad, macs = _layout(u, o, k)
    n_dw = int(u.sum() + pad.sum())
    dw = np.zeros((n_dw, k))
    blk = n_dw // pg
    pw = np.zeros((o, blk))
    gather = np.zeros(n_dw, dtype=np.int64)
    col = 0
    for gi in range(group):
        for i in range(ig):
            a, b = factors[gi][i]
            d = b.shape[0]
            dw[col:col + d] = b
            lc = col - gi * blk if pg > 1 else col
            pw[gi * og:(gi + 1) * og, lc:lc + d] = a
            gather[col:col + d] = gi * ig + i
            col += d
        gather[col:col + pad[gi]] = gi * ig  # zero kernels: any channel works
        col += int(pad[gi])
    dt = weight.dtype
    plan = SeparationPlan(
        u=[row.copy() for row in u],
        depthwise_weight=dw.reshape((n_dw, 1) + tuple(kshape)).astype(dt),
        pointwise_weight=pw.astype(dt),
        gather_indices=gather,
        pointwise_group=pg,
        macs_per_pixel_before=_macs_before(weight.shape),
        macs_per_pixel_after=int(macs),
        exact=exact,
        weight_error=0.0,
        group=group,
        weight_shape=tuple(int(s) for s in weight.shape),
    )
    w64 = weight.astype(np.float64)
    nrm = np.linalg.norm(w64)
    plan.weight_error = float(np.linalg.norm(w64 - plan.reconstruct()) / nrm) if nrm > 0 else 0.0
    return plan


def align_plan(plan: SeparationPlan, align: int) -> SeparationPlan:
    """Pad the depthwise channels of a gathered plan with zero kernels to a multiple of ``align``.

    Exact (a zero kernel feeding zero pointwise weights adds nothing). It pays in latency:
    onnxruntime's blocked (NCHWc) depthwise path needs the channel count to be a multiple of 8;
    measured (CPU, one thread, 32→64 channels at 23×23): 107 channels ran 2.4x the dense conv's
    time, 104 and 112 channels 0.75x.
    """
    n = plan.depthwise_channels
    extra = -n % align
    if extra == 0 or plan.pointwise_group != 1 or not plan.uses_gather:
        return plan
    dw, pw = plan.depthwise_weight, plan.pointwise_weight
    k = int(np.prod(plan.kernel_shape))
    return SeparationPlan(
        u=plan.u, depthwise_weight=np.concatenate([dw, np.zeros((extra,) + dw.shape[1:], dw.dtype)]),
        pointwise_weight=np.concatenate([pw, np.zeros((pw.shape[0], extra), pw.dtype)], axis=1),
        gather_indices=np.concatenate([plan.gather_indices, np.zeros(extra, np.int64)]),
        pointwise_group=1, macs_per_pixel_before=plan.macs_per_pixel_before,
        macs_per_pixel_after=plan.macs_per_pixel_after + extra * (k + pw.shape[0]), exact=plan.exact,
        weight_error=plan.weight_error, group=plan.group, weight_shape=plan.weight_shape)


# --------------------------------------------------------------------------- #
# public planning API
# --------------------------------------------------------------------------- #
def plan_exact(weight: np.ndarray, group: int = 1, rtol: float = DEFAULT_RTOL) -> SeparationPlan:
    """Exact separation: per channel the fewer of (distinct kernels up to a
    +-scalar, numerical rank) kernels; ties go to the distinct-kernel factor
    (sparse A, representative kernels reproduced bit-exactly).

    Tolerances (float64): a row / channel is zero when its norm is
    <= rtol * (largest row norm of W); kernels merge when their normalised
    directions differ by <= rtol; singular values <= rtol * sigma_max of the
    channel are dropped.  Raises ValueError for non-float dtype, kernel size 1,
    a non-constant weight or a group that does not divide O.
    """
    weight = _check_weight(weight, group)
    group = int(group)
    ms = _channel_matrices(weight, group)  # (g, Ig, Og, K)
    scale = float(np.linalg.norm(ms, axis=-1).max())
    zero_tol = rtol * scale
    U, s, vt = _svd(ms)
    ranks = _numerical_ranks(s, rtol, zero_tol)
    factors = []
    for gi in range(group):
        row = []
        for i in range(ms.shape[1]):
            r = int(ranks[gi, i])
            f = _distinct_factor(ms[gi, i], zero_tol, rtol, limit=r)
            if f is None:  # more distinct kernels than the rank
                f = (U[gi, i, :, :r] * s[gi, i, :r], vt[gi, i, :r])
            row.append(f)
        factors.append(row)
    return _build_plan(weight, group, factors, exact=True)


def _ranks_grid(ranks, weight_shape, group) -> np.ndarray:
    ig = weight_shape[1]
    r = np.asarray(ranks).astype(np.int64).reshape(-1)
    if r.size != group * ig:
        raise ValueError(f"need {group * ig} ranks (one per input channel), got {r.size}")
    q = min(weight_shape[0] // group, int(np.prod(weight_shape[2:])))
    if (r < 0).any():
        raise ValueError("ranks must be >= 0")
    return np.minimum(r, q).reshape(group, ig)


def lowrank_weight(weight: np.ndarray, group: int, ranks: np.ndarray) -> np.ndarray:
    """``W'`` (same shape / dtype): each channel matrix M = W[:, i] replaced by
    its best rank-``ranks[i]`` approximation (truncated SVD).  ``ranks`` has one
    entry per input channel of the weight layout, group-major (``g * I/g``)."""
    weight = _check_weight(weight, group)
    r = _ranks_grid(ranks, weight.shape, group)
    ms = _channel_matrices(weight, group)
    U, s, vt = _svd(ms)
    keep = np.arange(s.shape[-1]) < r[..., None]
    m2 = np.einsum("gior,gir,girk->giok", U, s * keep, vt)
    w2 = m2.transpose(0, 2, 1, 3).reshape(weight.shape)
    return w2.astype(weight.dtype)


def plan_lowrank(weight: np.ndarray, group: int, ranks: np.ndarray) -> SeparationPlan:
    """Lossy plan straight from the truncated SVD at ``ranks`` (u == ranks):
    A = U_r diag(s_r), B = V_r^T.  ``weight_error`` = ||W - W'|| / ||W||.
    (Equivalent alternative: ``plan_exact(lowrank_weight(W, g, ranks), g)``.)"""
    weight = _check_weight(weight, group)
    r = _ranks_grid(ranks, weight.shape, group)
    ms = _channel_matrices(weight, group)
    U, s, vt = _svd(ms)
    factors = [[(U[gi, i, :, :r[gi, i]] * s[gi, i, :r[gi, i]], vt[gi, i, :r[gi, i]])
                for i in range(ms.shape[1])] for gi in range(group)]
    return _build_plan(weight, group, factors, exact=False)


def lowrank_ladder(weight: np.ndarray, group: int = 1,
                   errors: Sequence[float] = DEFAULT_LADDER_ERRORS, align: int = 1,
                   ) -> list[tuple[np.ndarray, float, int]]:
    """Candidate per-channel ranks, mild to aggressive.

    All singular values of all channel matrices are dropped globally in
    increasing order of sigma^2 (each dropped sigma removes one depthwise
    kernel, i.e. the same K + O MACs for g = 1, so this is the greedy
    error-per-MAC order; for g > 1 it is a heuristic since the padded layout
    only pays for the largest group).  For each target relative error ``t`` in
    ``errors`` the longest prefix with sqrt(sum sigma^2) <= t * ||W||_F is cut.
    With ``align`` > 1 (group 1), each cut keeps the next-largest sigmas until the kept count is
    a multiple of ``align``: the depthwise channels :func:`align_plan` would pad with zero kernels
    carry signal instead, at the same MACs.
    Returns ``[(ranks (g*I/g,) int64, rel_error, macs_per_pixel_after)]``,
    deduplicated, keeping only entries with fewer MACs than the original.
    ``rel_error`` is exact (Eckart-Young) = ||W - lowrank_weight(W, g, ranks)||_F
    / ||W||_F up to float rounding.
    """
    weight = _check_weight(weight, group)
    group = int(group)
    o = weight.shape[0]
    k = int(np.prod(weight.shape[2:]))
    ms = _channel_matrices(weight, group)
    s = np.linalg.svd(ms, compute_uv=False)  # (g, Ig, q), descending
    q = s.shape[-1]
    s2 = (s * s).reshape(-1)
    total = float(s2.sum())
    if total == 0.0:
        return []
    order = np.argsort(s2, kind="stable")
    cum = np.cumsum(s2[order])
    chan = order // q
    before = _macs_before(weight.shape)
    out, seen = [], set()
    for t in sorted(errors):
        n = int(np.searchsorted(cum, (t * t) * total, side="right"))
        if align > 1 and group == 1:
            n = max(0, n - (-(s2.size - n) % align))
        removed = np.bincount(chan[:n], minlength=s2.size // q)
        ranks = (q - removed).astype(np.int64)
        key = ranks.tobytes()
        if key in seen:
            continue
        seen.add(key)
        macs = _layout(ranks.reshape(group, -1), o, k)[2]
        if macs >= before:
            continue
        err = float(np.sqrt(cum[n - 1] / total)) if n else 0.0
        out.append((ranks, err, int(macs)))
    return out


# --------------------------------------------------------------------------- #
# graph rewrite
# --------------------------------------------------------------------------- #
class _Names:
    """Unique tensor / node names ``{base}/sep_{suffix}`` within a graph (:func:`~red_onnx.layers.unique_name`)."""

    def __init__(self, graph: gs.Graph, base: str):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}
        self.base = base

    def __call__(self, suffix: str) -> str:
        return unique_name(f"{self.base}/sep_{suffix}", self.used)


def apply_plan(graph: gs.Graph, node: gs.Node, plan: SeparationPlan) -> list[gs.Node]:
    """Replace Conv ``node`` in ``graph`` by [Gather] -> depthwise Conv -> 1x1 Conv.

    The 1x1 Conv writes the node's original output tensor (consumers and graph
    outputs untouched).  New nodes are inserted at the node's position in
    ``graph.nodes`` (topological order kept); the old node is removed and
    disconnected, its weight Constant is left for ``graph.cleanup()``.
    New names: ``{node.name or output name}/sep_{gather_indices, gather,
    gathered, dw, dw_weight, dw_out, pw, pw_weight}`` (suffixed ``_1``, ``_2``..
    on collision).  Standard-domain Gather(axis=1) and Conv only (opset >= 11).
    """
    weight, group = conv_weight(node)
    if tuple(weight.shape) != tuple(plan.weight_shape) or group != plan.group:
        raise ValueError(f"plan for {plan.weight_shape}/g{plan.group} does not match "
                         f"Conv {node.name!r} {weight.shape}/g{group}")
    pos = next((j for j, n in enumerate(graph.nodes) if n is node), None)
    if pos is None:
        raise ValueError(f"node {node.name!r} is not in the graph")
    x = node.inputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    y = node.outputs[0]
    names = _Names(graph, node.name or y.name or "conv")
    dtype = weight.dtype
    nd = len(plan.kernel_shape)
    n_dw = plan.depthwise_channels
    attrs = {key: node.attrs[key] for key in ("auto_pad", "dilations", "pads", "strides")
             if key in node.attrs}

    node.inputs.clear()
    node.outputs.clear()

    new = []
    dw_in = x
    if plan.uses_gather:
        idx = gs.Constant(names("gather_indices"), plan.gather_indices.astype(np.int64))
        shape = None if x.shape is None else [x.shape[0], n_dw, *x.shape[2:]]
        dw_in = gs.Variable(names("gathered"), dtype=dtype, shape=shape)
        new.append(gs.Node("Gather", name=names("gather"), attrs={"axis": 1},
                           inputs=[x, idx], outputs=[dw_in]))
        dw_group = n_dw
    else:
        dw_group = plan.in_channels
    dw_w = gs.Constant(names("dw_weight"), np.ascontiguousarray(plan.depthwise_weight, dtype=dtype))
    shape = None if y.shape is None else [y.shape[0], n_dw, *y.shape[2:]]
    dw_out = gs.Variable(names("dw_out"), dtype=dtype, shape=shape)
    new.append(gs.Node("Conv", name=names("dw"),
                       attrs={**attrs, "group": dw_group, "kernel_shape": list(plan.kernel_shape)},
                       inputs=[dw_in, dw_w], outputs=[dw_out]))

    pg = plan.pointwise_group
    pw = plan.pointwise_weight
    pw_w = gs.Constant(names("pw_weight"),
                       np.ascontiguousarray(pw.reshape(pw.shape + (1,) * nd), dtype=dtype))
    new.append(gs.Node("Conv", name=names("pw"),
                       attrs={"group": pg, "kernel_shape": [1] * nd},
                       inputs=[dw_out, pw_w] + ([bias] if bias is not None else []),
                       outputs=[y]))
    graph.nodes[pos:pos + 1] = new
    return new


# --------------------------------------------------------------------------- #
# the pass
# --------------------------------------------------------------------------- #
NAME = "separate"
#: Rewrite a conv only where its MACs drop by at least this fraction: the chain of a Gather, a
#: depthwise and a pointwise conv is slower per MAC than one dense conv.
MIN_SAVING = 0.25
#: With the latency guard on, depthwise channel counts are padded to a multiple of this (see align_plan).
DEPTHWISE_ALIGN = 8
#: Relative weight errors at which the low-rank candidates of a layer are cut.
LADDER_ERRORS = tuple(float(e) for e in np.geomspace(1e-3, 0.6, 68))  # steps of ~10%


#: Why a conv the latency guard undid stays dense.
KEPT_BY_GUARD = "the latency guard undid its separation: onnxruntime ran the result slower than the input"


def _convs(ctx: Context):
    """(layer, weight, group, output pixels) of every conv this pass may rewrite."""
    layers, _ = find_layers(ctx.graph, ctx.exclude)
    for layer in layers:
        if layer.op != "Conv" or layer.node.name in ctx.keep_dense:
            continue
        try:
            weight, group = conv_weight(layer.node)
        except ValueError:
            continue
        if group > 1 and weight.shape[1] == 1:
            continue  # already depthwise
        shape = ctx.shapes.get(layer.node.outputs[0].name)
        pixels = int(np.prod(shape[2:])) if shape else 1
        yield layer, weight, group, pixels


def _propose(ctx: Context):
    candidates, weights = [], {}
    for layer, weight, group, pixels in _convs(ctx):
        before = _macs_before(weight.shape)
        align = DEPTHWISE_ALIGN if ctx.latency_check else 1
        ladder = ctx.memoized(f"lowrank ladder {group} {align}", [weight],
                              lambda: lowrank_ladder(weight, group, LADDER_ERRORS, align))
        for level, (ranks, error, after) in enumerate(ladder):
            if after > (1 - MIN_SAVING) * before:
                continue
            params = weight.size - _params_after(weight, ranks, group)
            candidates.append(Candidate(key=f"separate:{layer.name}:{level}", slot=f"separate:{layer.name}",
                                        saving=(pixels * (before - after), params, params * weight.dtype.itemsize),
                                        error=error, level=level, data=(layer.weight.name, ranks, group),
                                        tensors=(layer.weight.name,)))
            weights[layer.weight.name] = weight
    return candidates, weights


def _checked_plan(weight: np.ndarray, group: int) -> tuple[SeparationPlan, bool]:
    """:func:`plan_exact`, and whether it reproduces every output channel (:func:`_exact_per_output`),
    both to the rounding of the weight's dtype: a float16 low-rank weight (rounded after its
    truncated SVD) is low-rank to 1e-3, not 1e-6, and was never separated, its deviation spent
    for nothing."""
    eps = float(np.finfo(weight.dtype).eps)
    plan = plan_exact(weight, group, rtol=max(DEFAULT_RTOL, 2 * eps))
    return plan, _exact_per_output(weight, plan, rtol=max(1e-5, 4 * eps))


def _exact_per_output(weight: np.ndarray, plan: SeparationPlan, rtol: float = 1e-5) -> bool:
    """Every output channel's kernels are reproduced to ``rtol`` of their own norm (a layer-wide
    tolerance would drop a small kernel beside a huge one)."""
    w = weight.reshape(weight.shape[0], -1).astype(np.float64)
    err = np.linalg.norm(w - plan.reconstruct().reshape(w.shape), axis=1)
    return bool(np.all(err <= rtol * np.linalg.norm(w, axis=1)))


def _params_after(weight: np.ndarray, ranks: np.ndarray, group: int) -> int:
    u = int(np.sum(ranks))
    return u * int(np.prod(weight.shape[2:])) + weight.shape[0] * u // max(group, 1)


def run(ctx: Context) -> PassResult:
    """Exact separation of every conv where it pays; low-rank candidates spend the budget first."""
    start = time.perf_counter()
    result = PassResult(NAME)
    counts = result.counts
    counts["separated"] = 0
    if ctx.lossy:
        candidates, weights = _propose(ctx)

        def materialize(chosen):
            return {c.data[0]: lowrank_weight(weights[c.data[0]], c.data[2], c.data[1]) for c in chosen}

        if candidates:
            spent = ctx.spend(candidates, materialize, per_level=True)
            counts["lowrank_accepted"] = len(spent.accepted)
            counts["deviation_allocated"] = round(spent.deviation_after, 6)
    rows = result.layers
    for name in sorted(ctx.keep_dense):
        result.leave(name, KEPT_BY_GUARD)
    convs = list(_convs(ctx))
    for k, (layer, weight, group, pixels) in enumerate(convs):
        ctx.progress("exact separations, convs", k, len(convs))
        plan, exact = ctx.memoized(f"exact separation {group}", [weight], lambda: _checked_plan(weight, group))
        if ctx.latency_check:
            plan = align_plan(plan, DEPTHWISE_ALIGN)
        row = {"name": layer.name, "macs_before": pixels * plan.macs_per_pixel_before,
               "macs_after": pixels * plan.macs_per_pixel_after,
               "u_mean": round(float(np.mean(np.concatenate(plan.u))), 2),
               "u_max": int(max(u.max() for u in plan.u))}
        if not exact:
            result.leave(layer.name, "its kernels span too wide a range of scales to factor exactly")
            row["macs_after"] = row["macs_before"]
        elif plan.macs_per_pixel_after > (1 - MIN_SAVING) * plan.macs_per_pixel_before:
            result.leave(layer.name, f"saves {plan.saving:.0%} of MACs, under the {MIN_SAVING:.0%} that pays")
            row["macs_after"] = row["macs_before"]
        else:
            apply_plan(ctx.graph, layer.node, plan)
            row.update(gather=plan.uses_gather, depthwise_channels=plan.depthwise_channels)
            result.rewritten.append(layer.name)
            counts["separated"] += 1
        rows.append(row)
    ctx.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result.modified = counts["separated"] > 0
    result.seconds = time.perf_counter() - start
    return result
