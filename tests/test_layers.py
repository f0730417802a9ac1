"""The Layer view (red_onnx.layers.find_layers / Layer) and the analysis (parameters, MACs, input specs)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import red_onnx
from red_onnx.errors import InputError
from red_onnx.layers import analyze, find_layers, input_specs, node_macs, tensor_shapes

from conftest import Builder, random_feeds, run


def graph_of(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    from red_onnx.model_io import to_model
    return to_model(graph, template)


def layer_named(graph: gs.Graph, name: str):
    layers, _ = find_layers(graph)
    found = [layer for layer in layers if layer.name == name]
    assert len(found) == 1, [layer.name for layer in layers]
    return found[0]


# --------------------------------------------------------------------------------------------- #
# one model per stored layout: (builder, output channel axis, expected view shape)

LAYOUTS = ["conv", "conv_grouped", "conv_transpose_g1", "conv_transpose_g2", "gemm_transB0", "gemm_transB1",
           "matmul", "matmul_rank3"]


def layout_model(kind: str):
    b = Builder(seed=LAYOUTS.index(kind))
    if kind == "conv":
        x = b.input("x", ["N", 3, 6, 6])
        y = b.conv(x, 3, 5, k=3, name="L")
        shape, view, axis = ["N", 5, 6, 6], (5, 3, 3, 3), 1
    elif kind == "conv_grouped":
        x = b.input("x", ["N", 4, 6, 6])
        y = b.conv(x, 4, 6, k=3, group=2, name="L")
        shape, view, axis = ["N", 6, 6, 6], (6, 2, 3, 3), 1
    elif kind == "conv_transpose_g1":
        x = b.input("x", ["N", 4, 5, 5])
        y = b.conv_transpose(x, 4, 6, k=3, name="L")
        shape, view, axis = ["N", 6, 7, 7], (6, 4, 3, 3), 1
    elif kind == "conv_transpose_g2":
        x = b.input("x", ["N", 4, 5, 5])
        y = b.conv_transpose(x, 4, 6, k=2, group=2, name="L")
        shape, view, axis = ["N", 6, 6, 6], (6, 2, 2, 2), 1
    elif kind == "gemm_transB0":
        x = b.input("x", ["N", 7])
        y = b.gemm(x, 7, 5, trans_b=0, name="L")
        shape, view, axis = ["N", 5], (5, 7), 1
    elif kind == "gemm_transB1":
        x = b.input("x", ["N", 7])
        y = b.gemm(x, 7, 5, trans_b=1, name="L")
        shape, view, axis = ["N", 5], (5, 7), 1
    elif kind == "matmul":
        x = b.input("x", ["N", 7])
        y = b.matmul(x, 7, 5, bias=True, name="L")
        shape, view, axis = ["N", 5], (5, 7), 1
    else:
        x = b.input("x", ["N", 3, 7])
        y = b.matmul(x, 7, 5, bias=True, name="L")
        shape, view, axis = ["N", 3, 5], (5, 7), 2
    b.output(y, shape)
    return b, b.model(), view, axis


@pytest.mark.parametrize("kind", LAYOUTS)
def test_get_set_weight_and_bias_round_trip_is_identity(kind):
    b, model, view_shape, _ = layout_model(kind)
    graph = graph_of(model)
    layer = layer_named(graph, "L")
    stored = layer.weight.values.copy()
    bias = layer.get_bias().copy()

    view = layer.get_weight()
    assert view.shape == view_shape
    assert layer.out_channels == view_shape[0]
    assert bias.shape == (view_shape[0],)
    layer.set_weight(view.copy())
    layer.set_bias(bias.copy(), graph)

    assert layer.weight.values.shape == stored.shape and layer.weight.values.dtype == stored.dtype
    np.testing.assert_array_equal(layer.weight.values, stored)
    np.testing.assert_array_equal(layer.get_bias(), bias)
    np.testing.assert_array_equal(layer.get_weight(), view)
    result = export(graph, model)
    feeds = random_feeds(model, np.random.default_rng(0))
    for y, y2 in zip(run(model, feeds), run(result, feeds)):
        np.testing.assert_array_equal(y, y2)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_scaling_view_rows_scales_output_channels(kind):
    """Row o of the view is output channel o, whatever the stored layout and grouping."""
    b, model, view_shape, axis = layout_model(kind)
    feeds = random_feeds(model, np.random.default_rng(1))
    (ref,) = run(model, feeds)
    graph = graph_of(model)
    layer = layer_named(graph, "L")
    bias = layer.get_bias().astype(np.float64)
    s = np.linspace(0.5, 3.0, view_shape[0])
    w = layer.get_weight()
    layer.set_weight(w * s.reshape((-1,) + (1,) * (w.ndim - 1)))
    layer.set_bias(np.zeros(view_shape[0]), graph)
    (res,) = run(export(graph, model), feeds)
    shape = [1] * ref.ndim
    shape[axis] = -1
    expected = (ref.astype(np.float64) - bias.reshape(shape)) * s.reshape(shape)
    np.testing.assert_allclose(res, expected, rtol=1e-4, atol=1e-5)


def test_conv_transpose_group2_view_indices():
    b, model, _, _ = layout_model("conv_transpose_g2")
    layer = layer_named(graph_of(model), "L")
    stored = layer.weight.values  # (C_in=4, C_out/g=3, k, k)
    view = layer.get_weight()  # (C_out=6, C_in/g=2, k, k)
    i_g, o_g = 2, 3
    for o in range(6):
        g = o // o_g
        for i in range(i_g):
            np.testing.assert_array_equal(view[o, i], stored[g * i_g + i, o - g * o_g])


def test_set_weight_accepts_a_different_shape():
    """Passes may remove output channels: the stored layout follows the view's new shape."""
    _, model, _, _ = layout_model("conv_transpose_g2")
    layer = layer_named(graph_of(model), "L")
    view = layer.get_weight()
    layer.set_weight(view[:4])  # two groups of two outputs
    assert layer.weight.values.shape == (4, 2, 2, 2)
    np.testing.assert_array_equal(layer.get_weight(), view[:4])
    _, model, _, _ = layout_model("gemm_transB0")
    layer = layer_named(graph_of(model), "L")
    view = layer.get_weight()
    layer.set_weight(view[:3])
    assert layer.weight.values.shape == (7, 3)


# --------------------------------------------------------------------------------------------- #
# biases


def test_matmul_add_bias_found_either_order():
    b = Builder(seed=3)
    x = b.input("x", ["N", 6])
    h = b.node("MatMul", [x, b.init(b.weight((6, 4)))], name="first")
    bias1 = b.init(b.rng.standard_normal(4))
    h = b.node("Add", [h, bias1], name="add1")
    h = b.node("MatMul", [h, b.init(b.weight((4, 3)))], name="second")
    bias2 = b.init(b.rng.standard_normal((1, 3)))
    h = b.node("Add", [bias2, h], name="add2")
    b.output(h, ["N", 3])
    graph = graph_of(b.model())
    for name, bias, add in (("first", bias1, "add1"), ("second", bias2, "add2")):
        layer = layer_named(graph, name)
        assert layer.bias is not None and layer.bias.name == bias
        assert layer.bias_node is not None and layer.bias_node.name == add
        assert layer.output is layer.bias_node.outputs[0]
        np.testing.assert_array_equal(layer.get_bias(), b.arrays[bias].reshape(-1))


@pytest.mark.parametrize("case", ["shared_constant", "activation", "graph_output", "wrong_size", "two_consumers"])
def test_matmul_add_not_a_bias(case):
    b = Builder(seed=4)
    x = b.input("x", ["N", 6])
    h = b.node("MatMul", [x, b.init(b.weight((6, 4)))], name="mm")
    if case == "shared_constant":
        c = b.init(b.rng.standard_normal(4))
        y = b.node("Add", [h, c])
        b.output(b.node("Add", [y, c]), ["N", 4])
    elif case == "activation":
        other = b.node("MatMul", [x, b.init(b.weight((6, 4)))], name="mm2")
        b.output(b.node("Add", [h, other]), ["N", 4])
    elif case == "graph_output":
        b.output(h, ["N", 4])
        b.output(b.node("Add", [h, b.init(b.rng.standard_normal(4))]), ["N", 4])
    elif case == "wrong_size":
        b.output(b.node("Add", [h, b.init(b.rng.standard_normal((3, 4)))]), [3, 4])
    else:
        b.output(b.node("Add", [h, b.init(b.rng.standard_normal(4))]), ["N", 4])
        b.output(b.relu(h), ["N", 4])
    graph = graph_of(b.model())
    layer = layer_named(graph, "mm")
    assert layer.bias is None and layer.bias_node is None
    np.testing.assert_array_equal(layer.get_bias(), np.zeros(4, np.float32))


@pytest.mark.parametrize("kind", ["conv", "matmul", "gemm"])
def test_set_bias_adds_a_bias_where_there_was_none(kind):
    b = Builder(seed=5)
    if kind == "conv":
        x = b.input("x", ["N", 3, 5, 5])
        y = b.conv(x, 3, 4, bias=False, name="L")
        b.output(y, ["N", 4, 5, 5])
        axis_shape = (1, 4, 1, 1)
    else:
        x = b.input("x", ["N", 6])
        y = b.matmul(x, 6, 4, name="L") if kind == "matmul" else b.gemm(x, 6, 4, bias=False, name="L", beta=0.5)
        b.output(y, ["N", 4])
        axis_shape = (1, 4)
    model = b.model()
    graph = graph_of(model)
    layer = layer_named(graph, "L")
    assert layer.bias is None
    np.testing.assert_array_equal(layer.get_bias(), np.zeros(4, np.float32))
    new_bias = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    layer.set_bias(new_bias, graph)
    np.testing.assert_array_equal(layer.get_bias(), new_bias)
    result = export(graph, model)
    onnx.checker.check_model(result, full_check=True)
    feeds = random_feeds(model, np.random.default_rng(0))
    (ref,), (res,) = run(model, feeds), run(result, feeds)
    np.testing.assert_allclose(res, ref + new_bias.reshape(axis_shape), rtol=1e-5, atol=1e-6)
    if kind == "matmul":
        assert [n.op_type for n in result.graph.node] == ["MatMul", "Add"]


# --------------------------------------------------------------------------------------------- #
# what is not a layer, and why


def test_skipped_layers_and_reasons():
    b = Builder(seed=6)
    x = b.input("x", ["N", 3, 5, 5])
    v = b.input("v", ["N", 4])
    wx = b.input("wx", [4, 3, 3, 3])
    shared = b.init(b.weight((4, 3, 3, 3)))
    h1 = b.node("Conv", [x, shared], name="shared_a", pads=[1, 1, 1, 1])
    h2 = b.node("Conv", [x, shared], name="shared_b", pads=[1, 1, 1, 1])
    h3 = b.node("Conv", [x, wx], name="input_weights", pads=[1, 1, 1, 1])
    h4 = b.node("Conv", [x, b.init(b.weight((4, 3, 3, 3)))], name="skip_me_please", pads=[1, 1, 1, 1])
    flat = b.node("ReduceMean", [b.node("Add", [b.node("Add", [h1, h2]), b.node("Add", [h3, h4])])], axes=[2, 3],
                  keepdims=0)
    g = b.node("Gemm", [flat, b.init(b.weight((4, 4)))], name="alpha_gemm", alpha=2.0)
    g2 = b.node("Gemm", [g, b.init(b.weight((4, 4))), v], name="var_bias_gemm")
    mm = b.node("MatMul", [b.node("Unsqueeze", [g2, b.init(np.array([2]), dtype=np.int64)]),
                           b.node("Unsqueeze", [v, b.init(np.array([1]), dtype=np.int64)])], name="act_matmul")
    b.output(mm, ["N", 4, 4])
    model = b.model()
    graph = graph_of(model)
    layers, skipped = find_layers(graph, re.compile("skip_me"))
    reasons = {s.name: s.reason for s in skipped}
    assert {layer.name for layer in layers} == set()
    assert "shared" in reasons["shared_a"] and "shared" in reasons["shared_b"]
    assert "graph input" in reasons["input_weights"] or "constant" in reasons["input_weights"]
    assert "exclude" in reasons["skip_me_please"]
    assert "alpha" in reasons["alpha_gemm"]
    assert "bias" in reasons["var_bias_gemm"]
    assert "activation" in reasons["act_matmul"]
    layers, skipped = find_layers(graph)
    assert [layer.name for layer in layers] == ["skip_me_please"]


def test_integer_weights_are_not_layers():
    b = Builder(seed=7)
    x = b.input("x", ["N", 4], elem=onnx.TensorProto.INT32)
    y = b.node("MatMul", [x, b.init(np.ones((4, 2)), dtype=np.int32)], name="int_mm")
    b.output(y, ["N", 2], elem=onnx.TensorProto.INT32)
    layers, skipped = find_layers(graph_of(b.model()))
    assert layers == [] and "int32" in skipped[0].reason


# --------------------------------------------------------------------------------------------- #
# analysis: parameters and MACs per sample (batch 1)


def analysis_of(b: Builder, shapes=None):
    model = b.model()
    return analyze(model, input_specs(model, shapes))


def test_conv_macs_stride_pad_group():
    b = Builder(seed=8)
    x = b.input("x", ["N", 4, 9, 9])
    y = b.conv(x, 4, 6, k=3, group=2, stride=2, pad=1, name="conv")
    b.output(y, ["N", 6, 5, 5])
    a = analysis_of(b)
    # output (1, 6, 5, 5) elements x C_in/group (2) x kernel 3*3
    assert a.macs == 6 * 5 * 5 * 2 * 9 == 2700
    assert a.macs_per_node == {"conv": 2700}
    assert a.params == 6 * 2 * 9 + 6
    assert a.op_counts == {"Conv": 1}


def test_conv_macs_rectangular_kernel_no_pad():
    b = Builder(seed=9)
    x = b.input("x", [1, 2, 7, 8])
    w = b.init(b.weight((3, 2, 2, 4)))
    y = b.node("Conv", [x, w], name="conv", strides=[1, 2])  # out (1, 3, 6, 3)
    b.output(y, [1, 3, 6, 3])
    a = analysis_of(b)
    assert a.macs == 3 * 6 * 3 * 2 * 8
    assert a.params == 3 * 2 * 2 * 4


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_macs(group):
    b = Builder(seed=10)
    x = b.input("x", ["N", 4, 5, 5])
    y = b.conv_transpose(x, 4, 6, k=3, group=group, stride=2, bias=False, name="deconv")
    b.output(y, ["N", 6, 11, 11])
    a = analysis_of(b)
    # input elements x C_out/group x kernel
    assert a.macs == 4 * 5 * 5 * (6 // group) * 9
    assert a.params == 4 * (6 // group) * 9


def test_gemm_macs_trans_a_trans_b():
    b = Builder(seed=11)
    x = b.input("x", [5, 3])  # transA: (K=5, M=3)
    g1 = b.gemm(x, 5, 7, trans_a=1, trans_b=1, name="g1")  # (3, 7)
    g2 = b.gemm(g1, 7, 2, trans_a=0, trans_b=0, bias=False, name="g2")  # (3, 2)
    b.output(g2, [3, 2])
    a = analysis_of(b)
    assert a.macs_per_node == {"g1": 3 * 5 * 7, "g2": 3 * 7 * 2}
    assert a.params == 7 * 5 + 7 + 7 * 2


def test_matmul_macs_broadcast_batch_dims():
    b = Builder(seed=12)
    x = b.input("x", [2, 1, 3, 4])
    y = b.node("MatMul", [x, b.init(b.weight((5, 4, 6)))], name="mm")  # -> (2, 5, 3, 6)
    b.output(y, [2, 5, 3, 6])
    a = analysis_of(b)
    assert a.macs == 2 * 5 * 3 * 4 * 6
    assert a.params == 5 * 4 * 6


def test_matmul_between_two_activations():
    b = Builder(seed=13)
    q = b.input("q", ["N", 3, 4])
    k = b.input("k", ["N", 4, 5])
    y = b.node("MatMul", [q, k], name="qk")
    b.output(y, ["N", 3, 5])
    a = analysis_of(b)
    assert a.macs == 3 * 4 * 5
    assert a.params == 0


@pytest.mark.parametrize("op, gates, directions", [("GRU", 3, 2), ("LSTM", 4, 1), ("RNN", 1, 1)])
def test_recurrent_macs_per_step_and_direction(op, gates, directions):
    """T steps of gates·H × (I + H) per direction (were counted as 0)."""
    t, i, h = 7, 5, 6
    b = Builder(seed=15)
    x = b.input("x", [t, "N", i])
    w = b.init(np.zeros((directions, gates * h, i)))
    r = b.init(np.zeros((directions, gates * h, h)))
    attrs = {"direction": "bidirectional"} if directions == 2 else {}
    y = b.node(op, [x, w, r], hidden_size=h, n_outputs=1, **attrs)
    b.output(y, [t, directions, "N", h])
    assert analysis_of(b, {"x": (t, 1, i)}).macs == t * directions * gates * h * (i + h)


def test_shapes_behind_a_computed_reshape_target_are_inferred():
    """An opset-11 export flattens with Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])); onnx's data
    propagation does not read that Slice, so every shape after it was unknown and the MatMul after
    it counted 0 MACs (PP-OCRv6: 147 of its 480 tensors, 9% of its MACs). The target is evaluated
    from the static shapes, and inference goes on."""
    b = Builder(seed=16)
    x = b.input("x", ["N", 6, 1, 10])
    shape = b.node("Shape", [x])
    head = b.node("Slice", [shape, b.init([0], dtype=np.int64), b.init([2], dtype=np.int64),
                            b.init([0], dtype=np.int64)])
    target = b.node("Cast", [b.node("Concat", [head, b.init([-1], dtype=np.int64)], axis=0)], to=onnx.TensorProto.INT64)
    seq = b.node("Transpose", [b.node("Reshape", [x, target])], perm=[0, 2, 1])  # (N, 10, 6)
    y = b.node("Reshape", [b.matmul(seq, 6, 4), b.node("Concat", [b.node("Slice", [b.node("Shape", [seq]),
               b.init([0], dtype=np.int64), b.init([1], dtype=np.int64), b.init([0], dtype=np.int64)]),
               b.init([-1], dtype=np.int64)], axis=0)])
    b.output(y, ["N", 40])
    model = b.model(opset=11)
    specs = input_specs(model, {"x": (1, 6, 1, 10)})
    assert analyze(model, specs).macs == 10 * 6 * 4
    shapes = tensor_shapes(model, specs)
    assert shapes[seq] == (1, 10, 6) and shapes[y] == (1, 40)


def test_linear_nodes_whose_shapes_are_unknown_are_named():
    """A custom op stops onnx's shape inference: the Gemm after it has no known shapes, so the
    MACs leave it out, and the report says so instead of a silent undercount."""
    b = Builder(seed=18)
    x = b.input("x", ["N", 6])
    h = b.node("MyOp", [b.gemm(x, 6, 8, name="first")], domain="org.custom", name="custom")
    b.output(b.gemm(h, 8, 4, name="second"), ["N", 4])
    model = b.model(extra_opsets=[("org.custom", 1)], check=False)
    analysis = analyze(model, input_specs(model))
    assert analysis.macs == 6 * 8 and analysis.unknown == ["second"]
    _, report = red_onnx.compress(model, tolerance=0, verify_result=False)  # onnxruntime cannot run MyOp
    assert report.macs_before == 6 * 8
    assert any("MACs leave out 1 linear node(s)" in n and "'second'" in n for n in report.notes)


def test_node_macs_unknown_shape_is_none():
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"])
    assert node_macs(node, {"w": (2, 1, 3, 3)}) is None
    assert node_macs(onnx.helper.make_node("Relu", ["x"], ["y"]), {}) == 0


def test_params_count_float_initializers_and_constant_nodes():
    b = Builder(seed=14)
    x = b.input("x", ["N", 3])
    y = b.node("Mul", [x, b.constant_node(np.ones((4, 3)))])
    y = b.node("Reshape", [y, b.init(np.array([-1, 12]), dtype=np.int64)])
    b.output(y, ["N", 12])
    a = analysis_of(b, {"x": (4, 3)})
    assert a.params == 12  # the int64 shape is not a parameter


def test_leading_symbolic_dim_counts_as_one():
    def model(dim):
        b = Builder(seed=15)
        x = b.input("x", [dim, 3, 6, 6])
        b.output(b.conv(x, 3, 4, name="conv"), [dim, 4, 6, 6])
        return b.model()

    symbolic, fixed = model("batch"), model(1)
    assert input_specs(symbolic)["x"][0] == (1, 3, 6, 6)
    assert analyze(symbolic).macs == analyze(fixed).macs == 4 * 36 * 3 * 9
    assert red_onnx.analyze(symbolic).params == analyze(fixed).params


def test_non_batch_symbolic_dim_needs_input_shapes():
    b = Builder(seed=16)
    x = b.input("image", ["N", 3, "height", 8])
    b.output(b.conv(x, 3, 4, name="conv"), ["N", 4, "height", 8])
    model = b.model()
    with pytest.raises(InputError) as err:
        input_specs(model)
    message = str(err.value)
    assert "'image'" in message and "dimension 2" in message and "height" in message
    assert "--input-shape image:1,3,N,8" in message
    with pytest.raises(InputError, match="image"):
        analyze(model)
    with pytest.raises(InputError, match="image"):
        red_onnx.compress(model)

    specs = input_specs(model, {"image": (1, 3, 10, 8)})
    assert specs["image"][0] == (1, 3, 10, 8)
    assert analyze(model, specs).macs == 4 * 10 * 8 * 3 * 9
    result, report = red_onnx.compress(model, input_shapes={"image": (1, 3, 10, 8)})
    assert report.macs_before == 4 * 10 * 8 * 3 * 9 and report.verified


def test_input_shapes_errors():
    b = Builder(seed=17)
    x = b.input("x", ["N", 3])
    b.output(b.relu(x), ["N", 3])
    model = b.model()
    with pytest.raises(InputError, match="rank"):
        input_specs(model, {"x": (1, 3, 1)})
    with pytest.raises(InputError, match="no input named 'y'"):
        input_specs(model, {"y": (1, 3)})


def test_tensor_shapes_use_specs():
    b = Builder(seed=18)
    x = b.input("x", ["N", 3, "H", "W"])
    b.output(b.conv(x, 3, 4, stride=2, name="conv"), ["N", 4, "H2", "W2"])
    model = b.model()
    shapes = tensor_shapes(model, input_specs(model, {"x": (1, 3, 10, 6)}))
    assert shapes["x"] == (1, 3, 10, 6)
    assert shapes[model.graph.output[0].name] == (1, 4, 5, 3)


def test_quantized_layers_count_their_macs_and_weights(tmp_path):
    """A model onnxruntime's quantize_dynamic wrote (DynamicQuantizeLinear → ConvInteger,
    MatMulInteger) has the MACs of its float input and its int8 weights as parameters (it had 0
    MACs and only its biases and scales); QLinearConv and QLinearMatMul read their weight at 3."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    b = Builder(seed=17)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Flatten", [b.relu(b.conv(x, 3, 8, name="conv"))])
    b.output(b.matmul(h, 8 * 36, 5), ["N", 5])
    model = b.model()
    onnx.save(model, str(tmp_path / "f.onnx"))
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    assert {"ConvInteger", "MatMulInteger"} <= {n.op_type for n in quantized.graph.node}
    before, after = analyze(model), analyze(quantized)
    assert after.macs == before.macs == 8 * 36 * 3 * 9 + 8 * 36 * 5
    weights = 8 * 3 * 9 + 8 * 36 * 5
    assert weights <= after.params and after.params - weights < before.params - weights + 8  # scales, zero points
    shapes = {"x": (1, 3, 6, 6), "w": (8, 3, 3, 3), "y": (1, 8, 4, 4), "a": (1, 7), "m": (7, 2)}
    conv = onnx.helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    matmul = onnx.helper.make_node("QLinearMatMul", ["a", "as", "az", "m", "ms", "mz", "ys", "yz"], ["y2"])
    assert node_macs(conv, shapes) == 8 * 16 * 27 and node_macs(matmul, shapes) == 7 * 2
