"""The pipeline's stages: builds, back-off and what a rebuild starts from."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import red_onnx
from red_onnx import pipeline
from red_onnx.errors import InputError

from conftest import Builder


def concat_with_duplicates() -> onnx.ModelProto:
    """conv A (channels 2, 3 duplicate 0, 1 exactly, channels 4, 5 nearly) → Relu → Concat with
    conv B → conv C → output: A's merges move the Concat's offsets, and the analysis of every
    build must start from the input model's widths."""
    b = Builder(seed=21)
    x = b.input("x", ["N", 3, 6, 6])
    w = b.weight((6, 3, 3, 3))
    w[2:4] = w[:2]
    w[4:6] = w[:2] * (1 + 1e-4 * b.rng.standard_normal((2, 3, 3, 3)))
    bias = b.rng.standard_normal(6).astype(np.float32)
    bias[2:6] = np.tile(bias[:2], 2)
    a = b.relu(b.node("Conv", [x, b.init(w), b.init(bias)], name="conv_a", kernel_shape=[3, 3], pads=[1] * 4))
    c2 = b.relu(b.conv(x, 3, 5, name="conv_b"))
    cat = b.node("Concat", [a, c2], name="cat", axis=1)
    b.output(b.conv(cat, 11, 4, name="conv_c"), ["N", 4, 6, 6])
    return b.model()


def _merged(report) -> int:
    return sum(p.get("channels_merged", 0) for p in report.passes if p["name"] == "merge")


def test_a_rebuild_merges_what_the_first_build_merged(monkeypatch):
    """A back-off rebuilds from the input model's shapes, not from the previous build's merged
    widths (which froze every space past the Concat and lost the merges)."""
    model = concat_with_duplicates()
    _, plain = red_onnx.compress(model, tolerance=0.01, passes=["merge"])
    assert _merged(plain) == 4 and not any("backed off" in n for n in plain.notes)

    real_verify, calls = pipeline._verify, []

    def fail_first(*args, **kwargs):
        checked = real_verify(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # as if the first build had overshot on its fresh probes
            checked.per_sample = checked.per_sample + 1.0
        return checked

    monkeypatch.setattr(pipeline, "_verify", fail_first)
    lines = []
    result, report = red_onnx.compress(model, tolerance=0.01, passes=["merge"], log=lines.append)
    assert len(calls) == 2 and any("backed off" in n for n in report.notes)
    assert _merged(report) == 4
    assert report.params_after == plain.params_after
    # each build says which attempt it is, at what fraction of the tolerance, and why it backed off
    builds = [line for line in lines if line.startswith("build ")]
    assert builds[0] == "build 1 of at most 5: lossy edits up to 0.8x the tolerance"
    assert builds[1].startswith("build 1: lossy edits chosen at 0.8x the tolerance deviated")
    assert "worst probe(s) added to the allocation probes and new fresh probes" in builds[1]
    assert builds[2] == "build 2 of at most 5: lossy edits up to 0.72x the tolerance"


def test_a_long_budget_search_says_where_it_is(monkeypatch):
    from red_onnx import context

    monkeypatch.setattr(context, "PROGRESS_SECONDS", 0.0)
    lines = []
    red_onnx.compress(concat_with_duplicates(), tolerance=0.01, passes=["merge"], log=lines.append)
    assert any(line.startswith("  budget: ") and "measurements of" in line for line in lines)


def test_the_schedule_is_what_passes_selects():
    from red_onnx.passes import PLANNED, SCHEDULE

    from red_onnx.defaults import PASS_NAMES

    assert PLANNED == PASS_NAMES == ("merge", "prune", "separate", "hash")  # --help lists PASS_NAMES without importing passes
    assert [s.name for s in SCHEDULE if s.wanted(["merge"])] == ["fold", "merge", "codebook"]
    assert [s.name for s in SCHEDULE if s.wanted(PLANNED)] == [
        "fold", "merge", "prune", "separate", "hash", "merge_after_hash", "separate_after_hash", "codebook"]
    _, report = red_onnx.compress(concat_with_duplicates(), tolerance=0, passes=["merge", "hash"])
    assert [p["name"] for p in report.passes] == ["fold", "merge", "hash", "merge_after_hash", "codebook"]


def test_long_loops_inside_passes_say_where_they_are(monkeypatch):
    from red_onnx import context

    from conftest import REPO

    monkeypatch.setattr(context, "PROGRESS_SECONDS", 0.0)
    lines = []
    red_onnx.compress(str(REPO / "models" / "digits_resnet.onnx"), tolerance=0.01, log=lines.append)
    said = {line.split(":")[0].strip() for line in lines if line.startswith("  ") and " of " in line}
    assert {"exact merges, channel spaces", "exact separations, convs", "bandwidth searches, layers"} <= said


# --------------------------------------------------------------------------------------------- #
# channel removals against the separations after them


def _removal_spends(monkeypatch) -> list[tuple[float, float | None, float | None]]:
    """Record, per build: its removal share, and what its merge and separate spends reached."""
    real, seen = pipeline.build, []

    def recording(*args, **kwargs):
        built = real(*args, **kwargs)
        counts = {r.name: r.counts for r in built.results} if built is not None else {}
        seen.append((kwargs.get("removal_share", 1.0), counts.get("merge", {}).get("deviation_allocated"),
                     counts.get("separate", {}).get("deviation_allocated")))
        return built

    monkeypatch.setattr(pipeline, "build", recording)
    return seen


def test_removals_stopped_at_a_share_leave_the_rest_to_separations(monkeypatch):
    """Where the removals spend over REMOVAL_SHARE of the squared target and a separation spend
    follows, a second build stops them there (their spend stays within share^½ × target); it is
    kept only if it saves more, and it is verified like any build."""
    model = onnx.load("models/digits_resnet.onnx")
    seen = _removal_spends(monkeypatch)
    monkeypatch.setattr(pipeline, "REMOVAL_SHARE", 0.1)
    monkeypatch.setattr(pipeline, "REMOVAL_GAIN", -1.0)  # build the second to its end
    lines = []
    result, report = red_onnx.compress(model, tolerance=1.0, probe_ranges={"input": (0.0, 1.0)}, log=lines.append)
    target = pipeline.FIRST_MARGIN * 1.0
    (share1, merge1, separate1), (share2, merge2, separate2) = seen[:2]
    assert share1 == 1.0 and merge1 ** 2 > 0.1 * target ** 2 and separate1 is not None
    assert share2 == 0.1 and merge2 <= 0.1 ** 0.5 * target + 1e-9
    assert any("also built with them stopped there" in line for line in lines)
    assert report.verified and report.output_deviation <= 1.0


def test_the_second_build_is_abandoned_without_enough_gain(monkeypatch):
    """With a gain it cannot reach (all of the input's MACs), the second build stops after its
    separations and the first is the result."""
    model = onnx.load("models/digits_resnet.onnx")
    kwargs = dict(tolerance=1.0, probe_ranges={"input": (0.0, 1.0)})
    plain, plain_report = red_onnx.compress(model, **kwargs)
    seen = _removal_spends(monkeypatch)
    monkeypatch.setattr(pipeline, "REMOVAL_SHARE", 0.1)
    monkeypatch.setattr(pipeline, "REMOVAL_GAIN", 1.0)
    result, report = red_onnx.compress(model, **kwargs)
    assert [s[0] for s in seen[:2]] == [1.0, 0.1] and seen[1][1:] == (None, None)  # abandoned: None
    assert result.SerializeToString() == plain.SerializeToString()


def embedding_model(index_op: str = "Gather", rows: int = 50, elem=onnx.TensorProto.INT64):
    """ids (N, 6) int64 → Gather rows of a ``rows`` x 32 table (or Cast to float: not an index) → MatMul → Relu → MatMul."""
    rng = np.random.default_rng(0)
    g = Builder(0)
    ids = g.input("ids", ["N", 6], elem=elem)
    if index_op == "Gather":
        e = g.node("Gather", [g.init(rng.standard_normal((rows, 32))), ids], axis=0)
    else:
        e = g.node("Tile", [g.node("Unsqueeze", [g.node("Cast", [ids], to=onnx.TensorProto.FLOAT),
                                                  g.init([2], dtype=np.int64)]), g.init([1, 1, 32], dtype=np.int64)])
    h = g.node("Relu", [g.matmul_w(e, rng.standard_normal((64, 32)).astype(np.float32) / 6, name="mm1")])
    g.output(g.matmul_w(h, rng.standard_normal((3, 64)).astype(np.float32) / 8, name="mm2"))
    return g.model()


def test_token_ids_are_probed_over_the_rows_of_their_table(monkeypatch):
    """An integer input that only indexes an embedding table is probed uniformly over its rows (all
    0 before: every probe alike, so the verification saw one input); the report says so."""
    seen = []
    make = pipeline.make_probes
    monkeypatch.setattr(pipeline, "make_probes", lambda *a, **k: seen.append(make(*a, **k)) or seen[-1])
    _, report = red_onnx.compress(embedding_model(), tolerance=0.05)
    ids = np.concatenate([f["ids"] for f in seen[0].allocation + seen[0].verification])
    assert ids.min() == 0 and ids.max() == 49 and len(np.unique(ids)) == 50
    assert any("'ids' probed uniformly in 0..49" in n for n in report.notes), report.notes
    assert report.verified


def test_other_integer_inputs_stay_0_and_the_report_says_so():
    _, report = red_onnx.compress(embedding_model("Cast"), tolerance=0.05)
    assert any("'ids' is 0 on every probe" in n for n in report.notes), report.notes
    _, report = red_onnx.compress(embedding_model("Cast"), tolerance=0.05, probe_ranges={"ids": (0, 9)})
    assert not any("'ids'" in n for n in report.notes), report.notes


def test_a_boolean_mask_is_false_with_a_note_unless_its_range_draws_it(monkeypatch):
    """A boolean input (a mask that zeroes the output where False) was False on every probe and
    nothing said so: the verification compared zeros. Now the report says so (of the mask, and of
    the output, the same on every probe), and --probe-range mask:0,1 draws both values; a range
    outside 0,1 is refused."""
    b = Builder(seed=21)
    x, mask = b.input("x", ["N", 8, 32]), b.input("mask", ["N", 8], elem=onnx.TensorProto.BOOL)
    keep = b.node("Unsqueeze", [b.node("Cast", [mask], to=onnx.TensorProto.FLOAT), b.init([-1], dtype=np.int64)])
    b.output(b.node("Mul", [b.matmul(x, 32, 64), keep]), ["N", 8, 64])
    model = b.model()
    seen = []
    make = pipeline.make_probes
    monkeypatch.setattr(pipeline, "make_probes", lambda *a, **k: seen.append(make(*a, **k)) or seen[-1])
    _, report = red_onnx.compress(model, tolerance=0.05)
    assert any("boolean input 'mask' is False on every probe" in n for n in report.notes), report.notes
    assert any(n.startswith(f"output '{model.graph.output[0].name}' is the same on every probe")
               for n in report.notes), report.notes
    _, report = red_onnx.compress(model, tolerance=0.05, probe_ranges={"mask": (0, 1)})
    drawn = np.concatenate([f["mask"] for f in seen[-1].allocation + seen[-1].verification])
    assert drawn.dtype == np.bool_ and 0.3 < drawn.mean() < 0.7 and report.verified
    assert not any("'mask'" in n for n in report.notes), report.notes
    with pytest.raises(InputError, match="is bool"):
        red_onnx.compress(model, tolerance=0.05, probe_ranges={"mask": (0, 5)})


def test_a_one_row_table_is_indexed_by_0_alone():
    _, report = red_onnx.compress(embedding_model(rows=1), tolerance=0.05)
    assert report.verified and not any("'ids'" in n for n in report.notes), report.notes


def test_uint8_inputs_are_probed_over_all_their_values(monkeypatch):
    """A uint8 input cast to float (an image's pixels) is probed over 0..255, with a note."""
    seen = []
    make = pipeline.make_probes
    monkeypatch.setattr(pipeline, "make_probes", lambda *a, **k: seen.append(make(*a, **k)) or seen[-1])
    _, report = red_onnx.compress(embedding_model("Cast", elem=onnx.TensorProto.UINT8), tolerance=0.05)
    x = np.concatenate([f["ids"] for f in seen[0].allocation + seen[0].verification])
    assert x.dtype == np.uint8 and x.min() < 20 and x.max() > 235
    assert any("(uint8) probed uniformly over all its values, 0..255" in n for n in report.notes), report.notes
