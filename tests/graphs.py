"""Hand-built ONNX graphs with planted redundancy, and the checks the merge/coupling/budget tests share.

Graphs are built with conftest's :class:`Builder` (its ``*_w`` layers take given weights); here:
weight helpers that plant duplicates / positive multiples / dead channels into a layer's rows, and
checks that run the original and the compressed model with onnxruntime (all optimizations off) on
random inputs.

Weights are given in the *view* layout of red_onnx.layers: ``(out, in, *kernel)`` for Conv, ``(N, K)``
for Gemm and MatMul; the builder stores them in the op's own layout.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import red_onnx

FLOAT = TensorProto.FLOAT
RTOL = 1e-5  # relative L2 between a model and its exact rewrite


# --------------------------------------------------------------------------------------------- #
# weights with planted redundancy


def rand_layer(rng: np.random.Generator, out: int, fan_in: int, k: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Random (weight, bias); a conv weight (out, in, k, k) when ``k`` is given, else (out, in)."""
    shape = (out, fan_in) + ((k, k) if k else ())
    w = rng.standard_normal(shape) / np.sqrt(fan_in * (k * k if k else 1))
    b = rng.standard_normal(out) * 0.5
    return w.astype(np.float32), b.astype(np.float32)


def plant(w: np.ndarray, b: np.ndarray | None, plan) -> tuple[np.ndarray, np.ndarray | None]:
    """``plan``: (j, i, s): row j := s·row i (weights and bias); s = 0 makes channel j dead."""
    w, b = w.copy(), None if b is None else b.copy()
    for j, i, s in plan:
        w[j] = np.float32(s) * w[i]
        if b is not None:
            b[j] = np.float32(s) * b[i]
    return w, b


def rng_feeds(model: onnx.ModelProto, rng: np.random.Generator, batch: int = 3, low=None, high=None
              ) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch
                for d in vi.type.tensor_type.shape.dim]
        x = rng.standard_normal(dims) if low is None else rng.uniform(low, high, dims)
        feeds[vi.name] = x.astype(np.float32)
    return feeds


# --------------------------------------------------------------------------------------------- #
# running and checking


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def rel_l2(ref, res) -> float:
    ref, res = np.asarray(ref, np.float64), np.asarray(res, np.float64)
    assert ref.shape == res.shape, (ref.shape, res.shape)
    n = np.linalg.norm(ref)
    d = np.linalg.norm(res - ref)
    return float(d / n) if n > 0 else float(d)


def assert_same(original: onnx.ModelProto, result: onnx.ModelProto, batch: int = 3, samples: int = 3,
                seed: int = 7, rtol: float = RTOL) -> None:
    """Equal outputs to float rounding on random N(0,1) inputs (dynamic batch ``batch``)."""
    rng = np.random.default_rng(seed)
    a, b = session(original), session(result)
    for _ in range(samples):
        feeds = rng_feeds(original, rng, batch)
        for k, (y, y2) in enumerate(zip(a.run(None, feeds), b.run(None, feeds))):
            assert np.isfinite(y).all()
            d = rel_l2(y, y2)
            assert d <= rtol, f"output {k} deviates by {d:.3g}"


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


def attr(n: onnx.NodeProto, key: str, default=None):
    for a in n.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return default


def view_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The weight of layer ``name`` in the view layout (out, in, ...)."""
    n = node(model, name)
    w = inits(model)[n.input[1]]
    if n.op_type == "MatMul" or (n.op_type == "Gemm" and not attr(n, "transB", 0)):
        return w.T
    return w


def out_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv/Gemm/MatMul with an initializer weight, by node name."""
    values = inits(model)
    result = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in values:
            result[n.name] = view_weight(model, n.name).shape[0]
    return result


def removed(original: onnx.ModelProto, result: onnx.ModelProto) -> dict[str, int]:
    """Output channels removed per layer (only layers that lost some)."""
    before, after = out_channels(original), out_channels(result)
    assert set(before) == set(after), (sorted(before), sorted(after))
    return {k: before[k] - after[k] for k in before if before[k] != after[k]}


def merge_counts(report) -> dict:
    return next(p for p in report.passes if p["name"] == "merge")


def merge0(model: onnx.ModelProto, **kwargs):
    """compress(tolerance=0, passes=["merge"]) and the checks every exact rewrite passes."""
    before = model.SerializeToString()
    result, report = red_onnx.compress(model, tolerance=0, passes=["merge"], **kwargs)
    assert model.SerializeToString() == before, "compress modified its input"
    onnx.checker.check_model(result, full_check=True)
    assert report.verified
    assert [i.SerializeToString() for i in result.graph.input] == [i.SerializeToString()
                                                                   for i in model.graph.input]
    assert [o.name for o in result.graph.output] == [o.name for o in model.graph.output]
    return result, report


def check_exact(model: onnx.ModelProto, expected: dict[str, int], batch: int = 3, **kwargs):
    """Merge exactly; the channels removed per layer are ``expected``; outputs equal at ``batch``."""
    result, report = merge0(model, **kwargs)
    assert removed(model, result) == expected
    assert_same(model, result, batch=batch)
    assert_same(model, result, batch=1, samples=1, seed=11)
    return result, report


def merge_reasons(report) -> list[str]:
    """Every reason the merge pass gave for leaving a channel space alone."""
    return [a["reason"] for a in report.left_alone if a["pass"] == "merge"]
