"""Exact output merging (red_onnx.passes.merge) on graphs with planted redundancy.

Every test plants a known number of redundant output channels (identical rows, positive multiples,
dead rows) into a layer, runs ``compress(model, tolerance=0, passes=["merge"])`` and checks that
exactly the planted channels are removed (by the result's weight shapes), that the result is a
valid model computing the same function (onnxruntime, relative L2 <= 1e-5, dynamic batch 3), and,
where the rewrite is known in closed form, the result's weights against a numpy oracle.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import red_onnx
from conftest import Builder
from graphs import (assert_same, attr, check_exact, inits, merge0, merge_counts, merge_reasons, node, plant,
                    rand_layer, removed, rel_l2, session, view_weight)
from red_onnx.coupling import channel_spaces
from red_onnx.layers import input_specs, tensor_shapes
from red_onnx.passes.merge import _channel_saving

MULTIPLES = [(5, 1, 2.5), (6, 2, 0.4)]  # row 5 = 2.5·row 1, row 6 = 0.4·row 2
DUPLICATES = [(5, 1, 1.0), (6, 2, 1.0)]


def conv_chain(plan, act="Relu", c=8, seed=0, act_attrs=None, pre=None):
    """x(N,3,8,8) → conv1 (c ch, planted) → [pre] → act → conv2 (4 ch) → y."""
    rng = np.random.default_rng(seed)
    g = Builder(seed)
    x = g.input("x", ["N", 3, 8, 8])
    w1, b1 = plant(*rand_layer(rng, c, 3, 3), plan)
    h = g.conv_w(x, w1, b1, name="conv1")
    if pre is not None:
        h = pre(g, h)
    if act is not None:
        h = g.act(h, act, **(act_attrs or {}))
    w2, b2 = rand_layer(rng, 4, c, 3)
    g.output(g.conv_w(h, w2, b2, name="conv2"))
    return g.model(), (w1, b1, w2, b2)


def merged_columns(w: np.ndarray, plan, axis_block: int = 1) -> np.ndarray:
    """numpy oracle: consumer weight (O, C·block, ...) with column block i += s · block j, j deleted."""
    o = w.shape[0]
    c = w.shape[1] // axis_block
    w3 = w.astype(np.float64).reshape((o, c, axis_block) + w.shape[2:])
    for j, i, s in plan:
        w3[:, i] += s * w3[:, j]
    w3 = np.delete(w3, [j for j, _, _ in plan], axis=1)
    return w3.reshape((o, w3.shape[1] * axis_block) + w.shape[2:])


# --------------------------------------------------------------------------------------------- #
# duplicates and positive multiples


@pytest.mark.aligned
def test_a_multiple_kept_for_alignment_keeps_its_own_scale():
    """9 channels, one dead and one 2.5x another: removing both leaves 7, so the latency guard's
    alignment to 8 keeps the multiple back; its consumers must then read it at scale 1 (they read
    it 2.5x, and the exact build deviated, before the fix)."""
    model, _ = conv_chain([(8, 1, 2.5), (7, 0, 0.0)], c=9)
    result, report = check_exact(model, {"conv1": 1})
    row = next(r for r in report.layers if r["name"] == "conv1")["merge"]
    assert row["kept_for_alignment"] == 1 and row["channels_after"] == 8


def test_duplicates_conv_relu_conv():
    model, (w1, b1, w2, b2) = conv_chain(DUPLICATES)
    result, report = check_exact(model, {"conv1": 2})
    counts = merge_counts(report)
    assert counts["channels_merged"] == 2 and counts["dead_removed"] == 0
    # the kept producer rows are the original ones, in order
    np.testing.assert_array_equal(view_weight(result, "conv1"), np.delete(w1, [5, 6], axis=0))
    np.testing.assert_array_equal(inits(result)[node(result, "conv1").input[2]], np.delete(b1, [5, 6]))
    assert report.params_after < report.params_before and report.macs_after < report.macs_before


def test_numpy_oracle_consumer_weight():
    """W2[:, i] + s·W2[:, j] in the consumer, column j deleted, for a positive multiple through Relu."""
    plan = [(3, 0, 1.75)]
    model, (w1, b1, w2, b2) = conv_chain(plan)
    result, _ = check_exact(model, {"conv1": 1})
    got = view_weight(result, "conv2")
    expected = merged_columns(w2, plan)
    assert got.shape == (4, 7, 3, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(inits(result)[node(result, "conv2").input[2]], b2)


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "MaxPool", "AveragePool", None])
def test_positive_multiples_homogeneous_paths(act):
    pre = None
    if act == "AveragePool":
        act = None
        pre = lambda g, h: g.node("AveragePool", [g.node("Relu", [h])], kernel_shape=[2, 2], strides=[2, 2])
    model, (w1, b1, w2, b2) = conv_chain(MULTIPLES, act=act, pre=pre)
    result, _ = check_exact(model, {"conv1": 2})
    np.testing.assert_allclose(view_weight(result, "conv2"), merged_columns(w2, MULTIPLES), rtol=1e-6, atol=1e-7)


def test_positive_multiples_gap_flatten_gemm():
    rng = np.random.default_rng(1)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    plan = [(2, 0, 3.0), (7, 4, 0.5), (6, 4, 1.0)]
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), plan)
    h = g.node("Relu", [g.conv_w(x, w1, b1, name="conv1")])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    w2, b2 = rand_layer(rng, 5, 8)
    g.output(g.gemm_w(h, w2, b2, name="fc"))
    model = g.model()
    result, _ = check_exact(model, {"conv1": 3})
    np.testing.assert_allclose(view_weight(result, "fc"), merged_columns(w2, plan), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("act", ["Sigmoid", "Clip", "HardSwish", "Tanh"])
def test_multiples_not_merged_through_non_homogeneous(act):
    pre = None
    if act == "Clip":
        act = None
        pre = lambda g, h: g.node("Clip", [h, g.const(np.float32(0)), g.const(np.float32(6))])
    model, _ = conv_chain(MULTIPLES, act=act, pre=pre)
    result, report = check_exact(model, {})
    assert merge_counts(report).get("channels_merged", 0) == 0


@pytest.mark.parametrize("act", ["Sigmoid", "Clip", "HardSwish", "Tanh"])
def test_duplicates_merged_through_non_homogeneous(act):
    pre = None
    if act == "Clip":
        act = None
        pre = lambda g, h: g.node("Clip", [h, g.const(np.float32(0)), g.const(np.float32(6))])
    model, (w1, b1, w2, b2) = conv_chain(DUPLICATES, act=act, pre=pre)
    result, _ = check_exact(model, {"conv1": 2})
    np.testing.assert_allclose(view_weight(result, "conv2"), merged_columns(w2, DUPLICATES), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "MaxPool", None])
def test_negative_multiples_never_merged(act):
    model, _ = conv_chain([(5, 1, -1.0), (6, 2, -2.0)], act=act)
    check_exact(model, {})


def test_multiples_of_different_directions_not_merged():
    """Nearly but not exactly parallel rows (relative 1e-3 off) are no exact merge."""
    rng = np.random.default_rng(3)
    w1, b1 = rand_layer(rng, 8, 3, 3)
    w1[5] = 2.0 * w1[1] + 1e-3 * np.abs(w1[1]).max() * rng.standard_normal(w1[1].shape).astype(np.float32)
    b1[5] = 2.0 * b1[1]
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, w1, b1, name="conv1")])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    check_exact(g.model(), {})


# --------------------------------------------------------------------------------------------- #
# dead and constant channels


def test_dead_channels_removed_through_relu():
    model, (w1, b1, w2, b2) = conv_chain([(3, 0, 0.0), (6, 0, 0.0)])
    result, report = check_exact(model, {"conv1": 2})
    counts = merge_counts(report)
    assert counts["dead_removed"] == 2 and counts["channels_merged"] == 0
    np.testing.assert_array_equal(view_weight(result, "conv2"), np.delete(w2, [3, 6], axis=1))


def test_dead_channels_not_removed_through_sigmoid():
    """Sigmoid(0) = 0.5: a dead channel is constant, not zero; the two dead ones may merge together."""
    model, _ = conv_chain([(3, 0, 0.0), (6, 0, 0.0)], act="Sigmoid")
    result, report = merge0(model)
    assert merge_counts(report).get("dead_removed", 0) == 0
    assert removed(model, result) in ({}, {"conv1": 1})
    assert_same(model, result)


def test_constant_channel_kept_before_padded_consumer():
    """Zero weights but a positive bias: Relu(b) is constant only inside the padding of the consumer."""
    rng = np.random.default_rng(5)
    w1, b1 = rand_layer(rng, 8, 3, 3)
    w1[4] = 0
    b1[4] = 0.7
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, w1, b1, name="conv1")])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2", pad=1))
    check_exact(g.model(), {})


def test_constant_channels_with_positive_biases_merge():
    """Two zero-weight channels with biases 0.5 and 1.5 are positive multiples through Relu."""
    rng = np.random.default_rng(6)
    w1, b1 = rand_layer(rng, 8, 3, 3)
    w1[2] = w1[5] = 0
    b1[2], b1[5] = 0.5, 1.5
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, w1, b1, name="conv1")])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2", pad=1))
    check_exact(g.model(), {"conv1": 1})


# --------------------------------------------------------------------------------------------- #
# Gemm / MatMul producers and consumers


@pytest.mark.parametrize("trans_b1", [0, 1])
@pytest.mark.parametrize("trans_b2", [0, 1])
def test_gemm_producers(trans_b1, trans_b2):
    rng = np.random.default_rng(7)
    plan = [(1, 0, 1.0), (4, 2, 3.0), (9, 2, 0.25)]
    w1, b1 = plant(*rand_layer(rng, 10, 6), plan)
    w2, b2 = rand_layer(rng, 3, 10)
    g = Builder()
    x = g.input("x", ["N", 6])
    h = g.node("LeakyRelu", [g.gemm_w(x, w1, b1, name="fc1", trans_b=trans_b1)], alpha=0.2)
    g.output(g.gemm_w(h, w2, b2, name="fc2", trans_b=trans_b2))
    model = g.model()
    result, _ = check_exact(model, {"fc1": 3})
    assert attr(node(result, "fc1"), "transB", 0) == trans_b1
    np.testing.assert_allclose(view_weight(result, "fc2"), merged_columns(w2, plan), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_add_producers(bias):
    rng = np.random.default_rng(8)
    plan = [(3, 0, 2.0), (5, 1, 1.0), (6, 0, 0.0)]
    w1, b1 = plant(*rand_layer(rng, 7, 5), plan)
    w2, b2 = rand_layer(rng, 4, 7)
    g = Builder()
    x = g.input("x", ["N", 5])
    h = g.node("Relu", [g.matmul_w(x, w1, b1 if bias else None, name="mm1")])
    g.output(g.matmul_w(h, w2, b2, name="mm2"))
    model = g.model()
    result, report = check_exact(model, {"mm1": 3})
    if bias:
        assert inits(result)[node(result, "mm1_bias").input[1]].shape == (4,)
    oracle = merged_columns(w2, [(3, 0, 2.0), (5, 1, 1.0)])
    oracle = np.delete(oracle, 4, axis=1)  # the dead channel 6 sits at column 4 once 3 and 5 are gone
    np.testing.assert_allclose(view_weight(result, "mm2"), oracle, rtol=1e-6, atol=1e-7)


def test_gemm_broadcast_bias_producer():
    """A Gemm whose bias C has shape (1,) (broadcast to every output) is a legal layer with a bias."""
    rng = np.random.default_rng(9)
    w1, _ = plant(*rand_layer(rng, 8, 6), [(3, 1, 1.0)])
    g = Builder()
    x = g.input("x", ["N", 6])
    h = g.node("Relu", [g.gemm_w(x, w1, np.array([0.3], np.float32), name="fc1")])
    g.output(g.gemm_w(h, *rand_layer(rng, 4, 8), name="fc2"))
    check_exact(g.model(), {"fc1": 1})


# --------------------------------------------------------------------------------------------- #
# a ConvTranspose reading the space (a U-Net's or a decoder's upsampling)


def up_chain(plan, k=2, stride=2, group=1, seed=19, w1=None):
    """x(N,3,6,6) → conv1 (8 ch, planted) → Relu → ConvTranspose (k, stride; 4·group ch) → y."""
    rng = np.random.default_rng(seed)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), plan) if w1 is None else w1
    g = Builder(seed)
    h = g.node("Relu", [g.conv_w(g.input("x", ["N", 3, 6, 6]), w1, b1, name="conv1")])
    w2 = rng.standard_normal((8, 4, k, k)).astype(np.float32)  # stored (in, out/group, k, k)
    b2 = rng.standard_normal(4 * group).astype(np.float32)
    g.output(g.node("ConvTranspose", [h, g.init(w2), g.init(b2)], name="up", kernel_shape=[k, k],
                    strides=[stride, stride], group=group, **({"pads": [1, 1, 1, 1]} if k == 3 else {})))
    return g.model(), w2


@pytest.mark.parametrize("k, stride", [(2, 2), (3, 2), (3, 1)])
def test_multiples_merge_into_a_conv_transpose(k, stride):
    """The ConvTranspose's input channels are its stored weight's rows (axis 0): channel 5 = 2.5·channel 1
    moves into row 1 (numpy oracle), exactly; the MACs saved are what the budget was told."""
    model, w2 = up_chain(MULTIPLES, k, stride)
    result, report = check_exact(model, {"conv1": 2})
    oracle = merged_columns(w2.swapaxes(0, 1), MULTIPLES).swapaxes(0, 1)
    np.testing.assert_allclose(inits(result)[node(result, "up").input[1]], oracle, rtol=1e-6, atol=1e-6)
    shapes = tensor_shapes(model, input_specs(model))
    space = next(s for s in channel_spaces(gs.import_onnx(model), shapes) if s.name == "conv1")
    assert report.macs_before - report.macs_after == 2 * _channel_saving(space, shapes)[0]


@pytest.mark.parametrize("plan, expected", [(MULTIPLES, {}), ([(1, 0, 2.5), (6, 7, 0.4)], {"conv1": 2})])
def test_grouped_conv_transpose_consumer(plan, expected):
    """Grouped in 2: channels 0-3 feed its first 4 outputs, 4-7 the others; pairs inside a block,
    one in each, merge; pairs across blocks do not."""
    model, _ = up_chain(plan, group=2)
    check_exact(model, expected)


# --------------------------------------------------------------------------------------------- #
# channels last: MatMuls on (N, T, C), as a transformer's feed-forward block


def gelu(g: Builder, x: str) -> str:
    """GELU as exporters write it: x · 0.5 · (1 + erf(x / √2))."""
    e = g.node("Erf", [g.node("Div", [x, g.init(np.array(np.sqrt(2.0), np.float32))])])
    return g.node("Mul", [g.node("Mul", [x, g.node("Add", [e, g.init(np.array(1.0, np.float32))])]),
                          g.init(np.array(0.5, np.float32))])


def feed_forward(plan, act="Relu", scale=None, seed=13, t=5, d=6, h=8):
    """x(N,T,D) → mm1 (+bias, h channels on the last axis, planted) → act → [× per-channel scale] → mm2 → y."""
    rng = np.random.default_rng(seed)
    w1, b1 = plant(*rand_layer(rng, h, d), plan)
    w2, b2 = rand_layer(rng, 4, h)
    g = Builder()
    y = g.matmul_w(g.input("x", ["N", t, d]), w1, b1, name="mm1")
    y = gelu(g, y) if act == "Gelu" else g.node(act, [y])
    if scale is not None:
        y = g.node("Mul", [y, g.init(scale.astype(np.float32))])
    g.output(g.matmul_w(y, w2, b2, name="mm2"))
    return g.model(), w2


def test_channels_last_feed_forward_block():
    """Multiples and a dead neuron of a (N, T, C) MatMul merge into the next MatMul's rows (numpy oracle)."""
    plan = [(3, 0, 2.0), (5, 1, 1.0), (6, 0, 0.0)]
    model, w2 = feed_forward(plan)
    result, _ = check_exact(model, {"mm1": 3})
    oracle = np.delete(merged_columns(w2, plan[:2]), 4, axis=1)  # the dead channel 6 is column 4 once 3, 5 are gone
    np.testing.assert_allclose(view_weight(result, "mm2"), oracle, rtol=1e-6, atol=1e-7)


def test_a_token_channel_saves_its_macs_at_every_token():
    """The saving the budget ranks by: one channel of mm1 on 5 tokens saves 5·(6 + 4) MACs, as the
    model's MACs drop (it counted one token)."""
    model, _ = feed_forward([(3, 0, 2.0), (5, 1, 1.0)])
    result, report = check_exact(model, {"mm1": 2})
    shapes = tensor_shapes(model, input_specs(model))
    space = next(s for s in channel_spaces(gs.import_onnx(model), shapes) if s.name == "mm1")
    assert _channel_saving(space, shapes)[0] == 5 * (6 + 4)
    assert report.macs_before - report.macs_after == 2 * _channel_saving(space, shapes)[0]


def test_channels_last_gelu_and_a_per_channel_scale():
    """Through an exported GELU (not homogeneous) duplicates merge, multiples do not; a per-channel
    scale on the last axis (a layer scale) must be equal for the pair."""
    scale = np.linspace(0.5, 1.5, 8)
    scale[5] = scale[1]  # channel 5 duplicates channel 1 and is scaled alike; 6 duplicates 2, scaled unlike it
    model, _ = feed_forward([(5, 1, 1.0), (6, 2, 1.0), (7, 0, 3.0)], act="Gelu", scale=scale)
    check_exact(model, {"mm1": 1})


@pytest.mark.parametrize("op, attrs", [("MaxPool", {"kernel_shape": [2], "strides": [2]}),
                                       ("LayerNormalization", {"axis": -1}),
                                       ("BatchNormalization", {})])
def test_channels_last_space_frozen_where_axis_1_is_treated_apart(op, attrs):
    """A pooling, BatchNormalization (statistics per axis-1 entry, here the sequence) or a
    LayerNormalization over the channels does not act channel by channel on (N, T, C)."""
    rng = np.random.default_rng(14)
    w1, b1 = plant(*rand_layer(rng, 8, 6), DUPLICATES)
    g = Builder()
    y = g.node("Relu", [g.matmul_w(g.input("x", ["N", 4, 6]), w1, b1, name="mm1")])
    if op == "LayerNormalization":
        y = g.node(op, [y, g.init(np.ones(8, np.float32)), g.init(np.zeros(8, np.float32))], **attrs)
    elif op == "BatchNormalization":
        y = g.bn(y, 4)
    else:
        y = g.node(op, [y], **attrs)
    width = 4 if op == "MaxPool" else 8
    g.output(g.matmul_w(y, *rand_layer(rng, 3, width), name="mm2"))
    result, report = check_exact(g.model(), {})
    assert any(op in r for r in merge_reasons(report)), merge_reasons(report)


@pytest.mark.parametrize("op, keepdims, consumer", [("ReduceMean", 0, "gemm"), ("ReduceMean", 0, "matmul"),
                                                     ("ReduceMax", 1, "matmul"), ("ReduceSum", 0, "gemm")])
def test_channels_last_through_pooling_over_the_tokens(op, keepdims, consumer):
    """Mean pooling over the tokens, (N, T, C) → (N, C) or (N, 1, C) (a ViT's or a Mixer's head):
    the channels stay on the last axis, and the planted multiples merge into the head (numpy oracle)."""
    rng = np.random.default_rng(17)
    w1, b1 = plant(*rand_layer(rng, 8, 6), MULTIPLES)
    g = Builder()
    y = g.node("Relu", [g.matmul_w(g.input("x", ["N", 5, 6]), w1, b1, name="mm1")])
    axes = g.const([1], dtype=np.int64)
    y = g.node(op, [y, axes], keepdims=keepdims) if op == "ReduceSum" else g.node(op, [y], axes=[1], keepdims=keepdims)
    w2, b2 = rand_layer(rng, 4, 8)
    g.output(g.gemm_w(y, w2, b2, name="head") if consumer == "gemm" else g.matmul_w(y, w2, b2, name="head"))
    result, _ = check_exact(g.model(), {"mm1": 2})
    np.testing.assert_allclose(view_weight(result, "head"), merged_columns(w2, MULTIPLES), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axes", [[-1], [1, 2], []])
def test_channels_last_space_frozen_by_a_reduce_over_the_channels(axes):
    """A reduce over the channels (also among the token axes, or over every axis: no axes) leaves
    no channel space; nothing merges, with the reason."""
    rng = np.random.default_rng(18)
    w1, b1 = plant(*rand_layer(rng, 8, 6), MULTIPLES)
    g = Builder()
    y = g.node("Relu", [g.matmul_w(g.input("x", ["N", 5, 6]), w1, b1, name="mm1")])
    y = g.node("ReduceSum", [y, g.const(axes, dtype=np.int64)], keepdims=1)
    g.output(g.node("Mul", [y, g.node("Relu", [g.matmul_w(g.input("z", ["N", 5, 6]), *rand_layer(rng, 8, 6))])]))
    result, report = check_exact(g.model(), {})
    assert any("ReduceSum" in r for r in merge_reasons(report)), merge_reasons(report)


def test_channels_last_through_a_transpose_to_a_conv():
    """(N, T, C) → Transpose → (N, C, T) → Conv1d: the conv reads the MatMul's channels on axis 1."""
    rng = np.random.default_rng(15)
    w1, b1 = plant(*rand_layer(rng, 8, 6), MULTIPLES)
    g = Builder()
    y = g.node("Relu", [g.matmul_w(g.input("x", ["N", 5, 6]), w1, b1, name="mm1")])
    y = g.node("Transpose", [y], perm=[0, 2, 1])
    w2, b2 = rand_layer(rng, 4, 8, 3)
    g.output(g.node("Conv", [y, g.init(w2[:, :, 1]), g.init(b2)], name="conv2", kernel_shape=[3], pads=[1, 1]))
    check_exact(g.model(), {"mm1": 2})


def test_a_transposed_sequence_axis_is_not_taken_for_the_channels():
    """(N, 6, 6) → Transpose → a MatMul over the last axis, which is the sequence now: the six
    channels must not couple to its six inputs (they did while axis 1 was taken for the channels)."""
    rng = np.random.default_rng(16)
    w1, b1 = plant(*rand_layer(rng, 6, 6), [(5, 1, 1.0)])
    g = Builder()
    y = g.node("Relu", [g.matmul_w(g.input("x", ["N", 6, 6]), w1, b1, name="mm1")])
    y = g.node("Transpose", [y], perm=[0, 2, 1])
    g.output(g.matmul_w(y, *rand_layer(rng, 3, 6), name="mm2"))
    result, report = check_exact(g.model(), {})
    assert any("Transpose" in r for r in merge_reasons(report)), merge_reasons(report)


# --------------------------------------------------------------------------------------------- #
# flattening into features: channel c <-> features [c·HW, (c+1)·HW)


def flatten_model(plan, kind: str, seed: int = 10):
    rng = np.random.default_rng(seed)
    c, hw = 6, 16
    w1, b1 = plant(*rand_layer(rng, c, 3, 3), plan)
    w2, b2 = rand_layer(rng, 5, c * hw)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("MaxPool", [g.node("Relu", [g.conv_w(x, w1, b1, name="conv1")])], kernel_shape=[2, 2],
               strides=[2, 2])
    if kind == "flatten":
        h = g.node("Flatten", [h], axis=1)
    else:
        h = g.node("Reshape", [h, g.const([-1 if kind == "reshape-1" else 0, c * hw], "flat_shape",
                                          dtype=np.int64)])
    g.output(g.gemm_w(h, w2, b2, name="fc"))
    return g.model(), w2


@pytest.mark.parametrize("kind", ["flatten", "reshape-1", "reshape0"])
def test_flatten_block_mapping(kind):
    plan = [(4, 1, 2.0), (5, 0, 1.0)]
    model, w2 = flatten_model(plan, kind)
    result, _ = check_exact(model, {"conv1": 2})
    got = view_weight(result, "fc")
    assert got.shape == (5, 4 * 16)
    np.testing.assert_allclose(got, merged_columns(w2, plan, axis_block=16), rtol=1e-6, atol=1e-7)
    if kind != "flatten":
        shape = inits(result)["flat_shape"]
        np.testing.assert_array_equal(shape, [-1 if kind == "reshape-1" else 0, 4 * 16])


# --------------------------------------------------------------------------------------------- #
# per-channel parameters on the path


def depthwise_model(plan, dw_bias: bool, differ: int | None = None, seed: int = 11):
    rng = np.random.default_rng(seed)
    c = 8
    w1, b1 = plant(*rand_layer(rng, c, 3, 3), plan)
    kd = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    for j, i, _ in plan:
        kd[j] = kd[i]
    if differ is not None:
        kd[differ, 0, 1, 1] += 0.5
    bd = rng.standard_normal(c).astype(np.float32) if dw_bias else None
    if bd is not None:
        for j, i, _ in plan:
            bd[j] = bd[i]
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, w1, b1, name="conv1")])
    h = g.node("Relu", [g.conv_w(h, kd, bd, name="dw", group=c)])
    w2, b2 = rand_layer(rng, 4, c, 1)
    g.output(g.conv_w(h, w2, b2, name="conv2"))
    return g.model()


def test_depthwise_on_path_equal_kernels_merge():
    plan = [(5, 1, 2.0), (6, 2, 1.0)]
    model = depthwise_model(plan, dw_bias=False)
    result, _ = check_exact(model, {"conv1": 2, "dw": 2})
    assert attr(node(result, "dw"), "group") == 6
    assert view_weight(result, "dw").shape == (6, 1, 3, 3)


def test_depthwise_on_path_different_kernels_block_merge():
    model = depthwise_model([(5, 1, 1.0)], dw_bias=False, differ=5)
    result, _ = check_exact(model, {})
    assert attr(node(result, "dw"), "group") == 8


def test_depthwise_with_bias_only_duplicates_merge():
    """A depthwise bias makes the path affine: multiples no longer carry, duplicates still do."""
    check_exact(depthwise_model([(5, 1, 2.0)], dw_bias=True), {})
    result, _ = check_exact(depthwise_model([(5, 1, 1.0)], dw_bias=True), {"conv1": 1, "dw": 1})
    assert attr(node(result, "dw"), "group") == 7


def prelu_model(plan, slopes):
    rng = np.random.default_rng(12)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), plan)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("PRelu", [g.conv_w(x, w1, b1, name="conv1"), g.const(np.asarray(slopes).reshape(8, 1, 1), "slope")])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    return g.model()


def test_prelu_equal_slopes_merge_multiples():
    slopes = [0.1, 0.2, 0.3, 0.4, 0.5, 0.2, 0.3, 0.8]  # channel 5 like 1, 6 like 2
    result, _ = check_exact(prelu_model(MULTIPLES, slopes), {"conv1": 2})
    np.testing.assert_allclose(inits(result)["slope"].reshape(-1), [0.1, 0.2, 0.3, 0.4, 0.5, 0.8], rtol=1e-7)


def test_prelu_different_slopes_block_merge():
    slopes = [0.1, 0.2, 0.3, 0.4, 0.5, 0.25, 0.35, 0.8]
    check_exact(prelu_model(DUPLICATES, slopes), {})


def bn_model(plan, same_stats: bool):
    """conv1 → Relu → BatchNormalization (not foldable: after the Relu) → conv2."""
    rng = np.random.default_rng(13)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), plan)
    stats = [rng.uniform(0.5, 2, 8), rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.5, 2, 8)]
    if same_stats:
        for s in stats:
            for j, i, _ in plan:
                s[j] = s[i]
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, w1, b1, name="conv1")])
    names = [g.const(s, f"bn_{k}") for k, s in enumerate(stats)]
    h = g.node("BatchNormalization", [h] + names, name="bn", epsilon=1e-5)
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    return g.model()


def test_unfused_bn_equal_stats_duplicates_merge():
    result, _ = check_exact(bn_model(DUPLICATES, same_stats=True), {"conv1": 2})
    assert all(inits(result)[f"bn_{k}"].shape == (6,) for k in range(4))
    assert len([n for n in result.graph.node if n.op_type == "BatchNormalization"]) == 1


def test_unfused_bn_multiples_not_merged():
    check_exact(bn_model(MULTIPLES, same_stats=True), {})


def test_unfused_bn_different_stats_block_merge():
    check_exact(bn_model(DUPLICATES, same_stats=False), {})


def test_folded_bn_after_conv_merges_multiples():
    """BN right after the conv folds into it; duplicates planted after the fold (equal BN stats) merge."""
    rng = np.random.default_rng(14)
    plan = [(5, 1, 1.0)]
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), plan)
    stats = [rng.uniform(0.5, 2, 8), rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.5, 2, 8)]
    for s in stats:
        s[5] = s[1]
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("BatchNormalization", [g.conv_w(x, w1, b1, name="conv1")] + [g.const(s) for s in stats])
    h = g.node("Relu", [h])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    check_exact(g.model(), {"conv1": 1})


# --------------------------------------------------------------------------------------------- #
# random chains (hypothesis): exactly the planted channels go, nothing else


def random_plan(rng: np.random.Generator, c: int, count: int, dead_ok: bool = True):
    perm = rng.permutation(c)
    planted, roots = perm[:count], perm[count:]
    plan = []
    for j in planted:
        kind = rng.integers(3 if dead_ok else 2)
        s = 1.0 if kind == 0 else (float(rng.uniform(0.25, 4.0)) if kind == 1 else 0.0)
        plan.append((int(j), int(rng.choice(roots)), s))
    return plan


def build_chain(data_seed: int, kind: str, widths: list[int], acts: list[str], residual: list[int],
                head: str, plant_counts: list[int]):
    """A chain of channel groups. Group k: producer P_k (w_{k-1} → w_k) → act_k, then ``residual[k]``
    residual producers R (w_k → w_k): h = act(Add(R(h), h)). All producers of a group share its plan.
    The last layer writes the graph output (its channels must stay)."""
    rng = np.random.default_rng(data_seed)
    g = Builder(data_seed)
    conv = kind == "conv"
    cin = 3
    h = g.input("x", ["N", cin, 8, 8] if conv else ["N", cin])
    expected = {}
    pools = 0
    prev = cin
    for k, (c, act) in enumerate(zip(widths, acts)):
        plan = random_plan(rng, c, plant_counts[k])
        if act == "MaxPool" and (not conv or pools >= 2):
            act = "Relu"
        pools += act == "MaxPool"
        names = [f"p{k}"] + [f"p{k}_r{r}" for r in range(residual[k])]
        w, b = plant(*rand_layer(rng, c, prev, 3 if conv else None), plan)
        h = g.conv_w(h, w, b, name=names[0]) if conv else g.gemm_w(h, w, b, name=names[0])
        h = g.act(h, act)
        for name in names[1:]:
            w, b = plant(*rand_layer(rng, c, c, 3 if conv else None), plan)
            q = g.conv_w(h, w, b, name=name) if conv else g.gemm_w(h, w, b, name=name)
            h = g.act(g.node("Add", [q, h]), act if act != "MaxPool" else "Relu")
        for name in names:
            if plan:
                expected[name] = len(plan)
        prev = c
    # head: the graph output, with planted duplicates that must stay
    out_plan = [(1, 0, 1.0)]
    if conv and head == "gap":
        h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
        w, b = plant(*rand_layer(rng, 3, prev), out_plan)
        g.output(g.gemm_w(h, w, b, name="head"))
    elif conv and head == "flatten":
        spatial = (8 >> pools) ** 2
        h = g.node("Flatten", [h], axis=1)
        w, b = plant(*rand_layer(rng, 3, prev * spatial), out_plan)
        g.output(g.gemm_w(h, w, b, name="head"))
    elif conv:
        w, b = plant(*rand_layer(rng, 3, prev, 3), out_plan)
        g.output(g.conv_w(h, w, b, name="head"))
    else:
        w, b = plant(*rand_layer(rng, 3, prev), out_plan)
        g.output(g.gemm_w(h, w, b, name="head"))
    return g.model(), expected


@st.composite
def chains(draw):
    kind = draw(st.sampled_from(["conv", "gemm"]))
    n = draw(st.integers(1, 3))
    widths = [draw(st.integers(2, 7)) for _ in range(n)]
    acts = [draw(st.sampled_from(["Relu", "LeakyRelu", "MaxPool"])) for _ in range(n)]
    residual = [draw(st.integers(0, 2)) for _ in range(n)]
    counts = [draw(st.integers(0, c - 1)) for c in widths]
    head = draw(st.sampled_from(["conv", "gap", "flatten"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return seed, kind, widths, acts, residual, head, counts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_random_chains_remove_exactly_the_planted(case):
    seed, kind, widths, acts, residual, head, counts = case
    model, expected = build_chain(seed, kind, widths, acts, residual, head, counts)
    result, report = merge0(model)
    assert removed(model, result) == expected
    assert_same(model, result, batch=3, samples=2)
    counts_ = merge_counts(report)
    planted = sum(counts)
    assert counts_.get("channels_merged", 0) + counts_.get("dead_removed", 0) == planted


# --------------------------------------------------------------------------------------------- #
# the shipped models


DIGITS = ["digits_resnet", "digits_cnn"]


def _model(name):
    from pathlib import Path
    return onnx.load(str(Path(__file__).resolve().parents[1] / "models" / f"{name}.onnx"))


@pytest.mark.parametrize("name", DIGITS)
def test_digits_exact_merge_changes_nothing(name):
    model = _model(name)
    result, report = merge0(model)
    # canonicalization alone (BN folded into the convs of the CNN) gives the same counts
    folded, fold_report = red_onnx.compress(model, tolerance=0, passes=[])
    assert report.params_after == fold_report.params_after
    assert report.macs_after == fold_report.macs_after == report.macs_before
    assert [list(t.dims) for t in result.graph.initializer] == [list(t.dims) for t in folded.graph.initializer]
    counts = merge_counts(report)
    assert counts.get("channels_merged", 0) == 0 and counts.get("dead_removed", 0) == 0
    assert_same(model, result, batch=3)


@pytest.mark.parametrize("name", DIGITS)
def test_digits_tolerance_within_budget_on_fresh_probes(name):
    """At tolerance 0.1 (probes uniform in [0, 1], the models' input range), the result is smaller,
    verified, and stays within the tolerance on fresh probes drawn the same way (other seed). (The
    digits CNN's merges deviate over 0.1 on some of the 64 verification probes: it saves bytes only.)"""
    model = _model(name)
    result, report = red_onnx.compress(model, tolerance=0.1, probe_ranges={"input": (0, 1)})
    onnx.checker.check_model(result, full_check=True)
    assert report.verified
    assert report.output_deviation <= 0.1
    assert report.bytes_after < report.bytes_before and report.macs_after <= report.macs_before
    assert report.macs_after < report.macs_before or name == "digits_cnn"
    a, b = session(model), session(result)
    x = np.random.default_rng(2024).uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)
    ya, yb = a.run(None, {"input": x})[0], b.run(None, {"input": x})[0]
    per_sample = [rel_l2(ya[k], yb[k]) for k in range(len(x))]
    # the promise is statistical (the share of inputs over the tolerance is below 3/64 with 95%
    # confidence): at most 2 of 32 over, and none far over
    over = sum(d > 0.1 for d in per_sample)
    assert over <= 2 and max(per_sample) <= 0.2, f"fresh-probe deviations: max {max(per_sample):.3g}, {over}/32 over 0.1"
    # the batched model computes the same as per sample (dynamic batch survives)
    yb1 = np.concatenate([b.run(None, {"input": x[k:k + 1]})[0] for k in range(3)])
    np.testing.assert_allclose(yb[:3], yb1, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- #
# random Concat / Split graphs (hypothesis): merges at offsets and inside segments only


def _expected_removed(plan, c: int, segments: np.ndarray) -> int:
    """Channels an exact merge removes: per segment, all dead ones (but one if all are) and all but
    one per direction."""
    cls = np.arange(c)
    dead = np.zeros(c, bool)
    for j, root, s in plan:
        if s == 0.0:
            dead[j] = True
        else:
            cls[j] = root
    removed = 0
    for seg in np.unique(segments):
        members = segments == seg
        live = np.flatnonzero(members & ~dead)
        if len(live) == 0:  # a segment of dead channels keeps one (no zero-width tensors)
            removed += int(members.sum()) - 1
        else:
            removed += int((members & dead).sum()) + len(live) - len(np.unique(cls[live]))
    return removed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.sampled_from(["concat", "split", "slice"]), st.sampled_from(["Relu", "LeakyRelu", "MaxPool"]),
       st.integers(3, 7), st.integers(3, 7), st.booleans())
def test_random_concat_split_graphs(seed, kind, act, ca, cb, with_input):
    rng = np.random.default_rng(seed)
    g = Builder(seed)
    x = g.input("x", ["N", 3, 8, 8])
    plans = [random_plan(rng, ca, int(rng.integers(0, ca))), random_plan(rng, cb, int(rng.integers(0, cb)))]
    expected = {}
    if kind == "concat":
        branches = []
        for name, c, plan in (("A", ca, plans[0]), ("B", cb, plans[1])):
            branches.append(g.act(g.conv_w(x, *plant(*rand_layer(rng, c, 3, 3), plan), name=name), act))
            if _expected_removed(plan, c, np.zeros(c)):
                expected[name] = _expected_removed(plan, c, np.zeros(c))
        inputs = branches + ([g.act(x, act)] if with_input else [])
        order = [int(i) for i in rng.permutation(len(inputs))]
        h = g.node("Concat", [inputs[i] for i in order], axis=1)
        g.output(g.conv_w(g.node("Relu", [h]), *rand_layer(rng, 4, ca + cb + 3 * with_input, 3), name="head"))
    elif kind == "slice":  # channels [ca, ca + cb) to one consumer, all of them to another
        c = ca + cb
        plan = random_plan(rng, c, int(rng.integers(0, c)))
        h = g.act(g.conv_w(x, *plant(*rand_layer(rng, c, 3, 3), plan), name="P"), act)
        bounds = [g.const(np.array([v]), dtype=np.int64) for v in (ca, c + 5 if with_input else c, 1)]
        g.output(g.conv_w(g.node("Slice", [h, *bounds]), *rand_layer(rng, 4, cb, 3), name="headA"))
        g.output(g.conv_w(h, *rand_layer(rng, 4, c, 1), name="headB"))
        n = _expected_removed(plan, c, np.repeat([0, 1], [ca, cb]))
        expected = {"P": n} if n else {}
    else:
        c = ca + cb
        plan = random_plan(rng, c, int(rng.integers(0, c)))
        h = g.act(g.conv_w(x, *plant(*rand_layer(rng, c, 3, 3), plan), name="P"), act)
        parts = g.node("Split", [h, g.const(np.array([ca, cb]), dtype=np.int64)], n_outputs=2, axis=1)
        g.output(g.conv_w(parts[0], *rand_layer(rng, 4, ca, 3), name="headA"))
        g.output(g.conv_w(g.node("Relu", [parts[1]]), *rand_layer(rng, 4, cb, 1), name="headB"))
        n = _expected_removed(plan, c, np.repeat([0, 1], [ca, cb]))
        expected = {"P": n} if n else {}
    check_exact(g.model(), expected)


def test_split_segment_of_dead_channels_keeps_one():
    rng = np.random.default_rng(31)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    w, b = rand_layer(rng, 6, 3, 3)
    w[:2], b[:2] = 0.0, 0.0  # segment 0 carries only zeros through the ReLU
    parts = g.node("Split", [g.node("Relu", [g.conv_w(x, w, b, name="P")]), g.const(np.array([2, 4]), dtype=np.int64)],
                   n_outputs=2, axis=1)
    g.output(g.conv_w(parts[0], *rand_layer(rng, 4, 2, 3), name="headA"))
    g.output(g.conv_w(parts[1], *rand_layer(rng, 4, 4, 3), name="headB"))
    check_exact(g.model(), {"P": 1})


@pytest.mark.parametrize("seed", range(3))
def test_close_pairs_by_projection_agree_with_all_pairs(seed):
    """Many long rows take the projection filter: it finds exactly the pairs the full comparison
    finds (planted duplicates, near duplicates inside and just outside the tolerance)."""
    from red_onnx.passes.merge import _close_pairs

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, 1000))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for a, b, eps in [(3, 7, 0.0), (10, 250, 3e-6), (11, 12, 3e-5), (40, 41, 9e-6), (40, 299, 0.0)]:
        d = rng.standard_normal(1000)
        x[b] = x[a] + eps * d / np.linalg.norm(d)
    assert 300 * 300 * 1000 > 2**26  # the projection path
    dist = np.linalg.norm(x[:, None] - x[None], axis=2)
    expected = [(a, b) for a in range(300) for b in range(a + 1, 300) if dist[a, b] <= 1e-5]
    assert _close_pairs(x, 1e-5) == expected
    assert (11, 12) not in expected and {(3, 7), (10, 250), (40, 41), (40, 299), (41, 299)} <= set(expected)


# --------------------------------------------------------------------------------------------- #
# squeezed, gathered and reshaped into blocks of features on the way to the consumers


@pytest.mark.parametrize("axes", ["attribute", "input"])
def test_global_pooling_squeezed_to_features(axes):
    """GlobalAveragePool → Squeeze(2, 3) → Gemm (``F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1)``):
    the channels merge into the Gemm's columns (a Squeeze froze the space)."""
    rng = np.random.default_rng(51)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), MULTIPLES)
    g = Builder(opset=11 if axes == "attribute" else 13)
    h = g.node("GlobalAveragePool", [g.relu(g.conv_w(g.input("x", ["N", 3, 6, 6]), w1, b1, name="conv1"))])
    h = g.node("Squeeze", [h], axes=[2, 3]) if axes == "attribute" else \
        g.node("Squeeze", [h, g.const([-1, -2], dtype=np.int64)])
    g.output(g.gemm_w(h, *rand_layer(rng, 4, 8), name="fc"))
    check_exact(g.model(), {"conv1": 2})


def planted_conv1d(g: Builder, rng: np.random.Generator) -> str:
    """x (N, 3, 7) → Conv1d with MULTIPLES planted (8 channels) → ReLU."""
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), MULTIPLES)
    return g.relu(g.node("Conv", [g.input("x", ["N", 3, 7]), g.init(w1[..., 1]), g.init(b1)], name="conv1",
                         kernel_shape=[3], pads=[1, 1]))


def test_the_last_step_of_a_sequence_into_a_gemm():
    """Conv1d (N, C, T) → x[:, :, -1] (a Gather) → Gemm: the channels merge into the Gemm."""
    rng = np.random.default_rng(52)
    g = Builder()
    h = g.node("Gather", [planted_conv1d(g, rng), g.const(np.array(-1), dtype=np.int64)], axis=2)
    g.output(g.gemm_w(h, *rand_layer(rng, 4, 8), name="fc"))
    check_exact(g.model(), {"conv1": 2})


def test_a_gather_of_the_channels_freezes():
    """A Gather on the channel axis (a permutation of them, here) freezes the space."""
    rng = np.random.default_rng(53)
    g = Builder()
    h = g.node("Gather", [planted_conv1d(g, rng), g.const(np.arange(8), dtype=np.int64)], axis=1)
    g.output(g.node("Gather", [h, g.const(np.array(-1), dtype=np.int64)], axis=2))
    result, report = check_exact(g.model(), {})
    assert any("Gather" in r for r in merge_reasons(report)), merge_reasons(report)


def crnn(target: str, height: int = 2, width: int = 5, seed: int = 54) -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv (N, 8, H, W) → Transpose (W, N, 8, H) → Reshape (W, N, 8·H) → LSTM: a CRNN's features per
    step, channel c the block [c·H, (c+1)·H) of the LSTM's inputs. ``target``: the Reshape's shape,
    "constant" ([W, -1, 8·H]), or "computed" from Shape as torch exports ``x.reshape(w, n, c * h)``.
    Returns the model and the LSTM's W."""
    rng = np.random.default_rng(seed)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), MULTIPLES)
    g = Builder(seed)
    h = g.relu(g.conv_w(g.input("x", ["N", 3, height, width]), w1, b1, name="conv1"))
    t = g.node("Transpose", [h], perm=[3, 0, 1, 2])
    if target == "constant":
        shape = g.const([width, -1, 8 * height], dtype=np.int64)
    else:
        dims = [g.node("Gather", [g.node("Shape", [h]), g.const(np.array(k), dtype=np.int64)], axis=0)
                for k in range(4)]
        pieces = [g.node("Unsqueeze", [d, g.const([0], dtype=np.int64)]) for d in (dims[3], dims[0])]
        pieces.append(g.node("Unsqueeze", [g.node("Mul", [dims[1], dims[2]]), g.const([0], dtype=np.int64)]))
        shape = g.node("Concat", pieces, axis=0)
    x = g.node("Reshape", [t, shape])
    w = (rng.standard_normal((1, 12, 8 * height)) / 4).astype(np.float32)
    r = (rng.standard_normal((1, 12, 3)) / 2).astype(np.float32)
    g.output(g.node("LSTM", [x, g.init(w, "W"), g.init(r, "R")], name="lstm", hidden_size=3, n_outputs=1))
    return g.model(), w


@pytest.mark.parametrize("target", ["constant", "computed"])
def test_crnn_features_merge_in_blocks_into_an_lstm(target):
    """The merged channels' blocks of H features move onto their partners' (numpy oracle), the
    Reshape target follows (constant) or adapts (computed from Shape), and the outputs agree."""
    model, w = crnn(target)
    result, _ = check_exact(model, {"conv1": 2})
    lstm = next(n for n in result.graph.node if n.name == "lstm")
    blocks = w.reshape(1, 12, 8, 2)
    expected = blocks.copy()
    for j, i, s in MULTIPLES:
        expected[:, :, i] += np.float32(s) * blocks[:, :, j]
    expected = np.delete(expected, [j for j, _, _ in MULTIPLES], axis=2).reshape(1, 12, 12)
    np.testing.assert_allclose(inits(result)[lstm.input[1]], expected, rtol=1e-5, atol=1e-6)


def test_a_reshape_that_splits_the_channels_freezes():
    """(W, N, 8, H) → (W, N, 4, 2·H): channels split across axes, not merged with the ones after."""
    rng = np.random.default_rng(55)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), MULTIPLES)
    g = Builder(55)
    h = g.relu(g.conv_w(g.input("x", ["N", 3, 2, 5]), w1, b1, name="conv1"))
    x = g.node("Reshape", [g.node("Transpose", [h], perm=[3, 0, 1, 2]), g.const([5, -1, 4, 4], dtype=np.int64)])
    g.output(g.node("Reshape", [x, g.const([5, -1, 16], dtype=np.int64)]))
    result, report = check_exact(g.model(), {})
    assert any("Reshape" in r for r in merge_reasons(report)), merge_reasons(report)


@pytest.mark.parametrize("squeeze", [True, False])
def test_a_sequence_and_its_reverse_into_two_grus(squeeze):
    """Conv (N, 8, 1, W) → Squeeze(2) (or a Reshape to (N, 8, W)) → Transpose → GRU, and its time-reversed
    Slice → a second GRU (a bidirectional recurrent layer written as two): both read the channels."""
    rng = np.random.default_rng(56)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), MULTIPLES)
    g = Builder(56)
    h = g.relu(g.conv_w(g.input("x", ["N", 3, 1, 6]), w1, b1, name="conv1"))
    h = g.node("Squeeze", [h, g.const([2], dtype=np.int64)]) if squeeze else \
        g.node("Reshape", [h, g.const([0, 8, 6], dtype=np.int64)])
    seq = g.node("Transpose", [h], perm=[2, 0, 1])
    rev = g.node("Slice", [seq, g.const([-1], dtype=np.int64), g.const([-(2**62)], dtype=np.int64),
                           g.const([0], dtype=np.int64), g.const([-1], dtype=np.int64)])
    outs = [g.node("GRU", [x, g.init(rng.standard_normal((1, 9, 8)) / 3), g.init(rng.standard_normal((1, 9, 3)) / 2)],
                   hidden_size=3, n_outputs=1) for x in (seq, rev)]
    g.output(g.node("Add", outs))
    check_exact(g.model(), {"conv1": 2})


@pytest.mark.parametrize("target", [[0, 8, 16], [0, 0, -1], [1, -1, 16], "computed"])
def test_spatial_axes_flattened_into_tokens(target):
    """(N, 8, 4, 4) → Reshape (N, 8, 16) → Transpose → MatMul on the tokens (``x.flatten(2).transpose(1, 2)``,
    a patch embedding), and a Conv1d on (N, 8, 16): the channels stay an axis of their own and merge
    into both readers; a constant 8 in the target follows the new count."""
    rng = np.random.default_rng(57)
    w1, b1 = plant(*rand_layer(rng, 8, 3, 3), MULTIPLES)
    g = Builder(57)
    h = g.relu(g.conv_w(g.input("x", ["N", 3, 4, 4]), w1, b1, name="conv1"))
    if target == "computed":
        dims = [g.node("Unsqueeze", [g.node("Gather", [g.node("Shape", [h]), g.const(np.array(k), dtype=np.int64)],
                                            axis=0), g.const([0], dtype=np.int64)]) for k in range(2)]
        shape = g.node("Concat", dims + [g.const([-1], dtype=np.int64)], axis=0)
    else:
        shape = g.const(target, dtype=np.int64)
    flat = g.node("Reshape", [h, shape])
    tokens = g.matmul_w(g.node("Transpose", [flat], perm=[0, 2, 1]), *rand_layer(rng, 5, 8), name="mm")
    conv = g.node("Conv", [flat, g.init(rand_layer(rng, 5, 8, 3)[0][..., 1])], name="conv1d", kernel_shape=[3],
                  pads=[1, 1])
    g.output(g.node("Add", [tokens, g.node("Transpose", [conv], perm=[0, 2, 1])]))
    check_exact(g.model(), {"conv1": 2}, batch=1 if target == [1, -1, 16] else 3)


# --------------------------------------------------------------------------------------------- #
# attention heads: the value projection's channels, per head, to the output projection


def attention(plan, heads: int = 2, e: int = 8, t: int = 5, target: str = "constant", weigh: str = "softmax",
              seed: int = 60) -> tuple[onnx.ModelProto, np.ndarray]:
    """x (N, T, E) → q, k, v projections (MatMul + Add), each Reshape (N, T, h, d) → Transpose; softmax(q·kᵀ/√d)
    · v → Transpose → Reshape (N, T, E) → output projection ``out``, as torch exports an attention written
    with separate projections (HF BERT's). ``plan`` is planted in v's rows. ``target`` of the Reshapes:
    "constant"; "shared" (one constant for the three into heads, as the dynamo exporter writes); "computed"
    (Concat of the input's N and T, read by Shape → Gather → Unsqueeze, and constants, as for a dynamic
    batch and sequence; back from the heads, of the context's N and T, by Shape → Slice, as HF writes it);
    "computed_shared" (one such Concat for the three); "computed_size" (back from the heads to x.size(),
    E read off the input's shape); "heads_inferred" (x.view(n, t, -1, d)). ``weigh``: the attention weights, "softmax" over the
    keys, "sigmoid", or "softmax_opset11" (no axis: axis 1 before opset 13, all of (h, T, T) normalized
    together). Returns the model and ``out``'s weight (E, E)."""
    rng = np.random.default_rng(seed)
    d = e // heads
    g = Builder(seed, opset=11) if weigh == "softmax_opset11" else Builder(seed)
    x = g.input("x", ["N", t, e])

    def size(k):  # x.size(k), as a 1-D piece of a target
        return g.node("Unsqueeze", [g.node("Gather", [g.node("Shape", [x]), g.const(np.array(k), dtype=np.int64)],
                                           axis=0), g.const([0], dtype=np.int64)])

    def shape(*tail, of=None):
        if target == "heads_inferred":  # x.view(n, t, -1, d)
            return g.const([0, t, -1, tail[1]] if len(tail) == 2 else [0, t, *tail], dtype=np.int64)
        if not target.startswith("computed"):
            return g.const([0, t, *tail], dtype=np.int64)
        if target == "computed_size" and of is not None:  # c.view(n, t, c_) with n, t, c_ = x.size()
            return g.node("Concat", [size(0), size(1), size(2)], axis=0)
        if of is not None:  # HF's c.view(c.size()[:-2] + (E,)): the context's own N and T
            first = [g.node("Slice", [g.node("Shape", [of]), g.const([0], dtype=np.int64), g.const([2], dtype=np.int64)])]
        else:
            first = [size(0), size(1)]
        return g.node("Concat", first + [g.const([v], dtype=np.int64) for v in tail], axis=0)

    split = shape(heads, d) if target in ("shared", "computed_shared") else None

    def into_heads(h, perm=(0, 2, 1, 3)):
        return g.node("Transpose", [g.node("Reshape", [h, split or shape(heads, d)])], perm=list(perm))

    q = into_heads(g.matmul_w(x, *rand_layer(rng, e, e), name="q"))
    k = into_heads(g.matmul_w(x, *rand_layer(rng, e, e), name="k"), perm=(0, 2, 3, 1))
    wv, bv = plant(*rand_layer(rng, e, e), plan)
    v = into_heads(g.matmul_w(x, wv, bv, name="v"))
    scores = g.node("Div", [g.node("MatMul", [q, k]), g.const(np.float32(np.sqrt(d)))])
    p = {"softmax": lambda: g.node("Softmax", [scores], axis=-1), "sigmoid": lambda: g.node("Sigmoid", [scores]),
         "softmax_opset11": lambda: g.node("Softmax", [scores])}[weigh]()
    c = g.node("Transpose", [g.node("MatMul", [p, v])], perm=[0, 2, 1, 3])
    c = g.node("Reshape", [c, shape(e, of=c)])
    w_out, b_out = rand_layer(rng, e, e)
    g.output(g.matmul_w(c, w_out, b_out, name="out"))
    return g.model(), w_out


@pytest.mark.parametrize("target", ["constant", "shared", "computed", "computed_shared", "computed_size",
                                    "heads_inferred"])
def test_attention_value_channels_merge_per_head(target):
    """Multiples planted inside each head merge into the output projection's columns (numpy oracle);
    each head keeps as many channels (d: 4 → 3), the Reshape targets follow (a target shared with
    the query's and key's Reshapes is copied, theirs unchanged), and the outputs agree."""
    plan = [(3, 1, 2.5), (6, 5, 0.4)]  # head 0: channel 3 = 2.5·channel 1; head 1: 6 = 0.4·5
    model, w_out = attention(plan, target=target)
    result, _ = check_exact(model, {"v": 2})
    out = next(n for n in result.graph.node if n.name == "out")
    expected = merged_columns(w_out, plan).T  # stored as MatMul's B: (E', E)
    np.testing.assert_allclose(inits(result)[out.input[1]], expected, rtol=1e-5, atol=1e-6)
    values = inits(result)
    literal = sorted(tuple(values[i].tolist()) for n in result.graph.node if n.op_type in ("Reshape", "Concat")
                     for i in n.input[1 if n.op_type == "Reshape" else 0:] if i in values)
    expected_literal = {"computed": [(2,), (2,), (2,), (3,), (4,), (4,), (6,)],  # h, d of q, k, v; E
                        "computed_shared": [(2,), (2,), (3,), (4,), (6,)],  # q's and k's, v's own Concat
                        "computed_size": [(2,), (2,), (2,), (3,), (4,), (4,), (6,)],  # E: x.size(2) → a literal
                        "heads_inferred": [(0, 5, -1, 3), (0, 5, -1, 4), (0, 5, -1, 4), (0, 5, 6)],
                        }.get(target, [(0, 5, 2, 3), (0, 5, 2, 4), (0, 5, 2, 4), (0, 5, 6)])
    assert literal == expected_literal


@pytest.mark.parametrize("plan", [[(5, 1, 2.5)], [(3, 1, 2.5)]])
def test_attention_value_channels_stay_inside_their_heads(plan):
    """A multiple in another head (channel 5 = 2.5·channel 1: heads 1 and 0) is not merged: each head
    weighs its values by its own attention; one head's redundancy alone would leave the heads
    unequal: nothing is removed."""
    model, _ = attention(plan)
    check_exact(model, {})


def test_attention_value_constant_channels_fold_per_head():
    """Dead value channels (zero rows: the bias through the softmax average, a constant) are folded
    into the output projection's bias, one per head, exactly."""
    model, _ = attention([])
    v = next(n for n in model.graph.node if n.name == "v")
    w = next(t for t in model.graph.initializer if t.name == v.input[1])
    values = onnx.numpy_helper.to_array(w).copy()
    values[:, [2, 7]] = 0.0  # MatMul B (E_in, E_out): output channels 2 (head 0) and 7 (head 1)
    w.CopyFrom(onnx.numpy_helper.from_array(values, w.name))
    result, report = red_onnx.compress(model, 0.0, passes=["merge", "prune"], latency_check=False)
    assert removed(model, result) == {"v": 2}
    assert_same(model, result, batch=3)


@pytest.mark.parametrize("weigh", ["sigmoid", "softmax_opset11"])
def test_attention_query_and_key_stay_frozen_and_other_weights_are_not_an_average(weigh):
    """The query's and key's channels meet in the scores (a contraction): frozen, with the reason;
    values weighed by a sigmoid, or a softmax over more than the keys, whose rows do not sum to 1,
    freeze too."""
    model, _ = attention([(3, 1, 2.5), (6, 5, 0.4)], weigh=weigh)
    result, report = check_exact(model, {})
    reasons = merge_reasons(report)
    assert sum("attention heads" in r for r in reasons) >= 3, reasons
