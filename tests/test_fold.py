"""Canonicalization (passes/fold.py) through red_onnx.compress at tolerance 0.

Each case checks (a) outputs equal to float rounding with onnxruntime, (b) a numpy oracle on the
rewritten initializers where the rewrite is structural, (c) the expected node structure, and (d) a
valid model with the input model's interface and model-level fields (conftest.assert_preserved).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from red_onnx.errors import InputError

from conftest import (Builder, assert_identical_outputs, assert_preserved, assert_same_outputs, attr, compress0,
                      initializer, node_input_value, nodes_of, op_counts, run)

FOLD_ONLY: list[str] = []  # passes=[]: canonicalization only, so oracles see the fold alone


def bn_scale_shift(builder: Builder, bn_node: onnx.NodeProto, eps: float = 1e-5):
    gamma, beta, mean, var = (builder.arrays[n].astype(np.float64) for n in bn_node.input[1:5])
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def last_node(builder: Builder) -> onnx.NodeProto:
    return builder.nodes[-1]


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=1e-6 * np.abs(expected).max())


def fold_report(report) -> dict:
    rows = [p for p in report.passes if p["name"] == "fold"]
    assert len(rows) == 1
    return rows[0]


# --------------------------------------------------------------------------------------------- #
# Conv + BatchNormalization


@pytest.mark.parametrize("bias", [True, False], ids=["conv_bias", "no_conv_bias"])
@pytest.mark.parametrize("kind", ["plain", "grouped", "depthwise", "conv1d"])
def test_conv_bn_folds(bias, kind):
    b = Builder(seed=1)
    c_in, c_out, group, ndim = {"plain": (3, 5, 1, 2), "grouped": (4, 6, 2, 2), "depthwise": (4, 4, 4, 2),
                                "conv1d": (3, 5, 1, 1)}[kind]
    shape = ["N", c_in, 7, 6] if ndim == 2 else ["N", c_in, 9]
    x = b.input("x", shape)
    c = b.conv(x, c_in, c_out, group=group, bias=bias, name="conv", ndim=ndim)
    conv = last_node(b)
    y = b.bn(c, c_out, eps=1e-3, name="bn")
    b.output(y, ["N", c_out] + shape[2:])
    model = b.model()

    result, report = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"Conv": 1}
    scale, shift = bn_scale_shift(b, last_node(b), eps=1e-3)
    (new,) = nodes_of(result, "Conv")
    assert attr(new, "group", 1) == group
    w = b.arrays[conv.input[1]].astype(np.float64)
    bias0 = b.arrays[conv.input[2]].astype(np.float64) if bias else np.zeros(c_out)
    assert_close(node_input_value(result, new, 1), w * scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    assert_close(node_input_value(result, new, 2), bias0 * scale + shift)
    assert new.output[0] == y
    assert fold_report(report)["affine_folded"] == 1
    assert fold_report(report)["modified"] is True
    assert_same_outputs(model, result)


def test_conv_bn_default_pipeline_exact():
    b = Builder(seed=2)
    x = b.input("x", ["batch", 3, 8, 8])
    h = b.relu(b.bn(b.conv(x, 3, 8), 8))
    h = b.relu(b.bn(b.conv(h, 8, 8, k=3, bias=False), 8))
    y = b.bn(b.conv(h, 8, 4, k=1), 4)
    b.output(y, ["batch", 4, 8, 8])
    model = b.model()
    result, report = compress0(model)
    assert "BatchNormalization" not in op_counts(result)
    assert op_counts(result)["Conv"] == 3
    assert report.verified and report.output_deviation <= 1e-5
    assert report.params_after < report.params_before
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# ConvTranspose + BatchNormalization


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn_folds(group, bias):
    b = Builder(seed=3)
    c_in, c_out = 4, 6
    x = b.input("x", ["N", c_in, 5, 5])
    c = b.conv_transpose(x, c_in, c_out, group=group, bias=bias, stride=2, name="deconv")
    deconv = last_node(b)
    y = b.bn(c, c_out)
    b.output(y, ["N", c_out, 11, 11])
    model = b.model()

    result, _ = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"ConvTranspose": 1}
    scale, shift = bn_scale_shift(b, last_node(b))
    (new,) = nodes_of(result, "ConvTranspose")
    w = b.arrays[deconv.input[1]].astype(np.float64)  # (C_in, C_out/g, k, k)
    i_g, o_g = c_in // group, c_out // group
    expected = (w.reshape(group, i_g, o_g, 3, 3) * scale.reshape(group, 1, o_g, 1, 1)).reshape(w.shape)
    assert_close(node_input_value(result, new, 1), expected)
    bias0 = b.arrays[deconv.input[2]].astype(np.float64) if bias else np.zeros(c_out)
    assert_close(node_input_value(result, new, 2), bias0 * scale + shift)
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# Gemm


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_bn_folds(trans_b, bias):
    b = Builder(seed=4)
    x = b.input("x", ["N", 7])
    g = b.gemm(x, 7, 5, trans_b=trans_b, bias=bias, name="fc")
    gemm = last_node(b)
    y = b.bn(g, 5)
    b.output(y, ["N", 5])
    model = b.model()

    result, _ = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"Gemm": 1}
    scale, shift = bn_scale_shift(b, last_node(b))
    (new,) = nodes_of(result, "Gemm")
    assert attr(new, "transB", 0) == trans_b
    w = b.arrays[gemm.input[1]].astype(np.float64)
    assert_close(node_input_value(result, new, 1), w * (scale[:, None] if trans_b else scale[None, :]))
    bias0 = b.arrays[gemm.input[2]].astype(np.float64) if bias else np.zeros(5)
    assert_close(node_input_value(result, new, 2).reshape(-1), bias0 * scale + shift)
    assert_same_outputs(model, result)


@pytest.mark.parametrize("with_bn", [False, True])
def test_gemm_alpha_beta_folded_into_constants(with_bn):
    b = Builder(seed=5)
    x = b.input("x", ["N", 6])
    g = b.gemm(x, 6, 4, trans_b=1, alpha=0.5, beta=-2.0, name="fc")
    gemm = last_node(b)
    if with_bn:
        g = b.bn(g, 4)
    b.output(g, ["N", 4])
    model = b.model()

    result, report = compress0(model, passes=FOLD_ONLY)

    (new,) = nodes_of(result, "Gemm")
    assert attr(new, "alpha", 1.0) == 1.0 and attr(new, "beta", 1.0) == 1.0
    scale, shift = bn_scale_shift(b, last_node(b)) if with_bn else (np.ones(4), np.zeros(4))
    w = b.arrays[gemm.input[1]].astype(np.float64)
    c = b.arrays[gemm.input[2]].astype(np.float64)
    assert_close(node_input_value(result, new, 1), 0.5 * w * scale[:, None])
    assert_close(node_input_value(result, new, 2), -2.0 * c * scale + shift)
    assert fold_report(report)["gemm_scalars_folded"] == 2
    assert "BatchNormalization" not in op_counts(result)
    assert_same_outputs(model, result)


def test_gemm_trans_a_bn_folds():
    b = Builder(seed=6)
    x = b.input("x", [7, 3])  # transA: A is (K, M)
    g = b.gemm(x, 7, 5, trans_a=1, trans_b=0, name="fc")
    gemm = last_node(b)
    y = b.bn(g, 5)
    b.output(y, [3, 5])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Gemm": 1}
    (new,) = nodes_of(result, "Gemm")
    assert attr(new, "transA", 0) == 1
    scale, shift = bn_scale_shift(b, last_node(b))
    assert_close(node_input_value(result, new, 1), b.arrays[gemm.input[1]].astype(np.float64) * scale[None, :])
    assert_same_outputs(model, result)


def test_gemm_bias_per_row_is_not_a_per_output_bias():
    """C of shape (M, 1) adds one value per *sample* row; here M == N so its size matches the outputs."""
    b = Builder(seed=7)
    x = b.input("x", [3, 3])
    w = b.init(b.weight((3, 3)))
    c = b.init(b.rng.standard_normal((3, 1)))
    g = b.node("Gemm", [x, w, c], name="fc", transB=1)
    s = b.init(b.rng.uniform(0.5, 2.0, (1, 3)))
    y = b.node("Mul", [g, s])
    b.output(y, [3, 3])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# MatMul


def test_matmul_add_mul_folds():
    b = Builder(seed=8)
    x = b.input("x", ["N", 6])
    h = b.matmul(x, 6, 4, bias=True, name="mm")
    mm, add = b.nodes[-2], b.nodes[-1]
    s = b.rng.uniform(0.5, 2.0, 4).astype(np.float32)
    y = b.node("Mul", [h, b.init(s)])
    b.output(y, ["N", 4])
    model = b.model()

    result, _ = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"MatMul": 1, "Add": 1}
    (new_mm,), (new_add,) = nodes_of(result, "MatMul"), nodes_of(result, "Add")
    assert new_add.output[0] == y
    assert_close(initializer(result, new_mm.input[1]), b.arrays[mm.input[1]].astype(np.float64) * s[None, :])
    bias = [initializer(result, i) for i in new_add.input if i != new_mm.output[0]]
    assert len(bias) == 1
    assert_close(bias[0].reshape(-1), b.arrays[add.input[1]].astype(np.float64) * s)
    assert_same_outputs(model, result)


def test_matmul_without_bias_mul_folds():
    b = Builder(seed=9)
    x = b.input("x", ["N", 6])
    h = b.matmul(x, 6, 4, name="mm")
    s = b.rng.uniform(0.5, 2.0, (1, 4)).astype(np.float32)
    y = b.node("Mul", [h, b.init(s)])
    b.output(y, ["N", 4])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert "Mul" not in op_counts(result)
    assert set(op_counts(result)) <= {"MatMul", "Add"}
    assert_same_outputs(model, result)


def test_matmul_rank2_bn_folds():
    b = Builder(seed=10)
    x = b.input("x", ["N", 6])
    y = b.bn(b.matmul(x, 6, 4, bias=True), 4)
    b.output(y, ["N", 4])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"MatMul": 1, "Add": 1}
    assert_same_outputs(model, result)


@pytest.mark.parametrize("mul_shape", [(5,), (1, 5), (1, 1, 5)])
def test_matmul_rank3_per_feature_mul_add_folds(mul_shape):
    b = Builder(seed=11)
    x = b.input("x", ["N", 4, 6])
    h = b.matmul(x, 6, 5, name="mm")
    mm = last_node(b)
    s = b.rng.uniform(0.5, 2.0, mul_shape).astype(np.float32)
    t = b.rng.standard_normal((1, 1, 5)).astype(np.float32)
    y = b.node("Add", [b.node("Mul", [h, b.init(s)]), b.init(t)])
    b.output(y, ["N", 4, 5])
    model = b.model()

    result, _ = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"MatMul": 1, "Add": 1}
    (new_mm,) = nodes_of(result, "MatMul")
    assert_close(initializer(result, new_mm.input[1]),
                 b.arrays[mm.input[1]].astype(np.float64) * s.reshape(-1)[None, :])
    (new_add,) = nodes_of(result, "Add")
    bias = [initializer(result, i) for i in new_add.input if i != new_mm.output[0]]
    assert_close(bias[0].reshape(-1), t.reshape(-1).astype(np.float64))
    assert_same_outputs(model, result)


def test_matmul_rank3_bn_not_folded():
    """BN normalizes axis 1 (here the sequence axis, of the same length as the features)."""
    b = Builder(seed=12)
    x = b.input("x", ["N", 5, 6])
    h = b.matmul(x, 6, 5, bias=True, name="mm")
    y = b.bn(h, 5)
    b.output(y, ["N", 5, 5])
    model = b.model()
    w = b.arrays[b.nodes[0].input[1]]
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"MatMul": 1, "Add": 1, "BatchNormalization": 1}
    np.testing.assert_array_equal(initializer(result, nodes_of(result, "MatMul")[0].input[1]), w)
    assert_same_outputs(model, result)


def test_matmul_rank3_mul_on_sequence_axis_not_folded():
    b = Builder(seed=13)
    x = b.input("x", ["N", 5, 6])
    h = b.matmul(x, 6, 5, name="mm")
    y = b.node("Mul", [h, b.init(b.rng.uniform(0.5, 2, (5, 1)))])
    b.output(y, ["N", 5, 5])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"MatMul": 1, "Mul": 1}
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# per-channel Mul / Add / Sub / Div by constants


@pytest.mark.parametrize("shape", [(6, 1, 1), (1, 6, 1, 1)], ids=["C11", "1C11"])
def test_unfused_bn_mul_add_folds(shape):
    b = Builder(seed=14)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 6, name="conv")
    conv = last_node(b)
    s = b.rng.uniform(0.5, 2.0, shape).astype(np.float32) * b.rng.choice([-1, 1], shape).astype(np.float32)
    t = b.rng.standard_normal(shape).astype(np.float32)
    y = b.node("Add", [b.node("Mul", [c, b.init(s)]), b.init(t)])
    b.output(y, ["N", 6, 5, 5])
    model = b.model()

    result, report = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"Conv": 1}
    (new,) = nodes_of(result, "Conv")
    sv, tv = s.reshape(-1).astype(np.float64), t.reshape(-1).astype(np.float64)
    assert_close(node_input_value(result, new, 1), b.arrays[conv.input[1]].astype(np.float64) * sv[:, None, None, None])
    assert_close(node_input_value(result, new, 2), b.arrays[conv.input[2]].astype(np.float64) * sv + tv)
    assert fold_report(report)["affine_folded"] == 2
    assert_same_outputs(model, result)


def test_constant_first_mul_and_add_fold():
    b = Builder(seed=15)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 4)
    y = b.node("Add", [b.init(b.rng.standard_normal((4, 1, 1))), b.node("Mul", [b.init(np.float32(1.5)), c])])
    b.output(y, ["N", 4, 5, 5])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Conv": 1}
    assert_same_outputs(model, result)


def test_sub_and_div_by_constants_fold():
    b = Builder(seed=16)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 4, name="conv")
    conv = last_node(b)
    sub = b.rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    div = (b.rng.uniform(0.5, 2.0, (4, 1, 1)) * b.rng.choice([-1, 1], (4, 1, 1))).astype(np.float32)
    y = b.node("Div", [b.node("Sub", [c, b.init(sub)]), b.init(div)])
    b.output(y, ["N", 4, 5, 5])
    model = b.model()

    result, _ = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"Conv": 1}
    (new,) = nodes_of(result, "Conv")
    d = div.reshape(-1).astype(np.float64)
    assert_close(node_input_value(result, new, 1), b.arrays[conv.input[1]].astype(np.float64) / d[:, None, None, None])
    assert_close(node_input_value(result, new, 2), (b.arrays[conv.input[2]] - sub.reshape(-1)) / d)
    assert_same_outputs(model, result)


@pytest.mark.parametrize("op", ["Sub", "Div"])
def test_constant_minus_or_over_x_not_folded(op):
    b = Builder(seed=17)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 4, name="conv")
    w = b.arrays[last_node(b).input[1]]
    const = b.init(b.rng.uniform(1.0, 2.0, (4, 1, 1)))
    y = b.node(op, [const, c])
    b.output(y, ["N", 4, 5, 5])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Conv": 1, op: 1}
    np.testing.assert_array_equal(initializer(result, nodes_of(result, "Conv")[0].input[1]), w)
    assert_same_outputs(model, result)


def test_div_by_constant_with_zero_not_folded():
    b = Builder(seed=18)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 4)
    y = b.node("Div", [c, b.init(np.array([1.0, 0.0, 2.0, 3.0]).reshape(4, 1, 1))])
    b.output(y, ["N", 4, 5, 5])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Conv": 1, "Div": 1}


@pytest.mark.parametrize("shape", [(6,), (1, 6, 5, 6), (2, 6, 1, 1)], ids=["last_axis", "full", "batch"])
def test_mul_not_per_channel_not_folded(shape):
    """(C,) broadcasts along the last (width) axis, not the channels; the others are not per channel."""
    b = Builder(seed=19)
    x = b.input("x", [2, 3, 5, 6])
    c = b.conv(x, 3, 6, name="conv")
    y = b.node("Mul", [c, b.init(b.rng.uniform(0.5, 2.0, shape))])
    b.output(y, [2, 6, 5, 6])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Conv": 1, "Mul": 1}
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# when not to fold


def test_shared_weights_left_alone_with_reason():
    b = Builder(seed=20)
    x = b.input("x", ["N", 3, 5, 5])
    w = b.init(b.weight((4, 3, 3, 3)), name="shared_w")
    c1 = b.node("Conv", [x, w, b.init(np.zeros(4))], name="conv_a", pads=[1, 1, 1, 1])
    c2 = b.node("Conv", [x, w, b.init(np.ones(4))], name="conv_b", pads=[1, 1, 1, 1])
    y1, y2 = b.bn(c1, 4), b.bn(c2, 4)
    b.output(y1, ["N", 4, 5, 5])
    b.output(y2, ["N", 4, 5, 5])
    model = b.model()

    result, report = compress0(model)

    assert op_counts(result) == {"Conv": 2, "BatchNormalization": 2}
    convs = nodes_of(result, "Conv")
    assert [n.input[1] for n in convs] == ["shared_w", "shared_w"]
    np.testing.assert_array_equal(initializer(result, "shared_w"), b.arrays["shared_w"])
    rows = {r["name"]: r for r in report.layers}
    for name in ("conv_a", "conv_b"):
        assert "shared" in rows[name].get("left_alone", ""), rows[name]
    assert_same_outputs(model, result)


def test_weights_tied_through_identity_are_shared():
    """PyTorch exports tied weights as W -> Identity -> W': after removing the Identity, W has two users."""
    b = Builder(seed=39)
    x = b.input("x", ["N", 3, 5, 5])
    w = b.init(b.weight((4, 3, 3, 3)), name="tied_w")
    w2 = b.node("Identity", [w])
    y1 = b.bn(b.node("Conv", [x, w], name="conv_a", pads=[1, 1, 1, 1]), 4)
    y2 = b.bn(b.node("Conv", [x, w2], name="conv_b", pads=[1, 1, 1, 1]), 4)
    b.output(y1, ["N", 4, 5, 5])
    b.output(y2, ["N", 4, 5, 5])
    model = b.model()
    result, report = compress0(model)
    assert op_counts(result) == {"Conv": 2, "BatchNormalization": 2}
    np.testing.assert_array_equal(initializer(result, "tied_w"), b.arrays["tied_w"])
    assert [n.input[1] for n in nodes_of(result, "Conv")] == ["tied_w", "tied_w"]
    assert_same_outputs(model, result)


def test_excluded_layer_not_folded():
    b = Builder(seed=40)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.bn(b.conv(x, 3, 4, name="keep_me"), 4)
    y = b.bn(b.conv(h, 4, 4, name="fold_me"), 4)
    b.output(y, ["N", 4, 5, 5])
    model = b.model()
    result, report = compress0(model, exclude="keep")
    assert op_counts(result) == {"Conv": 2, "BatchNormalization": 1}
    rows = {r["name"]: r for r in report.layers}
    assert "exclude" in rows["keep_me"].get("left_alone", "")
    assert "left_alone" not in rows["fold_me"]
    assert_same_outputs(model, result)


def test_conv_output_with_two_consumers_bn_kept():
    b = Builder(seed=21)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 4, name="conv")
    w = b.arrays[last_node(b).input[1]]
    y1 = b.bn(c, 4)
    y2 = b.relu(c)
    b.output(y1, ["N", 4, 5, 5])
    b.output(y2, ["N", 4, 5, 5])
    model = b.model()
    result, _ = compress0(model)
    assert op_counts(result) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    np.testing.assert_array_equal(initializer(result, nodes_of(result, "Conv")[0].input[1]), w)
    assert_same_outputs(model, result)


def test_bn_output_with_two_consumers_still_folds():
    """The BN's own output may have many consumers: they all read the folded conv's output."""
    b = Builder(seed=22)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.bn(b.conv(x, 3, 4), 4)
    b.output(b.relu(h), ["N", 4, 5, 5])
    b.output(b.node("Sigmoid", [h]), ["N", 4, 5, 5])
    model = b.model()
    result, _ = compress0(model)
    assert op_counts(result) == {"Conv": 1, "Relu": 1, "Sigmoid": 1}
    assert_same_outputs(model, result)


def test_conv_output_that_is_graph_output_bn_kept():
    b = Builder(seed=23)
    x = b.input("x", ["N", 3, 5, 5])
    c = b.conv(x, 3, 4, name="conv")
    y = b.bn(c, 4)
    b.output(c, ["N", 4, 5, 5])
    b.output(y, ["N", 4, 5, 5])
    model = b.model()
    result, _ = compress0(model)
    assert op_counts(result) == {"Conv": 1, "BatchNormalization": 1}
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# Constant nodes, Identity, Dropout


def test_constant_node_weights_become_initializers_and_fold():
    b = Builder(seed=24)
    x = b.input("x", ["N", 3, 5, 5])
    w = b.constant_node(b.weight((4, 3, 3, 3)))
    bias = b.constant_node(b.rng.standard_normal(4))
    c = b.node("Conv", [x, w, bias], name="conv", pads=[1, 1, 1, 1])
    bn = [b.constant_node(a) for a in b.bn_params(4)]
    h = b.node("BatchNormalization", [c] + bn)
    scalar = b.fresh("scalar")
    b.nodes.append(helper.make_node("Constant", [], [scalar], name="scalar_node", value_float=0.25))
    y = b.node("Mul", [h, scalar])
    b.output(y, ["N", 4, 5, 5])
    model = b.model()
    assert op_counts(model)["Constant"] == 7

    result, report = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"Conv": 1}
    assert fold_report(report)["constants_to_initializers"] == 7
    (conv,) = nodes_of(result, "Conv")
    gamma, beta, mean, var = (b.arrays[n].astype(np.float64) for n in bn)
    s = gamma / np.sqrt(var + 1e-5) * 0.25
    assert_close(initializer(result, conv.input[1]), b.arrays[w].astype(np.float64) * s[:, None, None, None])
    assert_close(initializer(result, conv.input[2]), (b.arrays[bias] - mean) * gamma / np.sqrt(var + 1e-5) * 0.25
                 + beta * 0.25)
    assert_same_outputs(model, result)


def test_constant_node_that_is_graph_output_kept():
    b = Builder(seed=25)
    x = b.input("x", ["N", 2])
    k = b.constant_node(np.arange(3))
    b.output(b.relu(x), ["N", 2])
    b.output(k, [3])
    model = b.model()
    result, _ = compress0(model)
    assert op_counts(result) == {"Relu": 1, "Constant": 1}
    assert_same_outputs(model, result)


def test_identity_and_dropout_removed_graph_output_identity_kept():
    b = Builder(seed=26)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.node("Identity", [x])
    h = b.conv(h, 3, 4)
    h = b.node("Dropout", [h])
    h = b.relu(h)
    h = b.node("Identity", [h])
    h = b.conv(h, 4, 4)
    out = b.node("Identity", [h])
    b.output(out, ["N", 4, 5, 5])
    model = b.model()

    result, report = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result) == {"Conv": 2, "Relu": 1, "Identity": 1}
    (ident,) = nodes_of(result, "Identity")
    assert ident.output[0] == out
    assert nodes_of(result, "Conv")[0].input[0] == "x"
    assert fold_report(report)["identities_removed"] == 3
    assert_same_outputs(model, result)


def test_dropout_with_constant_false_training_mode_removed():
    b = Builder(seed=27)
    x = b.input("x", ["N", 4])
    ratio = b.init(np.float32(0.5))
    mode = b.init(np.array(False), dtype=np.bool_)
    h = b.node("Dropout", [b.relu(x), ratio, mode])
    b.output(b.node("Sigmoid", [h]), ["N", 4])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Relu": 1, "Sigmoid": 1}
    assert_same_outputs(model, result)


def test_dropout_in_training_mode_kept():
    b = Builder(seed=28)
    x = b.input("x", ["N", 4])
    ratio = b.init(np.float32(0.0))  # ratio 0: deterministic even in training mode
    mode = b.init(np.array(True), dtype=np.bool_)
    h = b.node("Dropout", [b.relu(x), ratio, mode])
    b.output(b.node("Sigmoid", [h]), ["N", 4])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Relu": 1, "Dropout": 1, "Sigmoid": 1}


def test_dropout_whose_mask_is_a_graph_output():
    """Removing the Dropout would leave the graph output 'mask' without a producer."""
    b = Builder(seed=29)
    x = b.input("x", ["N", 4])
    d, mask = b.node("Dropout", [b.relu(x)], n_outputs=2)
    b.output(b.node("Sigmoid", [d]), ["N", 4])
    b.output(mask, ["N", 4], elem=TensorProto.BOOL)
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# graphs that must pass through unchanged


def _unchanged(model: onnx.ModelProto, result: onnx.ModelProto) -> None:
    assert [n.op_type for n in result.graph.node] == [n.op_type for n in model.graph.node]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert_identical_outputs(model, result)


def test_residual_add_graph_unchanged_and_exact():
    b = Builder(seed=30)
    x = b.input("x", ["N", 4, 6, 6])
    h = b.relu(b.conv(x, 4, 4))
    r = b.conv(h, 4, 4)
    y = b.relu(b.node("Add", [h, r]))
    b.output(y, ["N", 4, 6, 6])
    model = b.model()
    result, report = compress0(model)
    _unchanged(model, result)
    assert not any(p["modified"] for p in report.passes)
    assert report.params_after == report.params_before and report.macs_after == report.macs_before


def test_a_graph_nothing_applies_to_is_written_as_it_came():
    """Unnamed nodes, a lossy tolerance, nothing any pass can use (a 1-channel conv feeding a
    Sigmoid): the output is the input, not an export that names and reorders its nodes, and the
    caller's model is not it."""
    b = Builder(seed=32, name_nodes=False)
    x = b.input("x", ["N", 3, 6, 6])
    b.output(b.node("Sigmoid", [b.conv(x, 3, 1)]), ["N", 1, 6, 6])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0.1)
    assert not any(p["modified"] for p in report.passes) and report.verified
    assert result.SerializeToString() == model.SerializeToString() and result is not model


def test_concat_graph_unchanged_and_exact():
    b = Builder(seed=31)
    x = b.input("x", ["N", 3, 6, 6])
    a = b.conv(x, 3, 4)
    c = b.relu(b.conv(x, 3, 2, k=1))
    y = b.node("Concat", [a, c], axis=1)
    y = b.conv(y, 6, 3)
    b.output(y, ["N", 3, 6, 6])
    model = b.model()
    result, _ = compress0(model)
    _unchanged(model, result)


# --------------------------------------------------------------------------------------------- #
# opsets, IR versions, naming


@pytest.mark.parametrize("opset", [9, 11, 13, 15, 17])
def test_conv_bn_fold_keeps_opset(opset):
    b = Builder(seed=32)
    x = b.input("x", ["N", 3, 5, 5])
    y = b.relu(b.bn(b.conv(x, 3, 4), 4))
    b.output(y, ["N", 4, 5, 5])
    model = b.model(opset=opset)
    result, _ = compress0(model)
    assert result.opset_import[0].version == opset
    assert op_counts(result) == {"Conv": 1, "Relu": 1}
    assert_same_outputs(model, result)


def _initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def test_initializers_listed_as_graph_inputs():
    """keep_initializers_as_inputs=True exports (IR >= 4): every weight is also a graph input."""
    b = Builder(seed=33)
    x = b.input("x", ["N", 3, 5, 5])
    y = b.relu(b.bn(b.conv(x, 3, 4, bias=False), 4))
    b.output(y, ["N", 4, 5, 5])
    model = _initializers_as_inputs(b.model(opset=13, check=False))
    onnx.checker.check_model(model, full_check=True)
    result, _ = red_onnx.compress(model, tolerance=0, passes=FOLD_ONLY)
    onnx.checker.check_model(result, full_check=True)
    assert_same_outputs(model, result)


def test_ir3_model_keeps_initializers_in_graph_inputs():
    """IR version 3 requires every initializer to be a graph input, new ones (a folded bias) too."""
    b = Builder(seed=34)
    x = b.input("x", [1, 3, 5, 5])
    y = b.relu(b.bn(b.conv(x, 3, 4, bias=False), 4))
    b.output(y, [1, 4, 5, 5])
    model = _initializers_as_inputs(b.model(opset=8, ir_version=3, check=False))
    onnx.checker.check_model(model, full_check=True)
    result, _ = red_onnx.compress(model, tolerance=0, passes=FOLD_ONLY)
    onnx.checker.check_model(result, full_check=True)
    assert result.ir_version == 3
    assert_same_outputs(model, result)


def test_unnamed_nodes_get_unique_new_tensor_names():
    """Nodes without names (onnx.helper's default): two bias-free Convs + BN each get a new bias."""
    b = Builder(seed=35, name_nodes=False)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.bn(b.conv(x, 3, 4, bias=False), 4)
    y = b.bn(b.conv(h, 4, 4, bias=False), 4)
    h2 = b.node("Mul", [b.matmul(b.node("Flatten", [y]), 100, 5), b.init(b.rng.uniform(1, 2, 5))])
    y2 = b.node("Mul", [b.matmul(h2, 5, 3), b.init(b.rng.uniform(1, 2, 3))])
    b.output(y2, ["N", 3])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert "BatchNormalization" not in op_counts(result) and "Mul" not in op_counts(result)
    assert_same_outputs(model, result)


def test_new_bias_name_does_not_collide_with_an_existing_tensor():
    """A bias-free Conv named 'conv' gets a bias; another layer's bias is already called 'conv_bias'."""
    b = Builder(seed=41)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.bn(b.conv(x, 3, 4, bias=False, name="conv"), 4)
    other = b.node("Conv", [x, b.init(b.weight((4, 3, 3, 3))), b.init(np.arange(4.0), name="conv_bias")],
                   name="other", pads=[1, 1, 1, 1])
    b.output(h, ["N", 4, 5, 5])
    b.output(other, ["N", 4, 5, 5])
    model = b.model()
    result, _ = compress0(model, passes=FOLD_ONLY)
    assert op_counts(result) == {"Conv": 2}
    np.testing.assert_array_equal(initializer(result, "conv_bias"), np.arange(4.0, dtype=np.float32))
    assert_same_outputs(model, result)


def test_nan_in_constant_node_weight_is_input_error():
    b = Builder(seed=36)
    x = b.input("x", ["N", 3, 5, 5])
    w = b.weight((4, 3, 3, 3))
    w[1, 2, 0, 0] = np.nan
    y = b.node("Conv", [x, b.constant_node(w)], pads=[1, 1, 1, 1])
    b.output(y, ["N", 4, 5, 5])
    model = b.model()
    with pytest.raises(InputError, match="NaN"):
        red_onnx.compress(model, tolerance=0)


def test_nan_in_initializer_weight_is_input_error():
    b = Builder(seed=37)
    x = b.input("x", ["N", 6])
    g = b.gemm(x, 6, 3)
    b.arrays[last_node(b).input[1]][0, 0] = np.nan
    b.initializers[0].CopyFrom(numpy_helper.from_array(b.arrays[last_node(b).input[1]], last_node(b).input[1]))
    b.output(g, ["N", 3])
    model = b.model()
    with pytest.raises(InputError, match="NaN"):
        red_onnx.compress(model, tolerance=0)


def test_compress_accepts_a_path(tmp_path):
    b = Builder(seed=38)
    x = b.input("x", ["N", 3, 5, 5])
    b.output(b.bn(b.conv(x, 3, 4), 4), ["N", 4, 5, 5])
    model = b.model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result, report = red_onnx.compress(str(path), tolerance=0)
    assert_preserved(model, result)
    assert op_counts(result) == {"Conv": 1}
    assert report.verified


# --------------------------------------------------------------------------------------------- #
# property: random small valid graphs


@st.composite
def chains(draw):
    b = Builder(seed=draw(st.integers(0, 2**16)))
    c = draw(st.integers(1, 4))
    x = b.input("x", ["N", c, 5, 5])
    cur, same = x, {c: [x]}
    for _ in range(draw(st.integers(1, 7))):
        op = draw(st.sampled_from(["conv", "conv", "bn", "mul", "add", "sub_div", "relu", "identity", "residual"]))
        if op == "conv":
            c_out = draw(st.integers(1, 5))
            group = c if (c == c_out and c > 1 and draw(st.booleans())) else 1
            cur = b.conv(cur, c, c_out, k=draw(st.sampled_from([1, 3])), group=group, bias=draw(st.booleans()))
            c = c_out
        elif op == "bn":
            cur = b.bn(cur, c)
        elif op in ("mul", "add", "sub_div"):
            shape = draw(st.sampled_from([(), (c, 1, 1), (1, c, 1, 1)]))
            v = b.rng.uniform(0.5, 2.0, shape) * b.rng.choice([-1.0, 1.0], shape)
            if op == "sub_div":
                cur = b.node("Div", [b.node("Sub", [cur, b.init(v)]), b.init(v * 1.5)])
            else:
                args = [cur, b.init(v)]
                cur = b.node(op.capitalize(), args if draw(st.booleans()) else args[::-1])
        elif op == "relu":
            cur = b.relu(cur)
        elif op == "identity":
            cur = b.node("Identity", [cur])
        else:
            cur = b.node("Add", [cur, draw(st.sampled_from(same[c]))])
        same.setdefault(c, []).append(cur)
    if draw(st.booleans()):  # a classifier head
        k = c * 25
        cur = b.node("Flatten", [cur])
        same = {k: [cur]}
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["gemm", "gemm", "bn", "mul", "add", "relu", "identity", "residual"]))
            if op == "gemm":
                n = draw(st.integers(1, 6))
                cur = b.gemm(cur, k, n, trans_b=draw(st.integers(0, 1)), bias=draw(st.booleans()))
                k = n
            elif op == "bn":
                cur = b.bn(cur, k)
            elif op in ("mul", "add"):
                shape = draw(st.sampled_from([(), (k,), (1, k)]))
                v = b.rng.uniform(0.5, 2.0, shape) * b.rng.choice([-1.0, 1.0], shape)
                cur = b.node(op.capitalize(), [cur, b.init(v)])
            elif op == "relu":
                cur = b.relu(cur)
            elif op == "identity":
                cur = b.node("Identity", [cur])
            else:
                cur = b.node("Add", [cur, draw(st.sampled_from(same[k]))])
            same.setdefault(k, []).append(cur)
        cur = b.gemm(cur, k, 3)
        b.output(cur, ["N", 3])
    else:
        cur = b.conv(cur, c, 2, k=1)
        b.output(cur, ["N", 2, 5, 5])
    return b.model()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_property_random_chains_compress_exactly(model):
    result, report = compress0(model)
    assert report.verified
    assert len(result.graph.node) <= len(model.graph.node)
    assert_same_outputs(model, result, samples=2)


# --------------------------------------------------------------------------------------------- #
# A Transpose flattened into the features of linear layers (channels last, as Caffe and Keras exports flatten)


def transposed_features(b: Builder, x: str, channels: int, h: int, w: int, perm, how: str) -> str:
    """``x`` (N, C, H, W) transposed by ``perm``, then flattened to (N, C·H·W) by ``how``."""
    t = b.node("Transpose", [x], perm=list(perm))
    if how == "flatten":
        return b.node("Flatten", [t], axis=1)
    if how == "constant":
        return b.node("Reshape", [t, b.init(np.array([-1, channels * h * w]), dtype=np.int64)])
    shape = b.node("Shape", [t])  # torch's x.reshape(x.shape[0], -1)
    n = b.node("Gather", [shape, b.init(np.array(0), dtype=np.int64)], axis=0)
    n1 = b.node("Unsqueeze", [n, b.init(np.array([0]), dtype=np.int64)])
    return b.node("Reshape", [t, b.node("Concat", [n1, b.init(np.array([-1]), dtype=np.int64)], axis=0)])


def head(b: Builder, x: str, features: int, kind: str) -> str:
    return b.gemm(x, features, 7, name="fc") if kind == "gemm" else b.matmul(x, features, 7, bias=True, name="fc")


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
@pytest.mark.parametrize("how", ["flatten", "constant", "computed"])
@pytest.mark.parametrize("perm", [(0, 2, 3, 1), (0, 3, 2, 1)], ids=["nhwc", "nwhc"])
def test_transpose_before_flatten_folds_into_the_feature_columns(perm, how, kind):
    b = Builder(seed=3)
    x = b.input("x", ["N", 3, 5, 4])
    y = b.relu(b.conv(x, 3, 6, name="conv"))
    b.output(head(b, transposed_features(b, y, 6, 5, 4, perm, how), 120, kind), ["N", 7])
    model = b.model()

    result, report = compress0(model, passes=FOLD_ONLY)

    assert "Transpose" not in op_counts(result)
    assert fold_report(report)["transposes_folded"] == 1
    (fc,) = nodes_of(result, "Gemm" if kind == "gemm" else "MatMul")
    before = next(n for n in model.graph.node if n.name == "fc").input[1]
    w = b.arrays[before] if kind == "gemm" else b.arrays[before].T  # (7, 120): columns in the transposed order
    order = np.arange(120).reshape(6, 5, 4).transpose([a - 1 for a in perm[1:]]).ravel()
    expected = np.empty_like(w)
    expected[:, order] = w
    after = node_input_value(result, fc, 1)
    np.testing.assert_array_equal(after if kind == "gemm" else after.T, expected)
    assert_same_outputs(model, result)


def test_folded_transpose_lets_a_duplicate_channel_merge_exactly():
    b = Builder(seed=4)
    x = b.input("x", ["N", 3, 5, 4])
    w, bias = b.weight((6, 3, 3, 3)), b.rng.standard_normal(6).astype(np.float32)
    w[4], bias[4] = w[1], bias[1]
    y = b.relu(b.conv_w(x, w, bias, name="conv"))
    b.output(b.gemm(transposed_features(b, y, 6, 5, 4, (0, 3, 2, 1), "computed"), 120, 7, name="fc"), ["N", 7])
    model = b.model()

    result, _ = compress0(model)

    (conv,) = nodes_of(result, "Conv")
    assert node_input_value(result, conv, 1).shape[0] == 5
    assert node_input_value(result, nodes_of(result, "Gemm")[0], 1).shape == (7, 100)
    assert_same_outputs(model, result)


def test_transpose_read_by_another_node_is_not_folded():
    b = Builder(seed=5)
    x = b.input("x", ["N", 3, 5, 4])
    y = b.relu(b.conv(x, 3, 6, name="conv"))
    t = b.node("Transpose", [y], perm=[0, 2, 3, 1])
    b.output(b.gemm(b.node("Flatten", [t], axis=1), 120, 7, name="fc"), ["N", 7])
    b.output(b.node("ReduceMax", [t], keepdims=0))
    model = b.model()

    result, report = compress0(model, passes=FOLD_ONLY)

    assert op_counts(result)["Transpose"] == 1
    assert fold_report(report)["transposes_folded"] == 0
    assert_same_outputs(model, result)


def tied_lm(copy: str, vocab: int = 300, d: int = 32, t: int = 5, flip_bit: bool = False) -> onnx.ModelProto:
    """A language model whose output layer is tied to its embedding table, as torch's TorchScript
    exporter writes it: a second initializer holding the table's transpose (``copy="transposed"``,
    MatMul) or the table itself (``copy="same"``, Gemm transB=1)."""
    rng = np.random.default_rng(31)
    table = rng.standard_normal((vocab, d)).astype(np.float32)
    b = Builder(seed=31)
    ids = b.input("ids", ["N", t], elem=onnx.TensorProto.INT64)
    x = b.node("Relu", [b.matmul(b.node("Gather", [b.init(table, "table"), ids], axis=0), d, d)])
    head = table.T.copy() if copy == "transposed" else table.copy()
    if flip_bit:
        head.view(np.uint32)[3, 4] ^= 1
    if copy == "transposed":
        logits = b.node("MatMul", [x, b.init(head, "head_weight")], name="head")
    else:
        x = b.node("Reshape", [x, b.init(np.array([-1, d]), dtype=np.int64)])
        logits = b.node("Gemm", [x, b.init(head, "head_weight")], name="head", transB=1)
    b.output(logits)
    return b.model()


@pytest.mark.parametrize("copy", ["transposed", "same"])
def test_a_copy_of_an_embedding_table_reads_the_table(copy):
    """The tied output layer's copy of the table is dropped: the head reads the table (through a
    Transpose), the file holds it once, and the outputs are bit for bit the input's."""
    model = tied_lm(copy)
    result, report = red_onnx.compress(model, tolerance=0, input_shapes={"ids": (1, 5)})
    assert report.verified
    assert {"table", "head_weight"} & {t.name for t in result.graph.initializer} == {"table"}
    assert report.bytes_after < 0.55 * report.bytes_before
    head = next(n for n in result.graph.node if n.name == "head")
    producer = next((n for n in result.graph.node if head.input[1] in n.output), None)
    assert (producer.op_type, producer.input[0]) == ("Transpose", "table") if copy == "transposed" \
        else head.input[1] == "table"
    rng = np.random.default_rng(0)
    for _ in range(4):
        feeds = {"ids": rng.integers(0, 300, (1, 5))}
        assert np.array_equal(run(model, feeds)[0], run(result, feeds)[0])


def test_a_table_copy_that_differs_in_one_bit_is_kept():
    model = tied_lm("transposed", flip_bit=True)
    result, report = red_onnx.compress(model, tolerance=0, input_shapes={"ids": (1, 5)})
    assert {"table", "head_weight"} <= {t.name for t in result.graph.initializer}
    assert next(p for p in report.passes if p["name"] == "fold")["table_copies_tied"] == 0
