"""The sensitivity profile: measured once, reused across tolerances and calls, refused when stale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import red_onnx
from red_onnx import InputError, profile
from red_onnx import budget as budget_module

from conftest import Builder
from test_cli import cli

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
RANGE = {"input": (0.0, 1.0)}
TOLERANCES = [0.003, 0.01, 0.03, 0.1]


def near_duplicates(seed: int = 3) -> onnx.ModelProto:
    """conv (channels 4..7 near-copies of 0..3) → Relu → conv: merge levels for the profile."""
    b = Builder(seed=seed)
    x = b.input("x", [1, 3, 8, 8])
    w = b.weight((8, 3, 3, 3))
    w[4:] = w[:4] * (1 + 0.02 * b.rng.standard_normal((4, 3, 3, 3)))
    h = b.relu(b.conv_w(x, w, np.zeros(8, np.float32), name="conv_a"))
    b.output(b.conv(h, 8, 4, name="conv_b"), [1, 4, 8, 8])
    return b.model()


def test_several_tolerances_each_verified_and_profiled_once():
    runs = list(red_onnx.compress_each(DIGITS, TOLERANCES, probe_ranges=RANGE))
    assert [t for t, _, _ in runs] == TOLERANCES
    for t, model, report in runs:
        assert report.verified and report.output_deviation <= t
        assert report.tolerance == t and report.macs_before > 0 and report.op_counts_before
        onnx.checker.check_model(model)
    sizes = [r.bytes_after for _, _, r in runs]
    assert sizes[-1] < sizes[0]  # more budget, a smaller file
    # the later tolerances reuse what the first measured
    assert runs[0][2].profile["measured"] > 0
    assert all(r.profile["reused"] > 0 for _, _, r in runs[1:])
    assert sum(r.profile["measured"] for _, _, r in runs[1:]) < runs[0][2].profile["measured"] * len(TOLERANCES)


def test_later_tolerances_reuse_sessions_and_equal_single_calls(monkeypatch):
    """A later tolerance's spend on a model an earlier one measured reuses its session (the first
    pass of every build sees the same model), and each output is what a call at that tolerance alone gives."""
    from red_onnx import verify

    created = []
    real = verify.session
    monkeypatch.setattr(verify, "session", lambda *a, **k: created.append(1) or real(*a, **k))
    budget_sessions = []
    real_budget = budget_module.Budget._session

    def spy(self, *args):
        before = len(created)
        result = real_budget(self, *args)
        budget_sessions.append(len(created) - before)
        return result

    monkeypatch.setattr(budget_module.Budget, "_session", spy)
    each = red_onnx.compress_each(DIGITS, [0.01, 0.03], probe_ranges=RANGE)
    runs = [next(each)]
    first_spends = len(budget_sessions)
    runs += list(each)
    assert first_spends and budget_sessions[first_spends] == 0  # the second build's first spend: no new session
    for t, model, _ in runs:
        alone, _ = red_onnx.compress(DIGITS, t, probe_ranges=RANGE)
        assert model.SerializeToString() == alone.SerializeToString()


def test_profile_file_is_reused_and_gives_the_same_result(tmp_path):
    path = tmp_path / "p.json"
    model = near_duplicates()
    first, r1 = red_onnx.compress(model, 0.05, passes=["merge"], profile=path)
    assert path.exists() and r1.profile["measured"] > 0
    saved = json.loads(path.read_text())
    assert saved["added"] and saved["fingerprint"]["probes"]["seed"] == 0
    again, r2 = red_onnx.compress(model, 0.05, passes=["merge"], profile=path)
    assert r2.profile["measured"] == 0 and r2.profile["reused"] > 0
    assert again.SerializeToString() == first.SerializeToString()
    assert r2.params_after < r2.params_before and r2.output_deviation <= 0.05


def test_profile_of_another_model_or_other_probes_is_refused(tmp_path):
    path = tmp_path / "p.json"
    red_onnx.compress(near_duplicates(), 0.05, passes=["merge"], profile=path)
    before = path.read_text()
    with pytest.raises(InputError, match="another model"):
        red_onnx.compress(near_duplicates(seed=4), 0.05, passes=["merge"], profile=path)
    with pytest.raises(InputError, match="other probe settings"):
        red_onnx.compress(near_duplicates(), 0.05, passes=["merge"], profile=path, seed=1)
    with pytest.raises(InputError, match="other probe settings"):
        red_onnx.compress(near_duplicates(), 0.05, passes=["merge"], profile=path, probe_ranges={"x": (0, 1)})
    assert path.read_text() == before  # a refused profile is left as it was


def test_a_file_that_is_not_a_profile_is_refused(tmp_path):
    for text in ("{}", "[1, 2]", "not json", json.dumps({"red_onnx_profile": 99, "added": {}})):
        path = tmp_path / "p.json"
        path.write_text(text)
        with pytest.raises(InputError, match="not a red_onnx profile"):
            red_onnx.compress(near_duplicates(), 0.05, passes=["merge"], profile=path)


def test_fingerprint_covers_model_shapes_and_probes():
    specs = {"x": ((1, 3), np.dtype(np.float32))}
    base = profile.fingerprint(b"a", specs, 0, 16, None, None)
    assert base == profile.fingerprint(b"a", specs, 0, 16, None, None)
    assert base != profile.fingerprint(b"b", specs, 0, 16, None, None)
    assert base != profile.fingerprint(b"a", {"x": ((2, 3), np.dtype(np.float32))}, 0, 16, None, None)
    assert base != profile.fingerprint(b"a", specs, 0, 8, None, None)
    assert base != profile.fingerprint(b"a", specs, 0, 16, {"x": (0, 1)}, None)
    arrays = {"x": np.zeros((4, 1, 3), np.float32)}
    other = {"x": np.ones((4, 1, 3), np.float32)}
    assert profile.fingerprint(b"a", specs, 0, 16, None, arrays) != profile.fingerprint(b"a", specs, 0, 16, None, other)


def test_cli_several_tolerances(tmp_path):
    out, report, prof = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "p.json"
    proc = cli(DIGITS, out, "--tolerance", "0.003,0.03", "--probe-range", "input:0,1", "--report", report,
               "--profile", prof)
    assert proc.returncode == 0, proc.stderr
    paths = [tmp_path / "out.t0.003.onnx", tmp_path / "out.t0.03.onnx"]
    assert all(p.exists() for p in paths) and not out.exists()
    assert "T=0.003" in proc.stdout and "T=0.03" in proc.stdout and "deviation max" in proc.stdout
    entries = json.loads(report.read_text())["outputs"]
    assert [e["output"] for e in entries] == [str(p) for p in paths]
    assert [e["tolerance"] for e in entries] == [0.003, 0.03]
    assert all(e["output_deviation"] <= e["tolerance"] for e in entries)
    # a later call reuses the profile: nothing measured again
    proc = cli(DIGITS, tmp_path / "again.onnx", "--tolerance", "0.03", "--probe-range", "input:0,1",
               "--report", report, "--profile", prof)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["profile"]["measured"] == 0
    # ... and refuses it for other probes, with one line, before writing anything
    proc = cli(DIGITS, tmp_path / "other.onnx", "--tolerance", "0.03", "--profile", prof)
    assert proc.returncode == 2 and "other probe settings" in proc.stderr
    assert not (tmp_path / "other.onnx").exists()


@pytest.mark.parametrize("value", ["", ",", "0.01,x", "0.01,-1", "nan"])
def test_cli_bad_tolerance_list(tmp_path, value):
    proc = cli(DIGITS, tmp_path / "o.onnx", "--tolerance", value)
    assert proc.returncode == 2 and "tolerance" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_output_names_per_tolerance():
    from red_onnx.cli import output_paths

    assert output_paths("out.onnx", [0.01]) == ["out.onnx"]
    assert output_paths("d/out.onnx", [0.003, 0.1]) == ["d/out.t0.003.onnx", "d/out.t0.1.onnx"]
    assert output_paths("d.x/out", [0, 1e-4]) == ["d.x/out.t0", "d.x/out.t0.0001"]
