"""Shared helpers for the walking-skeleton tests: small hand-built ONNX models and their checks.

Models are built with :class:`Builder` (float32, weights from a seeded rng, opset 17 unless a test
says otherwise). Every model carries producer, doc strings and ``metadata_props`` so that
:func:`assert_preserved` can check the rewrite kept them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper

import red_onnx

REPO = Path(__file__).resolve().parents[1]
DIGITS_CNN = REPO / "models" / "digits_cnn.onnx"
FLOAT = TensorProto.FLOAT

# Float rounding allowed between a model and its exact rewrite (relative L2 per output).
RTOL = 1e-5

# The property tests draw new random graphs on every run; .ci/run sets HYPOTHESIS_PROFILE=ci, which
# draws the same ones every time, so that a landing is not decided by a draw (a graph a run finds
# is a bug to fix, found where someone runs the suite: the default profile).
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# --------------------------------------------------------------------------------------------- #
# building models


class Builder:
    """The tests' graph builder: every method returns the name of the tensor it produced.

    Layers come with random weights (``conv``, ``gemm``, ``matmul``: sizes given) or with given
    weights in the view layout of red_onnx.layers, (out, in, *kernel) and (N, K) for Gemm and MatMul
    (``conv_w``, ``gemm_w``, ``matmul_w``: the builder stores them in the op's own layout)."""

    def __init__(self, seed: int = 0, name_nodes: bool = True, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.name_nodes = name_nodes
        self._count = 0

    # -- plumbing -------------------------------------------------------------------------- #
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def input(self, name: str, shape, elem=FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, shape=None, elem=FLOAT) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def init(self, array, name: str | None = None, dtype=np.float32) -> str:
        name = name or self.fresh("c")
        array = np.asarray(array, dtype=dtype)
        self.arrays[name] = array
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def constant_node(self, array, name: str | None = None, dtype=np.float32) -> str:
        """A ``Constant`` node (value attribute) instead of an initializer."""
        name = name or self.fresh("k")
        array = np.asarray(array, dtype=dtype)
        self.arrays[name] = array
        self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("Constant_") if self.name_nodes
                                           else "", value=numpy_helper.from_array(array, name + "_value")))
        return name

    def node(self, op: str, inputs, outputs=None, n_outputs: int = 1, name: str | None = None,
             domain: str = "", **attrs):
        if outputs is None:
            outputs = [self.fresh(op.lower() + "_out") for _ in range(n_outputs)]
        if name is None:
            name = self.fresh(op + "_") if self.name_nodes else ""
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    const = init

    def weight(self, shape) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32) / np.sqrt(max(1, int(np.prod(shape[1:]))))

    # -- layers ---------------------------------------------------------------------------- #
    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, bias: bool = True,
             stride: int = 1, pad: int | None = None, name: str | None = None, ndim: int = 2) -> str:
        pad = k // 2 if pad is None else pad
        w = self.init(self.weight((c_out, c_in // group) + (k,) * ndim))
        inputs = [x, w]
        if bias:
            inputs.append(self.init(self.rng.standard_normal(c_out)))
        return self.node("Conv", inputs, name=name, kernel_shape=[k] * ndim, pads=[pad] * (2 * ndim),
                         strides=[stride] * ndim, group=group)

    def conv_transpose(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, bias: bool = True,
                       stride: int = 1, name: str | None = None) -> str:
        w = self.init(self.weight((c_in, c_out // group, k, k)))
        inputs = [x, w]
        if bias:
            inputs.append(self.init(self.rng.standard_normal(c_out)))
        return self.node("ConvTranspose", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride],
                         group=group)

    def gemm(self, x: str, k: int, n: int, trans_b: int = 1, trans_a: int = 0, bias: bool = True,
             alpha: float = 1.0, beta: float = 1.0, name: str | None = None) -> str:
        w = self.init(self.weight((n, k)) if trans_b else self.weight((n, k)).T)
        inputs = [x, w]
        if bias:
            inputs.append(self.init(self.rng.standard_normal(n)))
        attrs = {"transB": trans_b, "transA": trans_a}
        if alpha != 1.0:
            attrs["alpha"] = alpha
        if beta != 1.0:
            attrs["beta"] = beta
        return self.node("Gemm", inputs, name=name, **attrs)

    def matmul(self, x: str, k: int, n: int, bias: bool = False, name: str | None = None) -> str:
        y = self.node("MatMul", [x, self.init(self.weight((n, k)).T)], name=name)
        if bias:
            y = self.node("Add", [y, self.init(self.rng.standard_normal(n))])
        return y

    def bn_params(self, c: int) -> tuple[np.ndarray, ...]:
        gamma = self.rng.uniform(0.5, 2.0, c) * self.rng.choice([-1.0, 1.0], c)
        beta = self.rng.standard_normal(c)
        mean = self.rng.standard_normal(c)
        var = self.rng.uniform(0.2, 2.0, c)
        return tuple(a.astype(np.float32) for a in (gamma, beta, mean, var))

    def bn(self, x: str, c: int, eps: float = 1e-5, name: str | None = None) -> str:
        names = [self.init(a) for a in self.bn_params(c)]
        return self.node("BatchNormalization", [x] + names, name=name, epsilon=eps)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def act(self, x: str, op: str, **attrs) -> str:
        """An activation (or a 2×2 MaxPool)."""
        if op == "MaxPool":
            return self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        if op == "LeakyRelu":
            attrs.setdefault("alpha", 0.1)
        return self.node(op, [x], **attrs)

    # -- layers from given weights (view layout) ------------------------------------------- #
    def conv_w(self, x: str, w: np.ndarray, b: np.ndarray | None = None, name: str | None = None,
               pad: int | None = None, group: int = 1) -> str:
        k = w.shape[2]
        pad = k // 2 if pad is None else pad
        inputs = [x, self.init(w)] + ([self.init(b)] if b is not None else [])
        return self.node("Conv", inputs, name=name, kernel_shape=[k, k], pads=[pad] * 4, group=group)

    def gemm_w(self, x: str, w: np.ndarray, b: np.ndarray | None = None, name: str | None = None,
               trans_b: int = 1) -> str:
        inputs = [x, self.init(w if trans_b else w.T)] + ([self.init(b)] if b is not None else [])
        return self.node("Gemm", inputs, name=name, transB=trans_b)

    def matmul_w(self, x: str, w: np.ndarray, b: np.ndarray | None = None, name: str | None = None) -> str:
        y = self.node("MatMul", [x, self.init(w.T)], name=name)
        if b is not None:
            y = self.node("Add", [y, self.init(b)], name=(name + "_bias") if name else None)
        return y

    # -- the model ------------------------------------------------------------------------- #
    def model(self, opset: int | None = None, ir_version: int | None = None, extra_opsets=(), check: bool = True
              ) -> onnx.ModelProto:
        """The model; outputs declared without a shape get their inferred type (symbolic batch kept)."""
        opset = self.opset if opset is None else opset
        graph = helper.make_graph(self.nodes, "test_graph", self.inputs, self.outputs, self.initializers,
                                  doc_string="graph doc string")
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="red-onnx-tests",
                                  producer_version="9.9", doc_string="model doc string", domain="org.test",
                                  model_version=7)
        if ir_version is not None:
            model.ir_version = ir_version
        helper.set_model_props(model, {"classes": "cat,dog,bird", "author": "tests"})
        if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
            inferred = onnx.shape_inference.infer_shapes(model)
            known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
            for out in model.graph.output:
                vi = known.get(out.name)
                if not out.type.tensor_type.HasField("shape") and vi is not None \
                        and vi.type.tensor_type.HasField("shape"):
                    out.type.CopyFrom(vi.type)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------------------------- #
# running and comparing


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def concrete_shape(vi: onnx.ValueInfoProto, batch: int = 2, shapes: dict | None = None) -> tuple[int, ...]:
    if shapes and vi.name in shapes:
        return tuple(shapes[vi.name])
    dims = []
    for axis, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif axis == 0:
            dims.append(batch)
        else:
            raise ValueError(f"give a shape for {vi.name}")
    return tuple(dims)


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, batch: int = 2, shapes: dict | None = None
                 ) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(concrete_shape(vi, batch, shapes)).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def rel_l2(ref: np.ndarray, res: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    res = np.asarray(res, np.float64)
    assert ref.shape == res.shape, (ref.shape, res.shape)
    norm = np.linalg.norm(ref)
    diff = np.linalg.norm(res - ref)
    return float(diff / norm) if norm > 0 else float(diff)


def assert_same_outputs(original: onnx.ModelProto, result: onnx.ModelProto, seed: int = 1, samples: int = 3,
                        batch: int = 2, shapes: dict | None = None, rtol: float = RTOL) -> None:
    """Both models agree to float rounding (relative L2 per output, float64) on random inputs."""
    rng = np.random.default_rng(seed)
    a, b = session(original), session(result)
    for _ in range(samples):
        feeds = random_feeds(original, rng, batch, shapes)
        ref, res = a.run(None, feeds), b.run(None, feeds)
        assert len(ref) == len(res)
        for k, (y, y2) in enumerate(zip(ref, res)):
            assert y.dtype == y2.dtype
            assert np.isfinite(y).all()
            d = rel_l2(y, y2)
            assert d <= rtol, f"output {k} deviates by {d:.3g}"


def assert_identical_outputs(original: onnx.ModelProto, result: onnx.ModelProto, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    feeds = random_feeds(original, rng)
    for y, y2 in zip(run(original, feeds), run(result, feeds)):
        np.testing.assert_array_equal(y, y2)


def assert_preserved(original: onnx.ModelProto, result: onnx.ModelProto) -> None:
    """The rewrite is a valid model with the input model's interface and model-level fields."""
    onnx.checker.check_model(result, full_check=True)
    assert result.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in result.opset_import] == [(o.domain, o.version)
                                                                   for o in original.opset_import]
    for field in ("producer_name", "producer_version", "doc_string", "domain", "model_version"):
        assert getattr(result, field) == getattr(original, field), field
    assert [(p.key, p.value) for p in result.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    assert result.graph.doc_string == original.graph.doc_string
    assert result.graph.name == original.graph.name
    assert [i.SerializeToString() for i in result.graph.input] == [i.SerializeToString() for i in original.graph.input]
    assert [o.SerializeToString() for o in result.graph.output] == [o.SerializeToString()
                                                                   for o in original.graph.output]
    names = [t.name for t in result.graph.initializer]
    assert len(names) == len(set(names)), "duplicate initializer names"
    produced = [o for n in result.graph.node for o in n.output if o]
    assert len(produced) == len(set(produced)), "a tensor is produced twice"


def compress0(model: onnx.ModelProto, passes=None, **kwargs):
    """compress at tolerance 0, then the checks every exact rewrite must pass."""
    before = model.SerializeToString()
    result, report = red_onnx.compress(model, tolerance=0, passes=passes, **kwargs)
    assert model.SerializeToString() == before, "compress modified its input model"
    assert_preserved(model, result)
    return result, report


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def nodes_of(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def node_input_value(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    return initializer(model, node.input[index])


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def folder_entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def builder() -> Builder:
    return Builder(seed=0)


@pytest.fixture(autouse=True)
def _even_timings(request, monkeypatch):
    """Timings are not reproducible: in every test the latency guard sees the result run exactly
    as fast as the input, except where a test fakes other timings (the guard's own tests patch
    verify.latency_ratio again) or times for real (test_verify)."""
    if request.module.__name__ != "test_verify":
        from red_onnx import verify

        monkeypatch.setattr(verify, "latency_ratio", lambda a, b, feeds, **kw: (1e-3, 1e-3, 1.0))


@pytest.fixture(autouse=True)
def _any_channel_count(request, monkeypatch):
    """The hand-built graphs have a few channels, which multiples of 8 would keep: builds start at
    any count (the guard then tries 8 and 16), except in tests marked ``aligned``."""
    if "aligned" not in request.keywords:
        from red_onnx import pipeline

        monkeypatch.setattr(pipeline, "CHANNEL_ALIGNS", (1,) + pipeline.CHANNEL_ALIGNS)
