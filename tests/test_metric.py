"""The accuracy-aware mode: --metric / compress(metric=...) searches tolerances with the user's metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import red_onnx
from red_onnx import InputError

from conftest import Builder
from test_cli import cli

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
X = np.random.default_rng(7).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)


def outputs(path: str) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})[0]


REFERENCE = outputs(str(DIGITS))


def agreement(path: str) -> float:
    """Share of the 64 inputs whose top class the result keeps."""
    return float(np.mean(outputs(path).argmax(1) == REFERENCE.argmax(1)))


def one_channel(path: str) -> float:
    """Depends on output channel 7 only: minus its relative error against the input model's."""
    y = outputs(path)[:, 7]
    return -float(np.linalg.norm(y - REFERENCE[:, 7]) / np.linalg.norm(REFERENCE[:, 7]))


def test_the_search_stops_before_the_channel_the_metric_needs():
    """The metric reads one logit: the global deviation says little about it, so larger tolerances
    cost more than the drop allows, and the search must choose one whose score holds."""
    model, report = red_onnx.compress(DIGITS, metric=one_channel, max_drop=0.002, probe_ranges={"input": (0, 1)})
    m = report.metric
    assert m["baseline"] == pytest.approx(0.0, abs=1e-6)
    assert any(not p["within"] for p in m["points"])  # some tolerance cost more than the drop
    assert 1 <= len(m["points"]) <= 8
    chosen = next(p for p in m["points"] if p["tolerance"] == m["chosen_tolerance"])
    assert chosen["within"] and report.tolerance == m["chosen_tolerance"]
    path = "/tmp/red_onnx_test_metric_chosen.onnx"
    onnx.save(model, path)
    assert one_channel(path) >= m["baseline"] - 0.002  # the returned model is the one scored
    # the chosen saves the most among those within: MACs first, then bytes
    within = [p for p in m["points"] if p["within"]]
    assert (chosen["macs"], chosen["bytes"]) == min((p["macs"], p["bytes"]) for p in within)
    assert "metric: input" in report.table()


def test_library_call_and_max_evals():
    calls = []

    def counted(path):
        calls.append(path)
        return agreement(path)

    _, report = red_onnx.compress(DIGITS, metric=counted, max_drop=0.05, max_evals=2, probe_ranges={"input": (0, 1)})
    assert len(report.metric["points"]) == 2 and len(calls) == 2 + 2  # the input twice, then two candidates
    assert report.metric["points"][0]["tolerance"] == 0.003
    for key in ("tolerance", "macs", "params", "bytes", "latency_ratio", "metric", "drop", "within"):
        assert key in report.metric["points"][0]


def test_max_drop_zero_returns_a_result_without_metric_loss():
    _, report = red_onnx.compress(DIGITS, metric=agreement, max_drop=0.0, max_evals=3, probe_ranges={"input": (0, 1)})
    chosen = next(p for p in report.metric["points"] if p["tolerance"] == report.metric["chosen_tolerance"])
    assert chosen["drop"] <= 0.0 and report.verified


def test_max_drop_zero_on_a_continuous_metric_falls_back_to_exact_rewrites():
    """Float rounding moves a continuous metric: nothing is within a drop of 0, so the exact
    rewrites are returned, with a warning that says why."""
    _, report = red_onnx.compress(DIGITS, metric=one_channel, max_drop=0.0, max_evals=2, probe_ranges={"input": (0, 1)})
    assert report.metric["chosen_tolerance"] == 0.0 and report.tolerance == 0.0
    assert any("exact rewrites" in w for w in report.metric["warnings"])


def test_a_metric_that_is_not_deterministic_gets_a_warning():
    rng = np.random.default_rng(0)
    _, report = red_onnx.compress(DIGITS, metric=lambda path: agreement(path) + 0.1 * rng.random(), max_drop=0.01,
                                  max_evals=1, probe_ranges={"input": (0, 1)})
    assert any("not deterministic" in w for w in report.metric["warnings"])
    assert any("not deterministic" in n for n in report.notes)


METRICS = {
    "raises.py": "def score(path):\n    raise RuntimeError('no labels here')\n",
    "nan.py": "def score(path):\n    return float('nan')\n",
    "text.py": "def score(path):\n    return 'high'\n",
    "syntax.py": "def score(path)\n    return 1.0\n",
    "imports.py": "import not_a_module_anywhere\ndef score(path):\n    return 1.0\n",
    "nofunction.py": "def other(path):\n    return 1.0\n",
}


@pytest.mark.parametrize("name, fragment", [
    ("raises.py", "failed on the input model (RuntimeError: no labels here)"), ("nan.py", "returned nan"),
    ("text.py", "returned str"), ("syntax.py", "cannot import"), ("imports.py", "cannot import"),
    ("nofunction.py", "has no function score"), ("missing.py", "no file"),
])
def test_bad_metrics_are_refused_before_any_work(tmp_path, name, fragment):
    if name in METRICS:
        (tmp_path / name).write_text(METRICS[name])
    out = tmp_path / "out"
    out.mkdir()
    proc = cli(DIGITS, out / "o.onnx", "--metric", f"{tmp_path / name}:score", lossless=False)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "running the input model" not in proc.stderr  # before any long work
    assert list(out.iterdir()) == []
    with pytest.raises(InputError):
        red_onnx.compress(DIGITS, metric=f"{tmp_path / name}:score")


def test_a_failing_metric_shows_its_traceback_with_debug(tmp_path):
    (tmp_path / "raises.py").write_text(METRICS["raises.py"])
    proc = cli(DIGITS, tmp_path / "o.onnx", "--metric", f"{tmp_path / 'raises.py'}:score", "--debug", lossless=False)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "no labels here" in proc.stderr


def test_a_metric_that_fails_only_on_results(tmp_path):
    """Scores the input, raises on anything else: exit 2 naming the result, nothing written."""
    (tmp_path / "picky.py").write_text(f"def score(path):\n    if path != {str(DIGITS)!r}:\n"
                                       "        raise ValueError('unexpected file')\n    return 1.0\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = cli(DIGITS, out / "o.onnx", "--metric", f"{tmp_path / 'picky.py'}:score", lossless=False)
    assert proc.returncode == 2 and "failed on the result at tolerance 0.003" in proc.stderr
    assert list(out.iterdir()) == []


def test_cli_search_and_scored_tolerances(tmp_path):
    (tmp_path / "m.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                   "from test_metric import agreement as score\n")
    proc = cli(DIGITS, tmp_path / "o.onnx", "--metric", f"{tmp_path / 'm.py'}:score", "--max-drop", "0.02",
               "--max-evals", "3", "--probe-range", "input:0,1", "--report", tmp_path / "r.json", lossless=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["metric"]["points"]) == 3 and (tmp_path / "o.onnx").exists()
    assert "chose tolerance" in proc.stdout
    # with --tolerance: each output scored and marked
    proc = cli(DIGITS, tmp_path / "s.onnx", "--metric", f"{tmp_path / 'm.py'}:score", "--tolerance", "0.003,0.3",
               "--probe-range", "input:0,1", "--report", tmp_path / "r2.json", lossless=False)
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((tmp_path / "r2.json").read_text())["outputs"]
    assert [e["metric"]["within"] for e in entries][0] is True
    assert all({"metric", "drop", "baseline"} <= set(e["metric"]) for e in entries)
    assert "metric" in proc.stdout


@pytest.mark.parametrize("args, fragment", [(["--max-drop", "-1"], "--max-drop"), (["--max-evals", "0"], "--max-evals")])
def test_bad_search_options(tmp_path, args, fragment):
    (tmp_path / "m.py").write_text("def score(path):\n    return 1.0\n")
    proc = cli(DIGITS, tmp_path / "o.onnx", "--metric", f"{tmp_path / 'm.py'}:score", *args, lossless=False)
    assert proc.returncode == 2 and fragment in proc.stderr


class _Stepped:
    """A stand-in for pipeline.Compressor: the result at tolerance t saves more the larger t, and
    carries in its doc string the accuracy (on 100 samples: steps of 0.01) the metric reads."""

    def __init__(self, accuracy: dict[float, float]):
        self.accuracy = accuracy

    def at(self, t: float):
        from red_onnx.report import Report

        model = onnx.load(str(DIGITS))
        model.doc_string = str(self.accuracy.get(t, 0.0))
        return model, Report(macs_after=int(1e6 * (1 - t)), bytes_after=int(1e6 * (1 - t)))


def test_a_stepped_metric_keeps_three_steps_inside_the_drop():
    """With accuracy in steps of 0.01 and a drop of 0.05: the results that lost 0.02 are within,
    and the one chosen stays a margin (three steps) inside; with a drop of 0.02 (two steps) the
    margin is all of it: the chosen result loses nothing; a continuous metric takes the edge."""
    from red_onnx import metric

    def doc(path: str) -> float:
        return float(onnx.load(path, load_external_data=False).doc_string)

    stepped = {0.003: 0.95, 0.01: 0.95, 0.03: 0.95, 0.1: 0.94, 0.3: 0.93, 1.0: 0.80, 0.548: 0.93}
    search = metric.Search(0.95, 0.05, 8)
    metric.run(_Stepped(stepped), doc, search, lambda message: None)
    assert search.margin() == pytest.approx(0.03)  # three steps of 0.01
    assert search.chosen == 0.548  # lost 0.02, one margin inside the drop
    search = metric.Search(0.95, 0.02, 8)
    _, report = metric.run(_Stepped(stepped), doc, search, lambda message: None)
    assert search.margin() == pytest.approx(0.02)  # three steps, at most the drop
    assert search.chosen == 0.03  # lost nothing; 0.1 lost 0.01, 0.3 and 0.548 0.02, at the edge
    assert max(p["tolerance"] for p in search.points if p["within"]) == 0.548

    continuous = {t: 0.95 - 0.0199 * (t >= 0.3) - 1e-4 * t for t in stepped} | {1.0: 0.80}
    search = metric.Search(0.95, 0.02, 8)
    metric.run(_Stepped(continuous), doc, search, lambda message: None)
    assert search.margin() < 1e-3 and search.chosen == max(p["tolerance"] for p in search.points if p["within"])
