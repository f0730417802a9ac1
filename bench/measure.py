"""Measurements of a compressed model against its original: cost (params, MACs, bytes), deviation, latency,
and the time and peak memory of a compression tool run in a child process."""

from __future__ import annotations

import multiprocessing
import time
import traceback
from typing import Any, Callable

import numpy as np
import onnx

from .common import relative_deviation, session

# ----------------------------------------------------------------------------------------------- cost

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    yield a.t


_WEIGHT_INT_TYPES = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16, onnx.TensorProto.INT16,
                     onnx.TensorProto.UINT4, onnx.TensorProto.INT4}


def _is_weight(t: onnx.TensorProto) -> bool:
    """Float tensors, and integer tensors that store weights (8/16/4-bit codes, or any of rank >= 2); int32/int64
    vectors (shapes, axes, slice bounds) are not weights."""
    return t.data_type in _FLOAT_TYPES or t.data_type in _WEIGHT_INT_TYPES or len(t.dims) >= 2


def count_params(model: onnx.ModelProto) -> int:
    """Weight elements of every initializer and Constant tensor: a weight stored as a codebook index still
    counts (hashing shrinks bytes, not parameters); the codebook's entries count too."""
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in _tensors(model.graph) if _is_weight(t)))


def _runtime_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: set[str]) -> dict[str, tuple]:
    """Shapes of the named tensors on `feeds`, by running the model with them exposed as outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    shapes = {n: s for n, s in inits.items() if n in names}
    wanted = sorted(n for n in names if n not in inits and n not in have and n not in feeds)
    for n in wanted:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    outs = session(m, threads=1, optimize=False).run(None, feeds)
    shapes.update({o.name: tuple(v.shape) for o, v in zip(m.graph.output, outs)})
    shapes.update({n: tuple(v.shape) for n, v in feeds.items()})
    return shapes


def count_macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates at the batch of `feeds` (pass one sample for batch 1): Conv = output elements x
    C_in/group x kernel size; ConvTranspose = input elements x C_out/group x kernel size; Gemm and MatMul =
    M x K x N (over the broadcast batch dims)."""
    ops = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    names = {x for n in ops for x in (*n.input[:2], n.output[0])}
    shapes = _runtime_shapes(model, feeds, names)
    macs = 0
    for n in ops:
        a, w, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            macs += np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64)
        elif n.op_type == "ConvTranspose":
            macs += np.prod(a, dtype=np.int64) * np.prod(w[1:], dtype=np.int64)
        elif n.op_type == "Gemm":
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            macs += np.prod(y, dtype=np.int64) * (a[0] if trans_a else a[1])
        else:
            macs += np.prod(y, dtype=np.int64) * a[-1]
    return int(macs)


def cost(model: onnx.ModelProto, one_sample: dict[str, np.ndarray]) -> dict[str, int]:
    return {
        "params": count_params(model),
        "macs": count_macs(model, one_sample),
        "bytes": len(model.SerializeToString()),
    }


# ------------------------------------------------------------------------------------------ deviation


def batch_axes(outputs: list[np.ndarray], n: int) -> list[int]:
    """Per output, the first axis of size n (the batch axis; captcha logits are time-major)."""
    return [next((i for i, d in enumerate(o.shape) if d == n), 0) for o in outputs]


def normal_probes(real: dict[str, np.ndarray], seed: int = 1234) -> dict[str, np.ndarray]:
    """N(0, 1) inputs of the same shapes as the real batch."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in real.items()}


def deviation(sess_ref, sess_new, feeds: dict[str, np.ndarray], ref_outputs: list[np.ndarray] | None = None) -> float:
    """Relative deviation of sess_new from sess_ref (or from its precomputed `ref_outputs`) on `feeds`."""
    ref = ref_outputs if ref_outputs is not None else sess_ref.run(None, feeds)
    new = sess_new.run(None, feeds)
    n = next(iter(feeds.values())).shape[0]
    return relative_deviation(ref, new, batch_axes(ref, n))


# -------------------------------------------------------------------------------------------- latency


def latency_session(model: onnx.ModelProto):
    """The session latency is measured on: one thread, all graph optimizations on."""
    return session(model, threads=1)


def latency_ratio(original, compressed, one_sample: dict, pairs: int) -> dict:
    """Median over `pairs` interleaved pairs of single batch-1 runs of t(compressed) / t(original) (models or
    latency sessions); the order inside a pair alternates."""
    a, b = (m if hasattr(m, "run") else latency_session(m) for m in (original, compressed))
    for _ in range(5):
        a.run(None, one_sample)
        b.run(None, one_sample)

    def timed(s) -> float:
        t0 = time.perf_counter()
        s.run(None, one_sample)
        return time.perf_counter() - t0

    ratios, t_orig = [], []
    for i in range(pairs):
        if i % 2:
            tb, ta = timed(b), timed(a)
        else:
            ta, tb = timed(a), timed(b)
        ratios.append(tb / ta)
        t_orig.append(ta)
    return {"latency_ratio": float(np.median(ratios)), "latency_original_ms": 1e3 * float(np.median(t_orig))}


# ---------------------------------------------------------------------- tool runs in a child process


def _peak_rss_mib() -> float:
    """VmHWM (peak resident set size) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(conn, fn, args):
    try:
        t0 = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - t0
        conn.send({"ok": True, "result": result, "seconds": seconds, "peak_rss_mib": _peak_rss_mib()})
    except BaseException as exc:  # report every failure of the tool to the parent
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                   "peak_rss_mib": _peak_rss_mib()})
    finally:
        conn.close()


def _noop():
    return None


class ToolRunner:
    """Runs tool calls in children of one forkserver that preloaded the tools' modules, so each child starts
    from the same small resident set; a child's peak memory is its VmHWM (/proc/self/status), which counts
    the inherited interpreter and imports (`baseline_mib`, measured with a child that does nothing)."""

    def __init__(self, preload: list[str], timeout_s: float):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(preload)
        self.timeout_s = timeout_s
        self.baseline_mib = self.run(_noop)["peak_rss_mib"]

    def run(self, fn: Callable, *args: Any) -> dict:
        """{"ok", "result" | "error", "seconds" (of the call, in the child), "peak_rss_mib"}."""
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(send, fn, args))
        proc.start()
        send.close()
        if recv.poll(self.timeout_s):
            try:
                out = recv.recv()
            except EOFError:
                out = None
        else:
            out = {"ok": False, "error": f"timeout after {self.timeout_s:.0f} s", "peak_rss_mib": float("nan")}
        if proc.is_alive():
            proc.join(5)
        if proc.is_alive():
            proc.kill()
        proc.join()
        if out is None:
            out = {"ok": False, "error": f"child died (exit code {proc.exitcode})", "peak_rss_mib": float("nan")}
        return out
