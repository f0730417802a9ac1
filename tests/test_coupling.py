"""Channel coupling (red_onnx.coupling): which layers and path ops share a channel space, and when a
space is frozen; then the same patterns end to end through ``compress(tolerance=0, passes=["merge"])``.

A merge in a coupled space must hold in every producer and agree with every per-channel parameter on
the path; anything that mixes or reorders channels (Concat, Split, Transpose, a graph output, a
reduction over channels, a shape constant that counts them) must freeze the space or be rewritten
with it.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import Builder
from graphs import (assert_same, attr, check_exact, inits, merge_reasons, merge0, merge_counts, node,
                    plant, rand_layer, removed, view_weight)
from red_onnx.coupling import channel_spaces, remove_channels
from red_onnx.layers import input_specs, tensor_shapes

DUP = [(5, 1, 1.0)]
MULT = [(5, 1, 2.0)]


def spaces(model, exclude: str | None = None) -> dict:
    graph = gs.import_onnx(model)
    shapes = tensor_shapes(model, input_specs(model))
    return {s.name: s for s in channel_spaces(graph, shapes, re.compile(exclude) if exclude else None)}


def simple(path, plan=DUP, c: int = 8, hw: int = 8, seed: int = 0, consumer: str = "conv"):
    """x → conv1 (c ch, planted) → path(g, h) → conv2 (or Flatten→Gemm) → y."""
    rng = np.random.default_rng(seed)
    g = Builder(seed)
    x = g.input("x", ["N", 3, hw, hw])
    w1, b1 = plant(*rand_layer(rng, c, 3, 3), plan)
    h = path(g, g.conv_w(x, w1, b1, name="conv1"))
    if consumer == "conv":
        g.output(g.conv_w(h, *rand_layer(rng, 4, c, 3), name="conv2"))
    return g, h, rng


def model_of(path, plan=DUP, **kw):
    g, _, _ = simple(path, plan, **kw)
    return g.model()


def exact_or_frozen(model, allowed, batch: int = 3):
    """The rewrite runs, is valid, computes the same function, and removed one of ``allowed``."""
    result, report = merge0(model)
    assert removed(model, result) in allowed
    assert_same(model, result, batch=batch)
    return result, report


# --------------------------------------------------------------------------------------------- #
# the spaces themselves


def test_space_of_plain_chain():
    rng = np.random.default_rng(0)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *rand_layer(rng, 6, 3, 3), name="conv1")])
    h = g.node("Flatten", [g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
    g.output(g.gemm_w(h, *rand_layer(rng, 5, 6 * 16), name="fc"))
    s = spaces(g.model())
    space = s["conv1"]
    assert space.frozen is None
    assert space.channels == 6
    assert [p.name for p in space.producers] == ["conv1"]
    assert [(c.layer.name, c.block) for c in space.consumers] == [("fc", 16)]
    assert space.homogeneous and space.zero_preserving
    assert "graph output" in s["fc"].frozen


@pytest.mark.parametrize("op, homogeneous, zero", [
    ("Relu", True, True), ("LeakyRelu", True, True), ("Sigmoid", False, False), ("Tanh", False, True),
    ("HardSwish", False, True), ("Clip06", False, True), ("Clip16", False, False), ("AddConst", False, False),
    ("MulConst", True, True)])
def test_space_flags_of_path_ops(op, homogeneous, zero):
    def path(g, h):
        if op == "Clip06":
            return g.node("Clip", [h, g.const(np.float32(0)), g.const(np.float32(6))])
        if op == "Clip16":
            return g.node("Clip", [h, g.const(np.float32(1)), g.const(np.float32(6))])
        if op == "AddConst":
            return g.node("Add", [g.node("Relu", [h]), g.const(np.full((8, 1, 1), 0.5))])
        if op == "MulConst":
            return g.node("Mul", [g.node("Relu", [h]), g.const(np.linspace(0.5, 2, 8).reshape(8, 1, 1))])
        return g.act(h, op)
    space = spaces(model_of(path))["conv1"]
    assert space.frozen is None
    assert (space.homogeneous, space.zero_preserving) == (homogeneous, zero)


def test_space_params_bn_depthwise_prelu():
    def path(g, h):
        h = g.node("PRelu", [h, g.const(np.full((8, 1, 1), 0.1), "slope")])
        rng = np.random.default_rng(1)
        h = g.conv_w(h, rng.standard_normal((8, 1, 3, 3)).astype(np.float32), None, name="dw", group=8)
        stats = [np.ones(8), np.zeros(8), np.zeros(8), np.ones(8)]
        return g.node("BatchNormalization", [h] + [g.const(s, f"bn{k}") for k, s in enumerate(stats)])
    space = spaces(model_of(path))["conv1"]
    assert space.frozen is None
    names = sorted(p.tensor.name for p in space.params)
    assert names == sorted(["slope", "bn0", "bn1", "bn2", "bn3", space.depthwise[0].inputs[1].name])
    assert [n.name for n in space.depthwise] == ["dw"]
    assert not space.homogeneous  # BN


def test_space_of_residual_has_both_producers():
    rng = np.random.default_rng(2)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.conv_w(x, *rand_layer(rng, 8, 3, 3), name="convA")
    b = g.conv_w(x, *rand_layer(rng, 8, 3, 1), name="convB")
    h = g.node("Relu", [g.node("Add", [a, b])])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    s = spaces(g.model())
    assert "convA+convB" in s or "convB+convA" in s
    space = s.get("convA+convB") or s.get("convB+convA")
    assert space.frozen is None
    assert sorted(p.name for p in space.producers) == ["convA", "convB"]
    assert [c.layer.name for c in space.consumers] == ["conv2"]


def test_space_reshape_registered():
    def path(g, h):
        return g.node("Reshape", [g.node("Relu", [h]), g.const([-1, 8 * 16], "shape", dtype=np.int64)])
    g, h, rng = simple(path, hw=4, consumer="none")
    g.output(g.gemm_w(h, *rand_layer(rng, 5, 8 * 16), name="fc"))
    space = spaces(g.model())["conv1"]
    assert space.frozen is None
    assert [(c.layer.name, c.block) for c in space.consumers] == [("fc", 16)]
    # removing channels resizes the Reshape target with them: 6 of 8 channels, blocks of 16
    shape = next(n for n in space.producers[0].node.outputs[0].outputs[0].outputs[0].outputs if n.op == "Reshape")
    remove_channels(space, np.arange(6), np.eye(8)[:, :6])
    np.testing.assert_array_equal(shape.inputs[1].values, [-1, 6 * 16])
    assert space.channels == 6 and space.consumers[0].layer.get_weight().shape == (5, 6 * 16)


def test_shape_op_does_not_freeze():
    def path(g, h):
        h = g.node("Relu", [h])
        g.node("Shape", [h])  # a dangling shape read
        return h
    assert spaces(model_of(path))["conv1"].frozen is None


@pytest.mark.parametrize("case, reason", [
    ("concat_self", "Concat"), ("transpose_then_pool", "Transpose"),
    ("softmax", "Softmax"), ("mulconst_bad_shape", "Mul"), ("reduce_channels", "ReduceMean"),
    ("output", "graph output")])
def test_frozen_reasons(case, reason):
    rng = np.random.default_rng(3)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    cin = 8
    if case == "concat_self":
        h = g.node("Concat", [h, g.node("Relu", [h])], axis=1)
        cin = 16
    elif case == "transpose_then_pool":  # a pool over the wrong axes once the channels moved
        h = g.node("Transpose", [g.node("Transpose", [h], perm=[0, 2, 1, 3])], perm=[0, 2, 1, 3])
        h = g.node("MaxPool", [g.node("Transpose", [h], perm=[0, 2, 3, 1])], kernel_shape=[2, 2])
        h = g.node("Transpose", [h], perm=[0, 3, 1, 2])
        cin = 7
    elif case == "softmax":
        h = g.node("Softmax", [h], axis=1)
    elif case == "mulconst_bad_shape":
        h = g.node("Mul", [h, g.const(np.ones((2, 1, 1, 1)))])
    elif case == "reduce_channels":
        h = g.node("Mul", [h, g.node("ReduceMean", [h], axes=[1], keepdims=1)])
    elif case == "output":
        g.output(h)
    if case == "transpose_then_pool":
        g.output(g.conv_w(h, *rand_layer(rng, 4, cin, 1), name="conv2"))
    else:
        g.output(g.conv_w(h, *rand_layer(rng, 4, cin, 3), name="conv2"))
    model = g.model()
    frozen = spaces(model)["conv1"].frozen
    assert frozen is not None and reason in frozen, frozen
    if case == "mulconst_bad_shape":  # (2,1,1,1) broadcasts the batch: it runs at batch 2 only
        return
    result, report = check_exact(model, {})
    assert any(reason in r for r in merge_reasons(report)), merge_reasons(report)
    assert merge_counts(report)["spaces_frozen"] >= 2  # conv1's space and the output's


# --------------------------------------------------------------------------------------------- #
# grouped convs (ResNeXt, RegNet): merges inside a group's block, as many in every block


def grouped_model(plan, producer_plan=(), groups=2):
    """x → conv0 (4 ch) → Relu → conv1 (8 ch, grouped ``groups`` when ``producer_plan`` is given,
    rows planted) → Relu → conv2 (4 ch, grouped ``groups``: output o of group G reads channels
    [G·8/g, (G+1)·8/g)) → y; conv1 planted with ``plan``."""
    rng = np.random.default_rng(27)
    g = Builder()
    h = g.node("Relu", [g.conv_w(g.input("x", ["N", 3, 8, 8]), *rand_layer(rng, 4, 3, 3), name="conv0")])
    if producer_plan:
        w1, b1 = plant(*rand_layer(rng, 8, 4 // groups, 3), list(producer_plan))
        h = g.conv_w(h, w1, b1, name="conv1", group=groups)
    else:
        h = g.conv_w(h, *plant(*rand_layer(rng, 8, 4, 3), plan), name="conv1")
    w2, b2 = rand_layer(rng, 4, 8 // groups, 3)
    g.output(g.conv_w(g.node("Relu", [h]), w2, b2, name="conv2", group=groups))
    return g.model(), w2


def test_grouped_consumer_merges_inside_its_blocks():
    """Multiples inside block 0 (1 = 2.5·0) and block 1 (5 = 0.4·4) merge: one per block, and the
    grouped weight keeps its layout (numpy oracle: per group, the partner's column moves onto its
    root)."""
    plan = [(1, 0, 2.5), (5, 4, 0.4)]
    model, w2 = grouped_model(plan)
    space = spaces(model)["conv1"]
    assert space.frozen is None and space.groups == 2
    result, _ = check_exact(model, {"conv1": 2})
    oracle = w2.astype(np.float64).copy()  # (4, 4, 3, 3): outputs 0-1 read channels 0-3, outputs 2-3 channels 4-7
    oracle[:2, 0] += 2.5 * oracle[:2, 1]
    oracle[2:, 0] += 0.4 * oracle[2:, 1]
    oracle = np.delete(oracle, 1, axis=1)
    np.testing.assert_allclose(view_weight(result, "conv2"), oracle, rtol=1e-6, atol=1e-6)
    assert attr(node(result, "conv2"), "group") == 2


@pytest.mark.parametrize("plan", [[(1, 0, 1.0)], [(5, 1, 1.0)]])
def test_grouped_consumer_keeps_unbalanced_or_crossing_pairs(plan):
    """A duplicate in one block only would leave the blocks unequal; one across blocks reads other
    inputs: both stay."""
    model, _ = grouped_model(plan)
    assert spaces(model)["conv1"].frozen is None
    check_exact(model, {})


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("plan, expected", [([(1, 0, 1.0), (5, 4, 1.0)], {"conv1": 2}), ([(1, 0, 1.0)], {})])
def test_equal_split_parts_lose_as_many_channels(opset, plan, expected):
    """A chunk into 2 equal parts (no sizes; opset 18: num_outputs): a pair in each part merges and
    the parts stay equal (the Split still needs no sizes); a pair in one part only stays."""
    rng = np.random.default_rng(28)
    g = Builder(opset=opset)
    h = g.node("Relu", [g.conv_w(g.input("x", ["N", 3, 8, 8]), *plant(*rand_layer(rng, 8, 3, 3), plan), name="conv1")])
    a, b = g.node("Split", [h], n_outputs=2, axis=1, **({"num_outputs": 2} if opset >= 18 else {}))
    g.output(g.node("Add", [g.conv_w(a, *rand_layer(rng, 4, 4, 3), name="convA"),
                            g.conv_w(b, *rand_layer(rng, 4, 4, 3), name="convB")]))
    model = g.model()
    assert spaces(model)["conv1"].frozen is None
    result, _ = check_exact(model, expected)
    split = next(n for n in result.graph.node if n.op_type == "Split")
    assert len(split.input) == 1 and not any(a.name == "split" for a in split.attribute)
    assert view_weight(result, "convA").shape[1] == view_weight(result, "convB").shape[1] == (3 if expected else 4)


def test_grouped_producer_merges_inside_its_blocks():
    """conv1 grouped (2 groups of 4 outputs, each reading 2 of conv0's channels): equal rows inside
    each block merge, one per block; its input space (conv0) is a grouped consumer's too."""
    model, _ = grouped_model([], producer_plan=[(1, 0, 1.0), (6, 7, 1.0)])
    s = spaces(model)
    assert s["conv1"].frozen is None and s["conv1"].groups == 2 and s["conv0"].groups == 2
    result, _ = check_exact(model, {"conv1": 2})
    assert attr(node(result, "conv1"), "group") == 2


# --------------------------------------------------------------------------------------------- #
# coupled producers: a residual Add, a squeeze-excite gate


def residual_model(plan_a, plan_b):
    rng = np.random.default_rng(4)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), plan_a), name="convA")
    b = g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 1), plan_b), name="convB")
    h = g.node("Relu", [g.node("Add", [a, b])])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    return g.model()


def test_residual_planted_in_one_branch_only_not_merged():
    check_exact(residual_model([(5, 1, 1.0), (6, 2, 2.0)], []), {})
    check_exact(residual_model([], [(5, 1, 1.0), (6, 2, 2.0)]), {})


def test_residual_planted_in_both_branches_merged():
    plan = [(5, 1, 1.0), (6, 2, 2.0)]
    result, _ = check_exact(residual_model(plan, plan), {"convA": 2, "convB": 2})
    assert view_weight(result, "conv2").shape[1] == 6


def test_residual_different_scales_in_branches_not_merged():
    check_exact(residual_model([(5, 1, 2.0)], [(5, 1, 3.0)]), {})


def test_resnet_block_shortcut_and_inner_conv_couple():
    """x0 = Relu(conv0(x)); out = Relu(conv2(Relu(conv1(x0))) + x0): conv0 and conv2 share a space."""
    rng = np.random.default_rng(5)
    plan = [(3, 0, 1.5), (5, 2, 1.0)]
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    x0 = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 6, 3, 3), plan), name="conv0")])
    h = g.node("Relu", [g.conv_w(x0, *rand_layer(rng, 6, 6, 3), name="conv1")])
    w2, b2 = plant(*rand_layer(rng, 6, 6, 3), plan)
    out = g.node("Relu", [g.node("Add", [g.conv_w(h, w2, b2, name="conv2"), x0])])
    g.output(g.conv_w(out, *rand_layer(rng, 4, 6, 3), name="head"))
    result, _ = check_exact(g.model(), {"conv0": 2, "conv2": 2})
    assert view_weight(result, "conv1").shape[1] == 4 and view_weight(result, "conv2").shape[1] == 6


@pytest.mark.parametrize("gate_planted, expected", [(True, {"conv1": 1, "conv_b": 1}), (False, {})])
def test_squeeze_excite_gate_couples(gate_planted, expected):
    rng = np.random.default_rng(6)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    s = g.node("Relu", [g.conv_w(g.node("GlobalAveragePool", [h]), *rand_layer(rng, 2, 8, 1), name="conv_a")])
    wb, bb = rand_layer(rng, 8, 2, 1)
    if gate_planted:
        wb, bb = plant(wb, bb, DUP)
    s = g.node("Sigmoid", [g.conv_w(s, wb, bb, name="conv_b")])
    h = g.node("Mul", [h, s])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    check_exact(g.model(), expected)


# --------------------------------------------------------------------------------------------- #
# graph outputs and --exclude


def test_space_reaching_graph_output_never_merged():
    rng = np.random.default_rng(7)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), [(5, 1, 1.0), (6, 1, 0.0)]), name="conv1")],
               outputs=["features"])
    g.output("features")
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    result, report = check_exact(g.model(), {})
    assert any("graph output" in r for r in merge_reasons(report))


def exclusion_chain():
    rng = np.random.default_rng(8)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    h = g.node("Relu", [g.conv_w(h, *plant(*rand_layer(rng, 7, 8, 3), [(4, 0, 2.0)]), name="conv2")])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 7, 3), name="conv3"))
    return g.model()


@pytest.mark.parametrize("exclude, expected, untouched, reason", [
    (None, {"conv1": 1, "conv2": 1}, [], False),
    ("^conv1$", {"conv2": 1}, ["conv1"], False),  # excluded producer: its space is never formed
    ("conv3", {"conv1": 1}, ["conv3"], True),     # excluded consumer: the space it reads is left alone
    ("conv2", {}, ["conv2"], True),               # both: consumer of conv1's space, producer of its own
    ("conv[12]", {}, ["conv1", "conv2"], False),
])
def test_exclude(exclude, expected, untouched, reason):
    model = exclusion_chain()
    result, report = check_exact(model, expected, exclude=exclude)
    before, after = inits(model), inits(result)
    for name in untouched:
        for k in node(model, name).input[1:]:
            assert after[k].tobytes() == before[k].tobytes() and after[k].shape == before[k].shape, (name, k)
    if reason:
        assert any("exclude" in r for r in merge_reasons(report)), merge_reasons(report)


def test_exclude_one_residual_partner_freezes_the_space():
    plan = [(5, 1, 1.0)]
    model = residual_model(plan, plan)
    result, report = check_exact(model, {}, exclude="convB")
    assert any("exclude" in r for r in merge_reasons(report)), merge_reasons(report)


# --------------------------------------------------------------------------------------------- #
# channel-counting constants and channel-mixing ops: frozen, or rewritten with the space


def test_mul_by_constant_along_width_not_channels():
    """A (C,)-shaped constant multiplies the LAST axis of NCHW (here W = C = 8), not the channels.
    Its entries 1 and 5 are equal, like the planted channels 1 and 5."""
    def path(g, h):
        return g.node("Mul", [g.node("Relu", [h]), g.const([0.5, 1.0, 0.7, 0.9, 1.1, 1.0, 1.3, 1.5])])
    exact_or_frozen(model_of(path), [{}, {"conv1": 1}])


def test_prelu_slope_along_width_not_channels():
    """A PRelu slope of shape (C,) broadcasts on W (W = C = 8), not on the channels; its entries 1
    and 5 are equal, like the planted channels 1 and 5."""
    def path(g, h):
        return g.node("PRelu", [h, g.const([0.1, 0.2, 0.3, 0.1, 0.15, 0.2, 0.25, 0.3])])
    exact_or_frozen(model_of(path), [{}, {"conv1": 1}])


def test_reduce_over_channels_with_negative_axis_2d():
    """A decomposed LayerNorm-like centring over the features (axes=[-1] on (N, C)) mixes channels."""
    rng = np.random.default_rng(9)
    g = Builder()
    x = g.input("x", ["N", 6])
    h = g.node("Relu", [g.gemm_w(x, *plant(*rand_layer(rng, 8, 6), DUP), name="fc1")])
    h = g.node("Sub", [h, g.node("ReduceMean", [h], axes=[-1], keepdims=1)])
    g.output(g.gemm_w(h, *rand_layer(rng, 4, 8), name="fc2"))
    exact_or_frozen(g.model(), [{}])


def test_reduce_over_channels_with_negative_axis_4d():
    """axes=[-3] on NCHW is the channel axis (a CBAM-style channel mean)."""
    def path(g, h):
        h = g.node("Relu", [h])
        return g.node("Mul", [h, g.node("ReduceMean", [h], axes=[-3], keepdims=1)])
    exact_or_frozen(model_of(path), [{}])


def test_spatial_reduce_keeps_space():
    """Positive control: ReduceMean over axes [2, 3] is per channel; the space stays mergeable."""
    def path(g, h):
        h = g.node("Relu", [h])
        return g.node("Mul", [h, g.node("ReduceMean", [h], axes=[2, 3], keepdims=1)])
    check_exact(model_of(path), {"conv1": 1})


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum"])
@pytest.mark.parametrize("consumer", ["gemm", "matmul"])
@pytest.mark.parametrize("axes", [[2, 3], [-1, -2]])
def test_spatial_reduce_without_kept_dims_keeps_space(op, consumer, axes):
    """Global pooling as ``x.mean([2, 3])`` exports it (keepdims=0: (N, C), the channels still on
    axis 1) into a linear layer: the planted duplicate merges, the function stays."""
    rng = np.random.default_rng(12)
    g = Builder(12)
    h = g.node("Relu", [g.conv_w(g.input("x", ["N", 3, 6, 6]), *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    h = g.node(op, [h, g.const(axes, dtype=np.int64)], keepdims=0) if op == "ReduceSum" else \
        g.node(op, [h], axes=axes, keepdims=0)  # ReduceSum's axes are an input from opset 13
    w, b = rand_layer(rng, 4, 8)
    g.output(g.gemm_w(h, w, b, name="fc") if consumer == "gemm" else g.matmul_w(h, w, b, name="fc"))
    check_exact(g.model(), {"conv1": 1})


def test_reduce_without_axes_is_over_every_axis():
    """ReduceSum with an empty axes input sums every axis, the channels too (a global energy norm):
    merging a duplicate would change that sum, so the space is frozen."""
    def path(g, h):
        h = g.node("Relu", [h])
        return g.node("Div", [h, g.node("ReduceSum", [h, g.const(np.zeros(0), dtype=np.int64)], keepdims=1)])
    exact_or_frozen(model_of(path), [{}])


def test_channel_reduce_without_kept_dims_freezes():
    """keepdims=0 over the channel axis leaves no channels: the space is frozen, nothing merges."""
    rng = np.random.default_rng(13)
    g = Builder(13)
    h = g.node("Relu", [g.conv_w(g.input("x", ["N", 3, 6, 6]), *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    h = g.node("Flatten", [g.node("ReduceMean", [h], axes=[1], keepdims=0)], axis=1)
    g.output(g.gemm_w(h, *rand_layer(rng, 4, 36), name="fc"))
    exact_or_frozen(g.model(), [{}])


def instance_norm(scale_5: float):
    """conv1 → InstanceNormalization (scale[5] = ``scale_5``, bias[5] = bias[1]) → Relu."""
    def path(g, h):
        scale, bias = np.linspace(0.5, 1.2, 8), np.linspace(-0.3, 0.4, 8)
        scale[5], bias[5] = scale_5, bias[1]
        return g.node("Relu", [g.node("InstanceNormalization", [h, g.const(scale), g.const(bias)], epsilon=1e-5)])
    return path


@pytest.mark.parametrize("scale_5, plan, expected", [
    (0.6, DUP, {"conv1": 1}),   # equal channels, equal scale and bias: merged
    (0.9, DUP, {}),             # another scale: left
    (0.6, MULT, {}),            # a multiple: equal after the normalization up to its epsilon only
])
def test_instance_norm_is_a_per_channel_path_op(scale_5, plan, expected):
    """InstanceNormalization acts channel by channel (a style-transfer or GAN generator's norm)."""
    model = model_of(instance_norm(scale_5), plan=plan)
    assert spaces(model)["conv1"].frozen is None
    check_exact(model, expected)


def test_bn_parameters_sharing_one_initializer():
    """After initializer de-duplication (onnxoptimizer / onnxsim), BN scale and var can be ONE tensor."""
    def path(g, h):
        ones, zeros = g.const(np.ones(8), "ones"), g.const(np.zeros(8), "zeros")
        return g.node("BatchNormalization", [g.node("Relu", [h]), ones, zeros, zeros, ones], epsilon=1e-5)
    exact_or_frozen(model_of(path, plan=[(2, 1, 1.0)]), [{}, {"conv1": 1}])


def test_prelu_slope_shared_between_two_spaces():
    """One slope initializer (C,1,1) read by the PRelus of two spaces; only one has duplicates."""
    rng = np.random.default_rng(10)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    slope = g.const(np.array([0.1, 0.15, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]).reshape(8, 1, 1), "slope")
    for k, plan in enumerate([[(2, 1, 1.0)], []]):
        h = g.node("PRelu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), plan), name=f"conv{k}"), slope])
        g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name=f"head{k}"))
    exact_or_frozen(g.model(), [{}, {"conv0": 1}])


def test_reshape_shape_constant_shared_between_two_spaces():
    """Two branches flatten through ONE shape initializer [-1, C·H·W]; only one branch has duplicates."""
    rng = np.random.default_rng(11)
    g = Builder()
    x = g.input("x", ["N", 3, 4, 4])
    shape = g.const(np.array([-1, 8 * 16]), "flat_shape", dtype=np.int64)
    for k, plan in enumerate([[(3, 1, 1.0)], []]):
        h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), plan), name=f"conv{k}")])
        h = g.node("Reshape", [h, shape])
        g.output(g.gemm_w(h, *rand_layer(rng, 5, 8 * 16), name=f"fc{k}"))
    exact_or_frozen(g.model(), [{}, {"conv0": 1}])


def test_reshape_target_computed_from_shape_and_constant():
    """x.view(x.size(0), C·H·W) exports as Reshape(x, Concat(Shape(x)[:1], [C·H·W]))."""
    rng = np.random.default_rng(12)
    g = Builder()
    x = g.input("x", ["N", 3, 4, 4])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    n = g.node("Slice", [g.node("Shape", [h]), g.const([0], dtype=np.int64), g.const([1], dtype=np.int64)])
    target = g.node("Concat", [n, g.const([8 * 16], dtype=np.int64)], axis=0)
    h = g.node("Reshape", [h, target])
    g.output(g.gemm_w(h, *rand_layer(rng, 5, 8 * 16), name="fc"))
    exact_or_frozen(g.model(), [{}, {"conv1": 1}])


def test_resize_with_sizes_counting_channels():
    """Resize(sizes=[1, C, 2H, 2W]) names the channel count; merging must update it or leave it alone."""
    rng = np.random.default_rng(13)
    g = Builder()
    x = g.input("x", [1, 3, 4, 4])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    h = g.node("Resize", [h, "", "", g.const([1, 8, 8, 8], dtype=np.int64)], mode="nearest")
    g.output(g.conv_w(h, *rand_layer(rng, 4, 8, 3), name="conv2"))
    exact_or_frozen(g.model(), [{}, {"conv1": 1}], batch=1)


def test_resize_with_scales_keeps_space():
    """Positive control: Resize by scales [1, 1, 2, 2] is per channel and positively homogeneous."""
    def path(g, h):
        return g.node("Resize", [g.node("Relu", [h]), "", g.const([1, 1, 2, 2])], mode="nearest")
    check_exact(model_of(path, plan=MULT), {"conv1": 1})


# --------------------------------------------------------------------------------------------- #
# Concat, Split, Transpose: offsets, segments, a moved channel axis


def test_concat_offsets_merge_in_every_input():
    """Two planted producers concatenated on the channel axis (with the input between them): each
    merges at its own offset of the consumer's input channels."""
    rng = np.random.default_rng(21)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="convA")])
    b = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 6, 3, 3), [(4, 0, 1.0), (5, 2, 1.0)]), name="convB")])
    h = g.node("MaxPool", [g.node("Concat", [a, x, b], axis=1)], kernel_shape=[2, 2])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 17, 3), name="conv2"))
    model = g.model()
    s = spaces(model)
    assert s["convA"].frozen is None and s["convB"].frozen is None
    assert [(c.layer.name, c.shift, c.total) for c in s["convB"].consumers] == [("conv2", 11, 17)]
    check_exact(model, {"convA": 1, "convB": 2})


def dense_block(plan_b, like=True, head="conv"):
    """A DenseNet-style block: conv1 (8 ch) and convB (6 ch, planted ``plan_b``) concatenated, then
    BatchNormalization → Relu → conv2 over the 14 channels (``head`` "mean": x.mean([2, 3]) → Gemm);
    with ``like``, the BN statistics of a planted pair (at convB's offset 8) are equal."""
    rng = np.random.default_rng(23)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.node("Relu", [g.conv_w(x, *rand_layer(rng, 8, 3, 3), name="conv1")])
    b = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 6, 3, 3), plan_b), name="convB")])
    h = bn_like(g, rng, g.node("Concat", [a, b], axis=1), 14, [(8 + j, 8 + i) for j, i, _ in plan_b] if like else [])
    h = g.node("Relu", [h])
    if head == "mean":
        g.output(g.gemm_w(g.node("ReduceMean", [h], axes=[2, 3], keepdims=0), *rand_layer(rng, 4, 14), name="fc"))
    else:
        g.output(g.conv_w(h, *rand_layer(rng, 4, 14, 3), name="conv2"))
    return g.model()


def bn_like(g, rng, h, width, like):
    """BatchNormalization with random statistics; entry j copies entry i for (j, i) in ``like``."""
    stats = [rng.uniform(0.5, 1.5, width), rng.standard_normal(width), rng.standard_normal(width),
             rng.uniform(0.5, 2.0, width)]
    for j, i in like:
        for v in stats:
            v[j] = v[i]
    return g.node("BatchNormalization", [h] + [g.const(v) for v in stats], epsilon=1e-5)


@pytest.mark.parametrize("head", ["conv", "mean"])
def test_batchnorm_after_a_concat_is_a_per_channel_path_op(head):
    """A BN after a Concat (a DenseNet layer's, a CSP block's; then a conv, or a global mean into a
    Gemm): the space's channels are entries at its offset of the statistics; equal channels with
    equal statistics merge, exactly, and the statistics lose those entries."""
    model = dense_block(DUP, head=head)
    assert spaces(model)["convB"].frozen is None
    result, _ = check_exact(model, {"convB": 1})
    bn = next(n for n in result.graph.node if n.op_type == "BatchNormalization")
    assert [inits(result)[t].shape for t in bn.input[1:5]] == [(13,)] * 4


def test_batchnorm_after_a_concat_keeps_channels_with_other_statistics():
    check_exact(dense_block(DUP, like=False), {})


@pytest.mark.parametrize("equal, expected", [(True, {"convB": 1}), (False, {})])
def test_per_channel_constants_and_slope_after_a_concat(equal, expected):
    """Past a Concat, a per-channel scale (1, C, 1, 1), a per-channel bias (C, 1, 1) and a PRelu
    slope are parameters at the space's offset: the planted pair merges where their entries are
    equal, not otherwise."""
    rng = np.random.default_rng(25)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.node("Relu", [g.conv_w(x, *rand_layer(rng, 8, 3, 3), name="conv1")])
    b = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 6, 3, 3), DUP), name="convB")])
    scale, bias, slope = rng.uniform(0.5, 1.5, 14), rng.standard_normal(14), rng.uniform(0.1, 0.3, 14)
    for v in (scale, bias, slope):
        v[8 + 5] = v[8 + 1] if equal else v[8 + 1] + 0.1
    h = g.node("Mul", [g.node("Concat", [a, b], axis=1), g.const(scale.reshape(1, 14, 1, 1))])
    h = g.node("PRelu", [g.node("Add", [h, g.const(bias.reshape(14, 1, 1))]), g.const(slope.reshape(14, 1, 1))])
    g.output(g.conv_w(h, *rand_layer(rng, 4, 14, 3), name="conv2"))
    model = g.model()
    assert spaces(model)["convB"].frozen is None
    check_exact(model, expected)


def test_batchnorm_after_a_split():
    """conv1 (14 ch) split into 8 + 6, the second part normalized on its own: its channels 8.. are
    entries 0.. of that BN's statistics; the planted pair (13 = 9) merges within its segment."""
    rng = np.random.default_rng(24)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 14, 3, 3), [(13, 9, 1.0)]), name="conv1")])
    a, b = g.node("Split", [h, g.const([8, 6], dtype=np.int64)], n_outputs=2, axis=1)
    b = g.node("Relu", [bn_like(g, rng, b, 6, [(5, 1)])])
    g.output(g.node("Add", [g.conv_w(a, *rand_layer(rng, 4, 8, 3), name="convA"),
                            g.conv_w(b, *rand_layer(rng, 4, 6, 3), name="convB")]))
    model = g.model()
    assert spaces(model)["conv1"].frozen is None
    result, _ = check_exact(model, {"conv1": 1})
    bn = next(n for n in result.graph.node if n.op_type == "BatchNormalization")
    assert [inits(result)[t].shape for t in bn.input[1:5]] == [(5,)] * 4


def test_concat_to_graph_output_freezes():
    rng = np.random.default_rng(22)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Concat", [g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")]), x], axis=1)
    g.output(h)
    g.output(g.conv_w(h, *rand_layer(rng, 4, 11, 3), name="conv2"))
    model = g.model()
    assert "graph output" in spaces(model)["conv1"].frozen
    check_exact(model, {})


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("plan, expected", [([(6, 4, 1.0)], {"conv1": 1}), ([(5, 1, 1.0)], {})])
def test_split_segments(opset, plan, expected):
    """Split [3, 5]: a duplicate inside one segment merges and the sizes follow; one across the
    segments does not."""
    rng = np.random.default_rng(23)
    g = Builder(opset=opset)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), plan), name="conv1")])
    if opset >= 13:
        parts = g.node("Split", [h, g.const(np.array([3, 5]), "sizes", dtype=np.int64)], n_outputs=2, axis=1)
    else:
        parts = g.node("Split", [h], name="split", n_outputs=2, axis=1, split=[3, 5])
    g.output(g.conv_w(parts[0], *rand_layer(rng, 4, 3, 3), name="convP"))
    g.output(g.conv_w(g.node("Relu", [parts[1]]), *rand_layer(rng, 4, 5, 1), name="convQ"))
    model = g.model()
    assert spaces(model)["conv1"].frozen is None
    result, _ = check_exact(model, expected)
    sizes = inits(result)["sizes"].tolist() if opset >= 13 else list(attr(node(result, "split"), "split"))
    assert sizes == ([3, 4] if expected else [3, 5])


def test_transpose_to_matmul_on_the_last_axis():
    """NCHW → NHWC → MatMul over channels: the MatMul's weight rows are the consumer's columns."""
    rng = np.random.default_rng(24)
    g = Builder()
    x = g.input("x", ["N", 3, 6, 6])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), MULT), name="conv1")])
    t = g.node("Sigmoid", [g.node("Transpose", [h], perm=[0, 2, 3, 1])])
    g.output(g.matmul_w(t, rng.standard_normal((5, 8)).astype(np.float32), name="mm"))
    model = g.model()
    space = spaces(model)["conv1"]
    assert space.frozen is None and not space.homogeneous  # the Sigmoid: duplicates only
    assert [(c.layer.name, c.axis) for c in space.consumers] == [("mm", 3)]
    check_exact(model, {})
    check_exact(model_transpose_dup(), {"conv1": 1})


def model_transpose_dup():
    rng = np.random.default_rng(25)
    g = Builder()
    x = g.input("x", ["N", 3, 6, 6])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), MULT), name="conv1")])
    t = g.node("Transpose", [g.node("Transpose", [h], perm=[0, 1, 3, 2])], perm=[0, 2, 3, 1])
    g.output(g.matmul_w(t, rng.standard_normal((5, 8)).astype(np.float32), name="mm"))
    return g.model()


@pytest.mark.parametrize("plan, expected, bounds", [
    ([(5, 3, 1.0)], {"conv1": 1}, [2, 5]),   # both inside the slice: merged, the end moves
    ([(7, 3, 1.0)], {}, [2, 6]),             # one inside, one outside: left
    ([(1, 0, 1.0)], {"conv1": 1}, [1, 5]),   # both before it: merged, both bounds move
])
def test_slice_segments(plan, expected, bounds):
    rng = np.random.default_rng(26)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), plan), name="conv1")])
    s = g.node("Slice", [h, g.const(np.array([2]), "starts", dtype=np.int64),
                         g.const(np.array([6]), "ends", dtype=np.int64), g.const(np.array([1]), "axes", dtype=np.int64)])
    g.output(g.conv_w(s, *rand_layer(rng, 4, 4, 3), name="conv2"))
    g.output(g.conv_w(h, *rand_layer(rng, 3, 8, 1), name="conv3"))  # every channel is used somewhere
    model = g.model()
    assert spaces(model)["conv1"].frozen is None
    result, _ = check_exact(model, expected)
    assert [int(inits(result)["starts"][0]), int(inits(result)["ends"][0])] == bounds


def test_spatial_slice_keeps_the_space():
    rng = np.random.default_rng(27)
    g = Builder()
    x = g.input("x", ["N", 3, 8, 8])
    h = g.node("Relu", [g.conv_w(x, *plant(*rand_layer(rng, 8, 3, 3), DUP), name="conv1")])
    s = g.node("Slice", [h, g.const(np.array([1, 0]), dtype=np.int64), g.const(np.array([7, 6]), dtype=np.int64),
                         g.const(np.array([2, -1]), dtype=np.int64)])
    g.output(g.conv_w(s, *rand_layer(rng, 4, 8, 3), name="conv2"))
    model = g.model()
    assert spaces(model)["conv1"].frozen is None
    check_exact(model, {"conv1": 1})
