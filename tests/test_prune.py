"""Channel pruning (red_onnx.passes.prune): constant channels folded exactly, tiny channels pruned within
the tolerance, coupled channel sets, biasless consumers, and the latency guard over channel removals.

Exact cases are checked against a numpy oracle of the folded weights and against onnxruntime on
random inputs; lossy ones against the tolerance on fresh inputs of the probe distribution.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import red_onnx
from conftest import Builder
from graphs import assert_same, inits, out_channels, rel_l2, rng_feeds, session, view_weight


def prune0(model: onnx.ModelProto, **kwargs):
    result, report = red_onnx.compress(model, tolerance=0, passes=["prune"], **kwargs)
    onnx.checker.check_model(result, full_check=True)
    assert report.verified
    return result, report


def counts(report) -> dict:
    return next(p for p in report.passes if p["name"] == "prune")


def constant_chain(constant=(2, 5), k2=1, c=8, seed=0, bn=False, act="Relu"):
    """x(N,3,8,8) → conv1 (c ch; channels ``constant``: zero weights, bias only) → [BN] → act →
    conv2 (4 ch, k2×k2, no padding) → y."""
    rng = np.random.default_rng(seed)
    g = Builder(seed)
    x = g.input("x", ["N", 3, 8, 8])
    w1 = rng.standard_normal((c, 3, 3, 3)).astype(np.float32) / 5
    b1 = rng.uniform(0.5, 1.5, c).astype(np.float32)
    w1[list(constant)] = 0.0
    h = g.conv_w(x, w1, b1, name="conv1")
    if bn:
        h = g.bn(h, c)
    h = g.act(h, act)
    w2 = rng.standard_normal((4, c, k2, k2)).astype(np.float32) / 3
    b2 = rng.standard_normal(4).astype(np.float32)
    g.output(g.conv_w(h, w2, b2, name="conv2", pad=0))
    return g.model(), (w1, b1, w2, b2)


def test_constant_channels_fold_exactly_at_tolerance_0():
    model, (w1, b1, w2, b2) = constant_chain()
    result, report = prune0(model)
    assert out_channels(result)["conv1"] == 6
    assert counts(report)["constant_channels_folded"] == 2
    assert_same(model, result)
    # numpy oracle: the constant relu(b1_j) moves into conv2's bias, its columns go
    keep = [c for c in range(8) if c not in (2, 5)]
    folded = b2.astype(np.float64) + np.einsum("ojhw,j->o", w2[:, [2, 5]].astype(np.float64),
                                               np.maximum(b1[[2, 5]], 0))
    after = inits(result)
    conv2 = next(n for n in result.graph.node if n.name == "conv2")
    np.testing.assert_allclose(after[conv2.input[2]], folded, rtol=1e-6)
    np.testing.assert_array_equal(view_weight(result, "conv2"), w2[:, keep])


def test_constant_through_batchnorm_and_sigmoid():
    """Zero weights and a BN shift: the channel is a constant that is not 0 (not 'dead')."""
    model, _ = constant_chain(constant=(1,), bn=True, act="Sigmoid")
    result, report = prune0(model)
    assert out_channels(result)["conv1"] == 7 and counts(report)["constant_channels_folded"] == 1
    assert_same(model, result)


@pytest.mark.parametrize("consumer, reason", [("padded", "pad"), ("transpose", "ConvTranspose")])
def test_constant_channel_kept_where_a_consumer_sees_it_unevenly(consumer, reason):
    """A 3×3 consumer with padding sees 0 at the border, not the constant; a ConvTranspose sums a
    different number of its taps at different outputs (stride 2, kernel 3: 1, 2 or 4): no constant
    bias, so no exact fold: kept at tolerance 0, with the reason."""
    rng = np.random.default_rng(3)
    g = Builder(3)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) / 5
    w1[4] = 0
    h = g.relu(g.conv_w(g.input("x", ["N", 3, 6, 6]), w1, np.ones(6, np.float32), name="conv1"))
    if consumer == "padded":
        g.output(g.conv_w(h, rng.standard_normal((4, 6, 3, 3)).astype(np.float32), None, name="conv2", pad=1))
    else:
        g.output(g.node("ConvTranspose", [h, g.init(rng.standard_normal((6, 4, 3, 3)).astype(np.float32))],
                        name="up", kernel_shape=[3, 3], strides=[2, 2]))
    model = g.model()
    result, report = prune0(model)
    assert out_channels(result)["conv1"] == 6
    assert any(reason in a["reason"] and a["pass"] == "prune" for a in report.left_alone)
    assert_same(model, result)


def test_a_pruned_channel_into_a_conv_transpose_leaves_its_mean_tap():
    """Stride 2, 2×2 kernel: each output receives one of the 4 taps, so a channel pruned to its constant
    c leaves c · (Σ taps) / 4 in the bias (numpy oracle), not c · Σ taps. Its taps are equal here, so
    that is nearly exact and fits a small tolerance."""
    rng = np.random.default_rng(12)
    g = Builder(12)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) / 5
    w1[2] *= 1e-5
    b1 = np.full(6, 0.1, np.float32)
    b1[2] = 1.0  # channel 2: relu(1 + ~0) = 1 on every input
    h = g.relu(g.conv_w(g.input("x", ["N", 3, 6, 6]), w1, b1, name="conv1"))
    w2 = rng.standard_normal((6, 4, 2, 2)).astype(np.float32)
    w2[2] = rng.standard_normal(4).astype(np.float32)[:, None, None]
    b2 = rng.standard_normal(4).astype(np.float32)
    g.output(g.node("ConvTranspose", [h, g.init(w2), g.init(b2)], name="up", kernel_shape=[2, 2], strides=[2, 2]))
    model = g.model()
    result, report = red_onnx.compress(model, tolerance=0.01, passes=["prune"])
    assert out_channels(result)["conv1"] == 5 and report.output_deviation <= 0.01
    up = next(n for n in result.graph.node if n.name == "up")
    np.testing.assert_allclose(inits(result)[up.input[2]], b2 + w2[2, :, 0, 0], rtol=1e-4)


def test_constant_channel_into_biasless_matmul_gets_a_bias():
    """MatMul consumers without bias get one (an Add) carrying the folded constant."""
    rng = np.random.default_rng(4)
    g = Builder(4)
    x = g.input("x", ["N", 6])
    w1 = rng.standard_normal((5, 6)).astype(np.float32)
    w1[3] = 0
    h = g.relu(g.gemm_w(x, w1, rng.uniform(0.5, 1, 5).astype(np.float32), name="fc1"))
    g.output(g.matmul_w(h, rng.standard_normal((4, 5)).astype(np.float32), None, name="fc2"))
    model = g.model()
    result, report = prune0(model)
    assert view_weight(result, "fc1").shape == (4, 6)
    assert [n.op_type for n in result.graph.node].count("Add") == 1
    assert_same(model, result)


def test_constant_channel_of_a_sequence_matmul_folds_exactly():
    """Channels last, (N, T, C): a zero-weight neuron of a feed-forward block is the same constant at
    every position; folded into the next MatMul's bias (numpy oracle), exactly."""
    rng = np.random.default_rng(6)
    g = Builder(6)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    b1 = rng.uniform(0.5, 1, 8).astype(np.float32)
    w1[[2, 7]] = 0
    h = g.relu(g.matmul_w(g.input("x", ["N", 5, 6]), w1, b1, name="mm1"))
    w2, b2 = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    g.output(g.matmul_w(h, w2, b2, name="mm2"))
    model = g.model()
    result, report = prune0(model)
    assert counts(report)["constant_channels_folded"] == 2
    np.testing.assert_allclose(view_weight(result, "mm2"), np.delete(w2, [2, 7], axis=1), rtol=1e-6)
    np.testing.assert_allclose(inits(result)[next(n for n in result.graph.node if n.name == "mm2_bias").input[1]],
                               b2 + w2[:, [2, 7]] @ b1[[2, 7]], rtol=1e-5)
    assert_same(model, result)


@pytest.mark.parametrize("op, factor", [("ReduceMean", 1), ("ReduceMax", 1), ("ReduceSum", 36)])
def test_constant_channel_through_global_pooling_without_kept_dims(op, factor):
    """``x.mean([2, 3])`` (keepdims=0) before a Gemm: a constant channel c reaches the Gemm as c (a sum:
    36·c over the 6×6 positions), folded into its bias (numpy oracle), exactly."""
    rng = np.random.default_rng(7)
    g = Builder(7)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 5
    b1 = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    w1[[1, 6]] = 0
    h = g.relu(g.conv_w(g.input("x", ["N", 3, 6, 6]), w1, b1, name="conv1"))
    axes = g.const([2, 3], dtype=np.int64)
    h = g.node(op, [h, axes], keepdims=0) if op == "ReduceSum" else g.node(op, [h], axes=[2, 3], keepdims=0)
    w2, b2 = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    g.output(g.gemm_w(h, w2, b2, name="fc"))
    model = g.model()
    result, report = prune0(model)
    assert counts(report)["constant_channels_folded"] == 2
    np.testing.assert_array_equal(view_weight(result, "fc"), np.delete(w2, [1, 6], axis=1))
    fc = next(n for n in result.graph.node if n.name == "fc")
    np.testing.assert_allclose(inits(result)[fc.input[2]], b2 + factor * w2[:, [1, 6]] @ b1[[1, 6]], rtol=1e-5)
    assert_same(model, result)


def test_zero_bias_added_for_nothing_is_dropped_again():
    """A biasless consumer whose space prunes nothing keeps its form (no Add left behind)."""
    rng = np.random.default_rng(5)
    g = Builder(5)
    x = g.input("x", ["N", 6])
    h = g.relu(g.gemm_w(x, rng.standard_normal((5, 6)).astype(np.float32), None, name="fc1"))
    g.output(g.matmul_w(h, rng.standard_normal((4, 5)).astype(np.float32), None, name="fc2"))
    model = g.model()
    result, _ = red_onnx.compress(model, tolerance=1e-6, passes=["prune"])
    assert [n.op_type for n in result.graph.node] == [n.op_type for n in model.graph.node]


# --------------------------------------------------------------------------------------------- #
# lossy: tiny channels


def tiny_chain(tiny=(1, 6), scale=1e-4, seed=0, consumer="conv"):
    """conv1 (8 ch) → relu → conv2 / ConvTranspose / flatten+gemm, where it barely reads channels ``tiny``
    (``consumer`` "sequence": a feed-forward block on (N, T, C), mm1 → relu → mm2)."""
    rng = np.random.default_rng(seed)
    g = Builder(seed)
    if consumer == "sequence":
        w1 = rng.standard_normal((8, 6)).astype(np.float32) / 2
        h = g.relu(g.matmul_w(g.input("x", ["N", 5, 6]), w1, rng.standard_normal(8).astype(np.float32) * 0.1,
                              name="conv1"))
        w2 = rng.standard_normal((4, 8)).astype(np.float32) / 3
        w2[:, list(tiny)] *= scale
        g.output(g.matmul_w(h, w2, rng.standard_normal(4).astype(np.float32), name="mm2"))
        return g.model()
    x = g.input("x", ["N", 3, 6, 6])
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 5
    h = g.relu(g.conv_w(x, w1, rng.standard_normal(8).astype(np.float32) * 0.1, name="conv1"))
    if consumer == "conv":
        w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) / 5
        w2[:, list(tiny)] *= scale
        g.output(g.conv_w(h, w2, rng.standard_normal(4).astype(np.float32), name="conv2"))
    elif consumer == "transpose":  # stored (in, out, k, k): the input channels are rows
        w2 = rng.standard_normal((8, 4, 2, 2)).astype(np.float32) / 5
        w2[list(tiny)] *= scale
        g.output(g.node("ConvTranspose", [h, g.init(w2), g.init(rng.standard_normal(4).astype(np.float32))],
                        name="conv2", kernel_shape=[2, 2], strides=[2, 2]))
    else:
        flat = g.node("Flatten", [h], axis=1)
        w2 = rng.standard_normal((5, 8 * 36)).astype(np.float32) / 20
        w2.reshape(5, 8, 36)[:, list(tiny)] *= scale
        g.output(g.gemm_w(flat, w2, rng.standard_normal(5).astype(np.float32), name="fc"))
    return g.model()


@pytest.mark.parametrize("consumer", ["conv", "gemm", "sequence", "transpose"])
def test_tiny_channels_pruned_within_the_tolerance(consumer):
    model = tiny_chain(consumer=consumer)
    tol = 0.01
    result, report = red_onnx.compress(model, tolerance=tol, passes=["prune"])
    assert out_channels(result)["conv1"] <= 6, report.passes
    assert report.output_deviation <= tol
    rng = np.random.default_rng(9)  # fresh inputs of the probe distribution
    ref, res = session(model), session(result)
    for _ in range(5):
        feeds = rng_feeds(model, rng)
        assert rel_l2(ref.run(None, feeds)[0], res.run(None, feeds)[0]) <= tol


def test_a_pruned_channel_keeps_its_bias():
    """A large channel that barely depends on the input (big bias, tiny weights): pruning keeps its
    bias through the ReLU in the consumer's bias, so the deviation stays small (zeroing it would not)."""
    rng = np.random.default_rng(11)
    g = Builder(11)
    x = g.input("x", ["N", 3, 6, 6])
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) / 5
    w1[2] *= 1e-4
    b1 = np.full(6, 0.1, np.float32)
    b1[2] = 5.0
    h = g.relu(g.conv_w(x, w1, b1, name="conv1"))
    g.output(g.conv_w(h, rng.standard_normal((4, 6, 1, 1)).astype(np.float32), np.zeros(4, np.float32),
                      name="conv2", pad=0))
    model = g.model()
    result, report = red_onnx.compress(model, tolerance=0.001, passes=["prune"])
    assert out_channels(result)["conv1"] == 5 and report.output_deviation <= 0.001


def residual_model(seed=0):
    """conv_a and conv_b (8 ch) meet in an Add (one channel space); channel 3 barely matters."""
    rng = np.random.default_rng(seed)
    g = Builder(seed)
    x = g.input("x", ["N", 4, 6, 6])
    wa = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) / 6
    wb = rng.standard_normal((8, 4, 1, 1)).astype(np.float32) / 2
    s = g.node("Add", [g.conv_w(x, wa, None, name="conv_a"), g.conv_w(x, wb, None, name="conv_b", pad=0)])
    h = g.relu(s)
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    w2[:, 3] *= 1e-5
    left = g.conv_w(h, w2, None, name="conv_c", pad=0)
    dw = g.conv_w(h, rng.standard_normal((8, 1, 3, 3)).astype(np.float32), None, name="dw", group=8)
    w3 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    w3[:, 3] *= 1e-5
    right = g.conv_w(dw, w3, None, name="conv_d", pad=0)
    g.output(g.node("Concat", [left, right], axis=1))
    return g.model()


def test_coupled_channels_pruned_everywhere_at_once():
    """Residual Add, a depthwise conv on the path, two consumers feeding a Concat: the channel goes
    from both producers, the depthwise conv and both consumers; the rest computes as before."""
    model = residual_model()
    tol = 0.01
    result, report = red_onnx.compress(model, tolerance=tol, passes=["prune"])
    ch = out_channels(result)
    assert ch["conv_a"] == ch["conv_b"] == ch["dw"] <= 7, report.passes
    assert view_weight(result, "conv_c").shape[1] == view_weight(result, "conv_d").shape[1] == ch["conv_a"]
    assert report.output_deviation <= tol
    assert_same(model, result, rtol=tol)


def test_pruning_and_merging_share_one_budget():
    """With both passes, one sequence per space: the result keeps the tolerance and removes what
    either removes alone, at least."""
    model = tiny_chain()
    tol = 0.01
    _, alone = red_onnx.compress(model, tolerance=tol, passes=["prune"])
    result, both = red_onnx.compress(model, tolerance=tol, passes=["merge", "prune"])
    assert both.macs_after <= alone.macs_after and both.output_deviation <= tol
    merge_pass = next(p for p in both.passes if p["name"] == "merge")  # merge removes the pruned channels too
    assert merge_pass["channels_pruned"] + merge_pass["channels_merged"] >= 2
    row = next(r for r in both.layers if r["name"] == "conv1")
    assert row["merge"]["channels_after"] <= 6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 9), st.integers(0, 2**16), st.sampled_from(["Relu", "Sigmoid", "LeakyRelu"]),
       st.booleans(), st.sampled_from(["conv", "gemm"]))
def test_property_constant_channels_fold_exactly(c, seed, act, bn, consumer):
    """Random layers with random constant channels: exactly those go, outputs equal to rounding."""
    rng = np.random.default_rng(seed)
    constant = sorted(set(rng.integers(0, c, size=rng.integers(1, c + 1)).tolist()))
    g = Builder(seed)
    x = g.input("x", ["N", 3, 5, 5])
    w1 = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    w1[constant] = 0
    h = g.conv_w(x, w1, rng.standard_normal(c).astype(np.float32), name="conv1")
    if bn:
        h = g.bn(h, c)
    h = g.act(h, act)
    if consumer == "conv":
        g.output(g.conv_w(h, rng.standard_normal((3, c, 1, 1)).astype(np.float32), None, name="out", pad=0))
    else:
        flat = g.node("Flatten", [h], axis=1)
        g.output(g.gemm_w(flat, rng.standard_normal((3, c * 25)).astype(np.float32), None, name="out"))
    model = g.model()
    result, report = prune0(model)
    # constants that are 0 after the activation (ReLU of a negative bias, no BN) are dead: also removed
    assert out_channels(result)["conv1"] == max(c - len(constant), 1)
    assert_same(model, result)


# --------------------------------------------------------------------------------------------- #
# the latency guard over channel removals


def test_latency_guard_aligns_channel_counts(monkeypatch):
    """A result whose channel counts are not multiples of 8 'runs slower' (forced): the guard keeps
    them at multiples of 8, exactly (a kept duplicate or unread channel changes nothing)."""
    from red_onnx import verify

    model, _ = constant_chain(constant=(2, 5), c=16)

    def fake(a, b, feeds, **kw):
        conv1 = next(n for n in b.graph.node if n.name == "conv1")
        weight = next(t for t in b.graph.initializer if t.name == conv1.input[1])  # dims kept in a light model
        ratio = 1.0 if weight.dims[0] % 8 == 0 else 1.5
        return 1e-3, 1e-3 * ratio, ratio

    monkeypatch.setattr(verify, "latency_ratio", fake)
    result, report = red_onnx.compress(model, tolerance=0, passes=["prune"])
    assert out_channels(result)["conv1"] == 16
    assert report.latency["channel_align"] == 8 and report.latency["ratio"] == 1.0
    assert [f["fix"] for f in report.latency["fixes"]] == ["channel counts kept at multiples of 8"]
    row = next(r for r in report.layers if r["name"] == "conv1")
    assert row["prune"]["kept_for_alignment"] == 2
    assert_same(model, result)


@pytest.mark.aligned
def test_builds_keep_channel_counts_at_multiples_of_8_by_default(monkeypatch):
    """By default every build keeps multiples of 8 (exactly: a kept constant channel changes
    nothing); the guard finds nothing slower; without it, every constant channel goes. A result
    slower at 8 (forced: only multiples of 16 run fast) is rebuilt at 16."""
    from red_onnx import verify

    model, _ = constant_chain(constant=tuple(range(9)), c=16)
    result, report = red_onnx.compress(model, tolerance=0, passes=["prune"])
    assert out_channels(result)["conv1"] == 8 and not report.latency.get("fixes")
    row = next(r for r in report.layers if r["name"] == "conv1")
    assert row["prune"]["kept_for_alignment"] == 1
    assert_same(model, result)
    unaligned, _ = red_onnx.compress(model, tolerance=0, passes=["prune"], latency_check=False)
    assert out_channels(unaligned)["conv1"] == 7
    assert_same(model, unaligned)

    def fake(a, b, feeds, **kw):
        conv1 = next(n for n in b.graph.node if n.name == "conv1")
        weight = next(t for t in b.graph.initializer if t.name == conv1.input[1])
        ratio = 1.0 if weight.dims[0] % 16 == 0 else 1.5
        return 1e-3, 1e-3 * ratio, ratio

    monkeypatch.setattr(verify, "latency_ratio", fake)
    result, report = red_onnx.compress(model, tolerance=0, passes=["prune"])
    assert out_channels(result)["conv1"] == 16 and report.latency["channel_align"] == 16
    assert [f["fix"] for f in report.latency["fixes"]] == ["channel counts kept at multiples of 16"]
    assert_same(model, result)


def test_latency_guard_gives_up_channel_removals(monkeypatch):
    """Forced slower whatever the counts: multiples of 8, then of 16, then no channel removed."""
    from red_onnx import verify

    model, _ = constant_chain(constant=(2, 5), c=12)
    monkeypatch.setattr(verify, "latency_ratio", lambda a, b, feeds, **kw: (1e-3, 2e-3, 2.0))
    result, report = red_onnx.compress(model, tolerance=0, passes=["prune"])
    assert out_channels(result)["conv1"] == 12
    assert [f["fix"] for f in report.latency["fixes"]] == [
        "channel counts kept at multiples of 8", "channel counts kept at multiples of 16",
        "no channel removed (every channel space keeps its count)"]
    assert any("latency guard" in n for n in report.notes)
    _, off = red_onnx.compress(model, tolerance=0, passes=["prune"], latency_check=False)
    assert off.macs_after < report.macs_after and not off.latency


# --------------------------------------------------------------------------------------------- #
# an LSTM, GRU or RNN reading the channels (a CRNN's or a speech model's conv front end)

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def conv_rnn(op: str, w1: np.ndarray, b1: np.ndarray, bias: bool = True, seq: int = 7, hidden: int = 6,
             seed: int = 40) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv1d (3 → C channels) → ReLU → Transpose to (seq, N, C) → bidirectional ``op``: its X
    reads the conv's channels as features. Returns the model and the recurrent node's W, R, B."""
    rng = np.random.default_rng(seed)
    c, gates = w1.shape[0], GATES[op]
    g = Builder(seed)
    h = g.relu(g.node("Conv", [g.input("x", ["N", 3, seq]), g.init(w1), g.init(b1)], name="conv1",
                      kernel_shape=[3], pads=[1, 1]))
    xs = g.node("Transpose", [h], perm=[2, 0, 1])
    weights = {"W": rng.standard_normal((2, gates * hidden, c)).astype(np.float32) / np.sqrt(c),
               "R": rng.standard_normal((2, gates * hidden, hidden)).astype(np.float32) / np.sqrt(hidden)}
    inputs = [xs, g.init(weights["W"], "W"), g.init(weights["R"], "R")]
    if bias:
        weights["B"] = rng.standard_normal((2, 2 * gates * hidden)).astype(np.float32) * 0.3
        inputs.append(g.init(weights["B"], "B"))
    y = g.node(op, inputs, name="rnn", hidden_size=hidden, direction="bidirectional", n_outputs=1)
    g.output(y)
    return g.model(), weights


def conv1d_weights(seed: int, c: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((c, 3, 3)) / 3).astype(np.float32), (rng.standard_normal(c) * 0.5).astype(np.float32)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_channels_merge_into_a_recurrent_node_input(op):
    """Channels 5 = channel 1 and 7 = 2 × channel 2 (through ReLU) merge into the recurrent node's
    input columns, exactly (they stayed: the space was frozen at the recurrent node)."""
    w1, b1 = conv1d_weights(41)
    w1[5], b1[5] = w1[1], b1[1]
    w1[7], b1[7] = 2 * w1[2], 2 * b1[2]
    model, weights = conv_rnn(op, w1, b1)
    result, report = red_onnx.compress(model, tolerance=0, passes=["merge"])
    assert report.verified
    w = inits(result)[next(n for n in result.graph.node if n.name == "rnn").input[1]]
    assert w.shape == (2, GATES[op] * 6, 6)
    expected = np.delete(weights["W"], [5, 7], axis=2)  # numpy oracle: merged columns added to their partners
    expected[:, :, 1] += weights["W"][:, :, 5]
    expected[:, :, 2] += 2 * weights["W"][:, :, 7]
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    assert_same(model, result)


@pytest.mark.parametrize("bias", [True, False])
def test_a_constant_channel_folds_into_a_recurrent_nodes_input_bias(bias):
    """Channel 4 is ReLU(0.7) = 0.7 on every input: at tolerance 0 it goes, its contribution
    W[:, :, 4]·0.7 joins Wb, the input half of B (created where the node had none; Rb untouched)."""
    w1, b1 = conv1d_weights(42)
    w1[4], b1[4] = 0.0, 0.7
    model, weights = conv_rnn("GRU", w1, b1, bias=bias)
    result, report = prune0(model)
    rnn = next(n for n in result.graph.node if n.name == "rnn")
    values = inits(result)
    assert values[rnn.input[1]].shape == (2, 18, 7)
    b = weights.get("B", np.zeros((2, 36), np.float32))
    expected = b.copy()
    expected[:, :18] += weights["W"][:, :, 4] * np.float32(0.7)
    np.testing.assert_allclose(values[rnn.input[3]], expected, rtol=1e-5, atol=1e-6)
    assert_same(model, result)


def test_a_channel_the_recurrent_node_barely_feels_is_pruned_within_the_tolerance():
    """Channel 3's conv row is a ten-thousandth of the others: pruned to its mean at tolerance 0.01,
    within it on fresh inputs."""
    w1, b1 = conv1d_weights(43)
    w1[3] *= 1e-4
    b1[3] = 0.2
    model, _ = conv_rnn("LSTM", w1, b1)
    result, report = red_onnx.compress(model, tolerance=0.01, passes=["prune"])
    assert report.verified and report.output_deviation <= 0.01
    assert out_channels(result)["conv1"] < 8
    rng = np.random.default_rng(9)
    for _ in range(4):
        feeds = rng_feeds(model, rng, 2)
        assert rel_l2(session(model).run(None, feeds)[0], session(result).run(None, feeds)[0]) <= 0.01


# --------------------------------------------------------------------------------------------- #
# a weight several Gemms share (an RNN cell unrolled over the steps) reading the channels


def unrolled(w1: np.ndarray, b1: np.ndarray, bias: bool = True, stranger: bool = False, steps: int = 4,
             seed: int = 60) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray | None]:
    """Conv1d (N, 3, T) → ReLU → Transpose (T, N, C) → per step t a Gather and a Gemm, all with one
    weight (and bias): a cell unrolled as the captcha CRNN's LSTM is. ``stranger``: one more Gemm
    reads the weight, on another input. Returns the model, the shared weight and bias."""
    rng = np.random.default_rng(seed)
    c = w1.shape[0]
    g = Builder(seed)
    h = g.relu(g.node("Conv", [g.input("x", ["N", 3, steps]), g.init(w1), g.init(b1)], name="conv1",
                      kernel_shape=[3], pads=[1, 1]))
    seq = g.node("Transpose", [h], perm=[2, 0, 1])
    w = (rng.standard_normal((5, c)) / np.sqrt(c)).astype(np.float32)
    b = (rng.standard_normal(5) * 0.3).astype(np.float32) if bias else None
    cell = [g.init(w, "cell_w")] + ([g.init(b, "cell_b")] if bias else [])
    outs = [g.node("Gemm", [g.node("Gather", [seq, g.const(np.array(t), dtype=np.int64)], axis=0)] + cell,
                   name=f"cell_{t}", transB=1) for t in range(steps)]
    if stranger:
        outs.append(g.node("Gemm", [g.input("z", ["N", c])] + cell, name="stranger", transB=1))
    g.output(g.node("Concat", outs, axis=1))
    return g.model(), w, b


def test_channels_merge_into_a_weight_the_steps_share():
    """Merged channels' columns move onto their partners' once, in the one weight every step reads."""
    w1, b1 = conv1d_weights(61)
    w1[5], b1[5] = w1[1], b1[1]
    w1[7], b1[7] = 2 * w1[2], 2 * b1[2]
    model, w, _ = unrolled(w1, b1)
    result, report = red_onnx.compress(model, tolerance=0, passes=["merge"])
    assert report.verified
    cells = [n for n in result.graph.node if n.name.startswith("cell_")]
    assert len({n.input[1] for n in cells}) == 1  # still one weight
    expected = np.delete(w, [5, 7], axis=1)
    expected[:, 1] += w[:, 5]
    expected[:, 2] += 2 * w[:, 7]
    np.testing.assert_allclose(inits(result)[cells[0].input[1]], expected, rtol=1e-5, atol=1e-6)
    assert_same(model, result)


@pytest.mark.parametrize("bias", [True, False])
def test_a_constant_channel_folds_once_into_a_shared_bias(bias):
    """Channel 4 is ReLU(0.7): it goes, and W[:, 4]·0.7 joins the one bias all steps read (made for
    all of them where they had none)."""
    w1, b1 = conv1d_weights(62)
    w1[4], b1[4] = 0.0, 0.7
    model, w, b = unrolled(w1, b1, bias=bias)
    result, report = prune0(model)
    cells = [n for n in result.graph.node if n.name.startswith("cell_")]
    assert len({n.input[2] for n in cells}) == 1 and len(cells[0].input) == 3
    expected = (b if bias else np.zeros(5, np.float32)) + w[:, 4] * np.float32(0.7)
    np.testing.assert_allclose(inits(result)[cells[0].input[2]], expected, rtol=1e-5, atol=1e-6)
    assert inits(result)[cells[0].input[1]].shape == (5, 7)
    assert_same(model, result)


def test_a_shared_weight_that_another_tensor_also_reads_stays():
    """One more Gemm reads the weight on another input: its columns cannot follow the channels."""
    w1, b1 = conv1d_weights(63)
    w1[5], b1[5] = w1[1], b1[1]
    model, w, _ = unrolled(w1, b1, stranger=True)
    result, report = red_onnx.compress(model, tolerance=0, passes=["merge"])
    assert out_channels(result)["conv1"] == 8
    assert any("shared with nodes that read other tensors" in a["reason"] for a in report.left_alone), report.left_alone
    assert_same(model, result)
