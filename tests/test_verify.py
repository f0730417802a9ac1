"""The deviation (red_onnx.verify) and what compress measures it on."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import red_onnx
from red_onnx import verify
from red_onnx.errors import InputError, VerificationError
from red_onnx.passes import fold

from conftest import DIGITS_CNN, Builder, random_feeds
from graphs import rel_l2

inf, nan = float("inf"), float("nan")


# --------------------------------------------------------------------------------------------- #
# the definition


@pytest.mark.parametrize("shape, scale", [((3, 7), 1e-3), ((1, 40, 6625), 1e-6), ((1, 40, 6625), 1e-2)])
def test_relative_l2_agrees_with_float64(shape, scale):
    """float32 tensors are compared with float32 norms: within 1e-6 of the float64 value, down to
    deviations at float rounding (1e-6) on large tensors."""
    rng = np.random.default_rng(0)
    y = (100 * rng.standard_normal(shape)).astype(np.float32)
    y2 = (y * (1 + scale * rng.standard_normal(shape))).astype(np.float32)
    expected = np.linalg.norm(y2.astype(np.float64) - y) / np.linalg.norm(y.astype(np.float64))
    assert verify.sample_deviation(y, y2) == pytest.approx(expected, rel=1e-6)
    assert verify.sample_deviation(y.astype(np.float64), y2) == pytest.approx(expected, rel=1e-12)
    assert verify.sample_deviation(y, y) == 0.0


def test_float32_values_do_not_overflow():
    y = np.full(16, 1e20, np.float32)  # ||y||² = 1.6e41 overflows float32
    y2 = (y * np.float32(1.001)).astype(np.float32)
    assert verify.sample_deviation(y, y2) == pytest.approx(1e-3, rel=1e-3)


def test_float64_values_do_not_overflow():
    """||y||² overflows float64 here; the definition still gives 1 (a 100% error), never NaN or 0."""
    y = np.array([1e200, 0.0])
    y2 = np.array([2e200, 0.0])
    assert verify.sample_deviation(y, y2) == pytest.approx(1.0, rel=1e-6)
    dev, per_output = verify.deviation([[y]], [[y2]])
    assert dev == pytest.approx(1.0, rel=1e-6) and per_output == [pytest.approx(1.0, rel=1e-6)]


def test_zero_reference_gives_absolute_norm():
    y = np.zeros(5, np.float32)
    assert verify.sample_deviation(y, np.array([0, 3, 4, 0, 0], np.float32)) == pytest.approx(5.0)
    assert verify.sample_deviation(y, y.copy()) == 0.0


def test_same_non_finite_entries_are_ignored():
    y = np.array([1.0, inf, -inf, nan, 2.0], np.float32)
    y2 = np.array([1.5, inf, -inf, nan, 2.0], np.float32)
    assert verify.sample_deviation(y, y2) == pytest.approx(0.5 / math.sqrt(5.0))
    everywhere = np.array([inf, nan, -inf])
    assert verify.sample_deviation(everywhere, everywhere.copy()) == 0.0


@pytest.mark.parametrize("ref, res", [
    ([1.0, inf], [1.0, -inf]),
    ([1.0, nan], [1.0, 1.0]),
    ([1.0, 1.0], [1.0, nan]),
    ([1.0, 2.0], [1.0, inf]),
    ([1.0, inf], [1.0, nan]),
    ([0.0, 0.0], [0.0, -inf]),
])
def test_other_non_finite_entries_give_infinity(ref, res):
    assert verify.sample_deviation(np.array(ref, np.float32), np.array(res, np.float32)) == inf


def test_shape_mismatch_is_infinite():
    assert verify.sample_deviation(np.zeros((2, 3)), np.zeros((3, 2))) == inf


def test_integer_and_boolean_tensors_deviate_by_the_share_of_entries_that_differ():
    """Labels have no scale: 3 → 5 is no larger a change than 3 → 4, and a label map of class 0
    has no norm to be relative to (it read 1 for one pixel of 36 flipped to 1)."""
    labels = np.array([[3, 1, 4, 1]], np.int64)
    assert verify.sample_deviation(labels, np.array([[3, 1, 5, 1]], np.int64)) == 0.25
    assert verify.sample_deviation(labels, np.array([[3, 1, 9, 2]], np.int64)) == 0.5
    background = np.zeros((6, 6), np.int64)
    flipped = background.copy()
    flipped[2, 3] = 1
    assert verify.sample_deviation(background, flipped) == pytest.approx(1 / 36)
    mask = np.array([True, False, True, True])
    assert verify.sample_deviation(mask, ~mask) == 1.0 and verify.sample_deviation(mask, mask) == 0.0
    assert verify.sample_deviation(labels.astype(np.uint8), labels.astype(np.uint8)) == 0.0
    assert verify.sample_deviation(labels, labels.T) == inf
    assert verify.sample_deviation(np.zeros(0, np.int32), np.zeros(0, np.int32)) == 0.0


def test_deviation_is_the_max_over_samples_per_output():
    a = np.array([1.0, 0.0])
    refs = [[a, a], [a, a], [a, a]]
    results = [[a * 1.1, a], [a * 1.3, a * 1.2], [a, a * 0.9]]
    dev, per_output = verify.deviation(refs, results)
    assert per_output == [pytest.approx(0.3), pytest.approx(0.2)]
    assert dev == pytest.approx(0.3)
    assert verify.deviation([], []) == (0.0, [])
    dev, per_output = verify.deviation([[a], [a]], [[a], [np.array([1.0, inf])]])
    assert dev == inf and per_output == [inf]


# --------------------------------------------------------------------------------------------- #
# sessions


def test_session_has_optimizations_off_and_returns_intermediates():
    b = Builder(seed=1)
    x = b.input("x", ["N", 5])
    h = b.gemm(x, 5, 4)
    y = b.relu(h)
    b.output(y, ["N", 4])
    model = b.model()
    sess = verify.session(model, [h, y])
    assert sess.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = random_feeds(model, np.random.default_rng(0))
    pre, post = sess.run(None, feeds)
    np.testing.assert_array_equal(np.maximum(pre, 0), post)
    assert verify.session(model, None, optimize=True).get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_input_session_reports_unloadable_model_as_input_error():
    b = Builder(seed=2)
    x = b.input("x", ["N", 3])
    b.output(b.node("MyOp", [x], domain="com.example"), ["N", 3])
    model = b.model(extra_opsets=[("com.example", 1)])
    with pytest.raises(InputError, match="onnxruntime"):
        verify.input_session(model)


# --------------------------------------------------------------------------------------------- #
# what is measured: the logits of a squashed linear output


def squashed(op: str = "Softmax", kind: str = "gemm") -> tuple[Builder, onnx.ModelProto, str]:
    b = Builder(seed=3)
    x = b.input("x", ["N", 6])
    if kind == "gemm":
        logits = b.gemm(x, 6, 4, name="fc")
    elif kind == "matmul_add":
        logits = b.matmul(x, 6, 4, bias=True)
    elif kind == "relu":
        logits = b.relu(b.gemm(x, 6, 4, name="fc"))
    else:
        logits = x
    y = b.node(op, [logits])
    b.output(y, ["N", 4 if kind != "input" else 6])
    return b, b.model(), logits


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Sigmoid"])
@pytest.mark.parametrize("kind", ["gemm", "matmul_add", "relu", "input"])
def test_squashed_output_is_measured_on_its_logits_and_itself(op, kind):
    _, model, logits = squashed(op, kind)
    out = model.graph.output[0].name
    (plan,) = verify.measure_plan(model)
    assert plan.output == out and plan.tensors == (out, logits)
    assert plan.what[1].startswith(f"logits before {op}") and plan.what[0].startswith(f"{op} ")
    assert verify.measured_tensors(model) == ([out, logits], [out, out])


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin", "TopK"])
def test_picked_output_is_measured_on_its_scores_and_itself(op):
    b = Builder(seed=3)
    x = b.input("x", ["N", 6])
    scores = b.gemm(x, 6, 4, name="fc")
    if op == "TopK":
        _, picked = b.node("TopK", [scores, b.init(np.array([2]), dtype=np.int64)], outputs=["values", "labels"])
        b.output(picked, ["N", 2], onnx.TensorProto.INT64)
    else:
        picked = b.node(op, [scores], outputs=["labels"], axis=1, keepdims=0)
        b.output(picked, ["N"], onnx.TensorProto.INT64)
    (plan,) = verify.measure_plan(b.model())
    assert plan.tensors == ("labels", scores) and plan.what[1].startswith(f"scores before {op}")


def zipmap_classifier() -> onnx.ModelProto:
    """A classifier as skl2onnx writes one: its label (ArgMax) and its probabilities as a
    sequence of maps (ZipMap, domain ai.onnx.ml), which onnxruntime returns as a list of dicts."""
    b = Builder(seed=9)
    x = b.input("x", ["N", 16])
    probs = b.node("Softmax", [b.matmul(b.relu(b.matmul(x, 16, 64)), 64, 3)], outputs=["probs"], axis=1)
    b.output(b.node("ArgMax", [probs], outputs=["label"], axis=1, keepdims=0), ["N"], onnx.TensorProto.INT64)
    b.node("ZipMap", [probs], outputs=["prob_map"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])
    sequence = onnx.helper.make_sequence_type_proto(onnx.helper.make_map_type_proto(
        onnx.TensorProto.INT64, onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])))
    b.outputs.append(onnx.helper.make_value_info("prob_map", sequence))
    return b.model(extra_opsets=[("ai.onnx.ml", 1)])


def test_a_sequence_output_is_measured_on_the_tensors_it_is_made_of():
    """ZipMap's probabilities (a list of dicts from onnxruntime) are measured on the Softmax that
    feeds it and its logits; before, the reference run failed on it and the model was refused
    as one onnxruntime could not run ('list' object has no attribute 'ndim')."""
    model = zipmap_classifier()
    label, prob_map = verify.measure_plan(model)
    assert prob_map.tensors == ("probs", label.tensors[2]) and prob_map.what[0].startswith("Softmax")
    assert label.tensors[:2] == ("label", "probs")
    result, report = red_onnx.compress(model, tolerance=0.1)
    assert report.verified and set(report.deviation_per_output) == {"label", "prob_map"}
    assert report.output_deviation <= 0.1
    assert [n.domain for n in result.graph.node if n.op_type == "ZipMap"] == ["ai.onnx.ml"]
    constant = zipmap_classifier()  # a sequence made of constants only: nothing to measure, refused
    constant.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, 3), np.float32), "ones"))
    constant.graph.node[-1].input[0] = "ones"
    with pytest.raises(InputError, match="'prob_map' is not a tensor"):
        verify.measure_plan(constant)


def test_a_label_output_is_verified_on_its_scores(monkeypatch):
    """A segmenter whose only output is the ArgMax of its class scores: the scores are measured
    too, so a rewrite that moves them all (here by half: no label flips) is refused at tolerance
    0, where on the labels alone it read 0."""
    b = Builder(seed=8)
    x = b.input("x", ["N", 3, 6, 6])
    scores = b.conv(b.relu(b.conv(x, 3, 8)), 8, 4, name="head")
    b.output(b.node("ArgMax", [scores], outputs=["labels"], axis=1, keepdims=0), ["N", 6, 6],
             onnx.TensorProto.INT64)
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0.05)
    assert report.verified and report.output_deviation <= 0.05
    assert list(report.measured["labels"]["tensors"]) == ["labels", scores]
    damage_after_fold(monkeypatch, lambda node: node.name == "head", 1.5)
    with pytest.raises(VerificationError):
        red_onnx.compress(model, tolerance=0, passes=[])


def test_measured_tensors_per_output():
    b = Builder(seed=4)
    x = b.input("x", ["N", 3, 4, 4])
    c = b.conv(x, 3, 2)
    b.output(b.node("Sigmoid", [c]), ["N", 2, 4, 4])
    b.output(b.relu(c), ["N", 2, 4, 4])
    model = b.model()
    sig, relu = (o.name for o in model.graph.output)
    assert verify.measured_tensors(model) == ([sig, c, relu], [sig, sig, relu])
    assert verify.measure_plan(model)[1].label == "the output itself"


def damage_after_fold(monkeypatch, matches, factor: float) -> None:
    """A pass gone wrong: fold, then the weight of every node ``matches`` accepts scaled by ``factor``."""
    original_run = fold.run

    def damaging_run(ctx):
        result = original_run(ctx)
        for node in ctx.graph.nodes:
            if matches(node):
                node.inputs[1].values = node.inputs[1].values * np.float32(factor)
        return result

    monkeypatch.setattr(fold, "run", damaging_run)


def saturated_classifier() -> tuple[Builder, onnx.ModelProto, str, str]:
    """Softmax of a Gemm whose first logit is 200 above the others: the probabilities are one-hot in float32."""
    b = Builder(seed=5)
    x = b.input("x", ["N", 6])
    w = b.init(b.weight((4, 6)), name="fc_w")
    bias = b.init(np.array([200.0, 0.0, 0.0, 0.0]), name="fc_b")
    logits = b.node("Gemm", [x, w, bias], name="fc", transB=1)
    probs = b.node("Softmax", [logits], outputs=["probs"], axis=1)
    b.output(probs, ["N", 4])
    return b, b.model(), logits, probs


def perturbed(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name == "fc_w":
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 2.0, "fc_w"))
    return copy


def test_saturated_softmax_deviation_measured_on_logits():
    _, model, logits, probs = saturated_classifier()
    other = perturbed(model)
    rng = np.random.default_rng(6)
    probes = [random_feeds(model, rng, batch=4) for _ in range(6)]

    # the probabilities do not see the change ...
    on_probs, _ = verify.deviation(verify.run(verify.session(model), probes), verify.run(verify.session(other), probes))
    assert on_probs < 1e-6
    # ... the logits do, and they are what is measured
    measured, _ = verify.measured_tensors(model)
    assert measured == [probs, logits]
    on_logits, per_output = verify.deviation(verify.run(verify.session(model, measured), probes),
                                             verify.run(verify.session(other, measured), probes))
    assert on_logits > 1e-3
    assert per_output[0] < 1e-6 and per_output[1] == on_logits


def test_compress_verifies_on_logits(monkeypatch):
    """A pass that damages the logits of a saturated classifier must fail verification."""
    _, model, _, _ = saturated_classifier()
    result, report = red_onnx.compress(model, tolerance=0, passes=[])
    assert report.verified and report.output_deviation <= 1e-5
    assert list(report.deviation_per_output) == ["probs"]

    damage_after_fold(monkeypatch, lambda node: node.op == "Gemm", 2.0)
    with pytest.raises(VerificationError):
        red_onnx.compress(model, tolerance=0, passes=[])


def test_compress_reports_deviation_per_graph_output():
    b = Builder(seed=7)
    x = b.input("x", ["N", 3, 4, 4])
    c = b.bn(b.conv(x, 3, 2), 2)
    b.output(b.node("Sigmoid", [b.conv(c, 2, 2, name="head")], outputs=["scores"]), ["N", 2, 4, 4])
    b.output(b.relu(c), ["N", 2, 4, 4])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0)
    assert list(report.deviation_per_output) == [o.name for o in model.graph.output]
    assert all(0 <= d <= 1e-5 for d in report.deviation_per_output.values())
    assert report.output_deviation == max(report.deviation_per_output.values())


def test_latency_one_session_at_a_time_agrees():
    """The path for models over 2 GB (each model timed alone) measures the same thing. Timed one
    after the other, the two models must not share the cores with the kernels an earlier test's
    lossy call started loading in a thread (which a tiny model's call can outlast)."""
    import threading

    from red_onnx import verify

    for thread in threading.enumerate():
        if thread.name == "red_onnx kernels":
            thread.join()
    model = onnx.load(str(DIGITS_CNN))
    feeds = {model.graph.input[0].name: np.zeros((1, 1, 8, 8), np.float32)}
    t_a, t_b, ratio = verify.latency_ratio(model, model, feeds, pairs=20, one_at_a_time=True)
    assert t_a > 0 and t_b > 0 and 0.5 < ratio < 2.0


def test_the_input_runs_as_written_where_the_optimizer_fails(monkeypatch):
    """The input's session is optimized like the result's verification session; where
    onnxruntime's optimizer fails on it, the plain session runs it."""
    real = verify.session
    asked = []

    def no_optimizer(model, outputs=None, optimize=False, **kwargs):
        asked.append(optimize)
        if optimize:
            raise RuntimeError("optimizer failed")
        return real(model, outputs, optimize=optimize, **kwargs)

    model = onnx.load(str(DIGITS_CNN))
    monkeypatch.setattr(verify, "session", no_optimizer)
    sess = verify.input_session(model)
    assert asked == [verify.VERIFY_OPTIMIZATION, False]
    feeds = {model.graph.input[0].name: np.zeros((1, 1, 8, 8), np.float32)}
    assert sess.run(None, feeds)[0].shape == (1, 10)


def test_latency_stops_once_every_pair_is_on_one_side(monkeypatch):
    """With ``decide_at``, a timing stops after MIN_PAIRS pairs all faster (or all slower) than it,
    after FAR_PAIRS all beyond it by a factor FAR, once the pairs took DECIDE_SECONDS; pairs on
    both sides go on to the pairs asked for."""
    from red_onnx import verify

    model = onnx.load(str(DIGITS_CNN))
    feeds = {model.graph.input[0].name: np.zeros((1, 1, 8, 8), np.float32)}
    clock = itertools.count()  # every timed run takes one tick: each ratio is exactly 1
    monkeypatch.setattr(verify.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(verify, "_repeats", lambda sess, feeds: (1, 1e-3))
    _, _, ratio = verify.latency_ratio(model, model, feeds, pairs=30, decide_at=1.1)
    assert ratio == 1.0 and next(clock) == 2 * 2 * verify.MIN_PAIRS  # a start and a stop per model and pair
    clock = itertools.count()
    verify.latency_ratio(model, model, feeds, pairs=30, decide_at=0.95)
    assert next(clock) == 2 * 2 * verify.MIN_PAIRS
    for far in (verify.FAR * 1.01, 1 / (verify.FAR * 1.01)):  # ratios of 1 are far from these
        clock = itertools.count()
        verify.latency_ratio(model, model, feeds, pairs=30, decide_at=far)
        assert next(clock) == 2 * 2 * verify.FAR_PAIRS
    clock = itertools.count()
    verify.latency_ratio(model, model, feeds, pairs=30, decide_at=1.0)  # never all on one side
    assert next(clock) == 2 * 2 * 30
    clock = itertools.count()
    monkeypatch.setattr(verify, "DECIDE_SECONDS", 17)  # 2 ticks a pair: 8 pairs are too short, 9 are not
    verify.latency_ratio(model, model, feeds, pairs=30, decide_at=1.1)
    assert next(clock) == 2 * 2 * 9


def test_latency_sign_test_tolerates_outliers(monkeypatch):
    """A pair on the other side of ``decide_at`` (a busy moment) does not cost every pair: the
    timing stops once the sign test decides (1 of 11, 2 of 14 pairs against), not before."""
    from red_onnx import verify

    assert verify._one_side(np.full(7, 0.9), 1.0) and not verify._one_side(np.full(6, 0.9), 1.0)
    assert verify._one_side(np.r_[np.full(10, 0.9), 1.2], 1.0)
    assert not verify._one_side(np.r_[np.full(9, 0.9), 1.2], 1.0)
    assert verify._one_side(np.r_[np.full(12, 1.1), 0.9, 1.0], 1.0)  # a tie counts against
    assert not verify._one_side(np.r_[np.full(11, 1.1), 0.9, 1.0], 1.0)
    model = onnx.load(str(DIGITS_CNN))
    feeds = {model.graph.input[0].name: np.zeros((1, 1, 8, 8), np.float32)}
    lengths = [1, 1] * 3 + [1, 3] + [1, 1] * 40  # per timed run (a, b, a, b, ...): the fourth pair's b is slow
    calls = []

    def clock():  # a start and a stop per timed run, each run as long as ``lengths`` says
        calls.append(None)
        return sum(lengths[:len(calls) // 2])

    monkeypatch.setattr(verify.time, "perf_counter", clock)
    monkeypatch.setattr(verify, "_repeats", lambda sess, feeds: (1, 1e-3))
    _, _, ratio = verify.latency_ratio(model, model, feeds, pairs=30, decide_at=1.1)
    assert ratio == 1.0 and len(calls) == 2 * 2 * 11  # 10 pairs at 1 and one at 3: decided after 11, not 30


def test_in_place_weights_path_agrees(monkeypatch):
    """The session path of models over IN_PLACE_BYTES (weights as external initializers, read from
    the graph's arrays) chooses and verifies exactly what the serialized path does."""
    import red_onnx
    from red_onnx import verify

    model = onnx.load("models/digits_resnet.onnx")
    kwargs = dict(tolerance=0.05, probe_ranges={"input": (0.0, 1.0)})
    plain, plain_report = red_onnx.compress(model, **kwargs)
    monkeypatch.setattr(verify, "IN_PLACE_BYTES", 0)
    in_place, report = red_onnx.compress(model, **kwargs)
    assert report.verified and plain_report.verified
    assert in_place.SerializeToString() == plain.SerializeToString()


# --------------------------------------------------------------------------------------------- #
# a detector-style output: box coordinates concatenated with sigmoid scores


def detector(seed: int = 11) -> onnx.ModelProto:
    """Boxes (hundreds of pixels) and sigmoid class scores (0..1) from one feature map, reshaped,
    transposed and concatenated into one output [N, anchors, 4 + classes], as YOLOv8 exports do."""
    b = Builder(seed=seed)
    x = b.input("x", ["N", 3, 4, 4])
    feat = b.relu(b.conv(x, 3, 8, name="stem"))
    box = b.conv(feat, 8, 4, k=1, name="box_head")
    box = b.node("Mul", [box, b.init(np.array(300.0, np.float32), name="stride")])
    cls_logits = b.conv(feat, 8, 3, k=1, name="cls_head")
    cls = b.node("Sigmoid", [cls_logits], name="cls_sigmoid")
    shape = b.init(np.array([0, -1, 16]), name="to_rows", dtype=np.int64)
    parts = [b.node("Reshape", [t, shape]) for t in (box, cls)]
    cat = b.node("Concat", parts, name="detections_concat", axis=1)
    b.node("Transpose", [cat], outputs=["detections"], perm=[0, 2, 1])
    b.output("detections", ["N", 16, 7])
    return b.model()


def test_concat_parts_are_measured_each():
    model = detector()
    (plan,) = verify.measure_plan(model)
    assert len(plan.tensors) == 3
    assert "box_head" not in plan.label  # named by the Concat and the Sigmoid
    assert "1/2 of Concat 'detections_concat'" in plan.what[0]
    assert plan.what[1].startswith("Sigmoid 'cls_sigmoid' output (part 2/2 of Concat 'detections_concat')")
    assert plan.what[2].startswith("logits before Sigmoid 'cls_sigmoid'")


def _damage_scores(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.name == "cls_head":
            for t in copy.graph.initializer:
                if t.name == node.input[1]:
                    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(factor), t.name))
    return copy


def test_damage_confined_to_the_score_branch_is_caught():
    """Whole-output relative L2 lets a large change of the scores through (the boxes dominate the
    norm); the per-part measure sees it."""
    model = detector()
    damaged = _damage_scores(model, 1.5)
    rng = np.random.default_rng(12)
    probes = [random_feeds(model, rng, batch=1) for _ in range(8)]
    whole, _ = verify.deviation(verify.run(verify.session(model), probes), verify.run(verify.session(damaged), probes))
    measured, _ = verify.measured_tensors(model)
    parts, _ = verify.deviation(verify.run(verify.session(model, measured), probes),
                                verify.run(verify.session(damaged, measured), probes))
    assert whole < 0.003 < 0.1 < parts


def test_compress_fails_a_pass_that_damages_only_the_scores(monkeypatch):
    model = detector()
    result, report = red_onnx.compress(model, tolerance=0.003, passes=[])
    assert report.measured["detections"]["label"].startswith("max over 3:")
    assert set(report.measured["detections"]["tensors"]) == set(verify.measured_tensors(model)[0])
    damage_after_fold(monkeypatch, lambda node: node.name == "cls_head", 1.05)
    with pytest.raises(VerificationError):
        red_onnx.compress(model, tolerance=0.003, passes=[])


def test_report_states_the_promise_of_its_probes():
    model = detector()
    _, report = red_onnx.compress(model, tolerance=0.01, check=40, passes=[])
    v = report.verification
    assert v["probes"] == 40 and v["max"] == report.output_deviation and 0 <= v["p95"] <= v["max"]
    assert "on 40 fresh probes" in v["promise"] and "below 7.5%" in v["promise"]
    assert "95th percentile, on 40 fresh probes" in report.table()


def test_library_and_cli_share_the_default_tolerance():
    import inspect

    from red_onnx import budget, cli

    default = inspect.signature(red_onnx.compress).parameters["tolerance"].default
    assert default == budget.DEFAULT_TOLERANCE == cli.DEFAULT_TOLERANCE > 0
    assert cli.build_parser().get_default("tolerance") is None  # not given: DEFAULT_TOLERANCE (or a --metric search)
    assert inspect.signature(red_onnx.compress_each).parameters["tolerances"].default == (default,)
    assert inspect.signature(red_onnx.compress).parameters["check"].default == cli.build_parser().get_default("check")


def test_logits_renamed_by_the_rewrite_are_still_measured(monkeypatch):
    """fold removes an Identity between the logits and the Softmax (PP-OCR's export has one): the
    result's own logits are paired with the input's, so damage the saturated probabilities hide
    still fails verification."""
    b = Builder(seed=5)
    x = b.input("x", ["N", 6])
    w = b.init(b.weight((4, 6)), name="fc_w")
    bias = b.init(np.array([200.0, 0.0, 0.0, 0.0]), name="fc_b")
    logits = b.node("Identity", [b.node("Gemm", [x, w, bias], name="fc", transB=1)], outputs=["logits"])
    b.output(b.node("Softmax", [logits], outputs=["probs"], axis=1), ["N", 4])
    model = b.model()
    assert verify.measured_tensors(model)[0] == ["probs", "logits"]
    _, report = red_onnx.compress(model, tolerance=0, passes=[])
    assert set(report.measured["probs"]["tensors"]) == {"probs", "logits"}
    assert "lost" not in report.measured["probs"]["label"]

    damage_after_fold(monkeypatch, lambda node: node.op == "Gemm", 2.0)
    with pytest.raises(VerificationError):
        red_onnx.compress(model, tolerance=0, passes=[])


def test_exact_rewrites_are_judged_against_the_typical_output_norm():
    """Float rounding of an exact rewrite, 3e-7 absolute, is 1.7e-5 relative on a probe whose
    output nearly cancels (norm 0.02 against a median of 0.86; hypothesis found one in 64 fresh
    probes): the exact check scales by max(||y||, median ||y||); the lossy check does not."""
    d = np.array([[1e-6], [1.7e-5], [2e-6]])
    norms = np.array([[0.86], [0.02], [0.9]])
    checked = verify.Verification(d, ["y"], ["y"], norms)
    assert checked.max == 1.7e-5
    assert checked.rounding_max() == pytest.approx(max(2e-6, 1.7e-5 * 0.02 / 0.86))
    # a probe at the typical norm keeps its plain ratio
    assert verify.Verification(np.array([[3e-5], [1e-6]]), ["y"], ["y"], np.array([[1.0], [1.0]])).rounding_max() == 3e-5


def rounding_amplifier() -> onnx.ModelProto:
    """conv1 (tiny weights, bias 30: each channel nearly constant) → BatchNormalization →
    InstanceNormalization (divides by that tiny spread) → conv2: float rounding of conv1's output
    (1e-7 of 30) comes out at 1e-4 of the output. Folding the BN into conv1 moves it by that much,
    as onnxruntime's optimizer (which folds it too) does."""
    rng = np.random.default_rng(0)
    b = Builder(0)
    h = b.conv_w(b.input("x", ["N", 3, 8, 8]), (rng.standard_normal((6, 3, 3, 3)) * 1e-3).astype(np.float32),
                 np.full(6, 30.0, np.float32), name="conv1")
    h = b.node("InstanceNormalization", [b.bn(h, 6), b.const(np.ones(6)), b.const(np.zeros(6))], epsilon=1e-12)
    b.output(b.conv_w(h, rng.standard_normal((4, 6, 3, 3)).astype(np.float32), None, name="conv2"))
    return b.model()


def test_exact_rewrites_of_a_model_that_amplifies_rounding():
    """Over float rounding's 1e-5, exact rewrites are accepted within OWN_ROUNDING_FACTOR times the
    input's own deviation between onnxruntime's plain and optimized sessions, said in a note and in
    the promise (this model made tolerance 0 fail as 'a bug' before)."""
    model = rounding_amplifier()
    plain = verify.session(model, optimize=False)
    optimized = verify.session(model, optimize=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    own = rel_l2(optimized.run(None, feeds)[0], plain.run(None, feeds)[0])
    assert own > 1e-5  # the model itself: onnxruntime's two sessions differ by more than 1e-5
    result, report = red_onnx.compress(model, tolerance=0)
    assert report.verified and 1e-5 < report.output_deviation
    (note,) = [n for n in report.notes if n.startswith("the exact rewrites deviate")]
    bound = float(report.verification["promise"].split("float rounding (")[1].split(" ")[0])
    assert report.output_deviation <= bound < 0.01, (note, bound)
    assert rel_l2(optimized.run(None, feeds)[0], verify.session(result, optimize=True).run(None, feeds)[0]) <= 3 * own


def test_a_wrong_rewrite_of_a_model_that_amplifies_rounding_is_still_refused(monkeypatch):
    """The allowance is the input's own rounding, not the rewrite's: a fold that scales conv2's
    weight by 1.01 still fails verification (the bound here is 0.0016)."""
    damage_after_fold(monkeypatch, lambda node: node.name == "conv2", 1.01)
    with pytest.raises(VerificationError):
        red_onnx.compress(rounding_amplifier(), tolerance=0, passes=[])
