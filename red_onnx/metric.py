"""Accuracy-aware mode: compress as far as the user's own metric allows.

The metric is a function of the path of an ONNX file returning a float, higher is better (return
the negative of an error). The input model is scored first (the baseline); then the search builds
verified results at candidate tolerances from one preparation (:class:`red_onnx.pipeline.Compressor`)
and scores each: a geometric ladder (LADDER) until a tolerance's drop exceeds ``max_drop``, then
geometric bisection between the last that held and the first that did not, at most ``max_evals``
metric calls in all. The result is the scored one that saves the most (MACs first, then bytes)
among those whose drop stays two steps of a stepped metric inside the allowed drop (else among
those within it; :func:`run`); where none is within, the exact rewrites (tolerance 0).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from .errors import InputError

#: Tolerances tried first, in order, until one costs more than the drop allows (up to 1: on the
#: bench, 6 of 7 models kept their metric at 0.3, the top of a shorter ladder).
LADDER = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: Bisection stops when the bracket's tolerances are within this ratio.
BRACKET_RATIO = 1.25
#: The chosen result stays this many steps of a stepped metric inside the drop (bench/metric_mode.md:
#: with two, the digits ResNet chose a result that lost 1 of 270 images on the search half and
#: 3 of 270 on the held-back half).
MARGIN_STEPS = 3

Metric = Callable[[str], float]


def load(spec: str) -> Metric:
    """``FILE.py:FUNCTION`` or ``package.module:FUNCTION``; an InputError says why it cannot be loaded."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise InputError(f"--metric {spec}: expected FILE.py:FUNCTION or package.module:FUNCTION")
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise InputError(f"--metric {spec}: no file {where}")
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except InputError:
        raise
    except BaseException as err:  # a SyntaxError or a failing import in the user's file
        if isinstance(err, KeyboardInterrupt):
            raise
        raise InputError(f"--metric {spec}: cannot import {where} ({type(err).__name__}: {err})") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"--metric {spec}: {where} has no function {name}")
    return function


def score(metric: Metric, path: str, what: str) -> float:
    """The metric on the model at ``path``; an error, NaN or a non-number is an InputError."""
    try:
        value = metric(str(path))
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        raise InputError(f"the metric failed on {what} ({type(err).__name__}: {err})") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise InputError(f"the metric returned {type(value).__name__} on {what}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"the metric returned {value} on {what}")
    return value


@dataclass
class Search:
    """What the search scored: the baseline, and per built tolerance its savings and metric."""

    baseline: float
    max_drop: float
    max_evals: int
    points: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    chosen: float | None = None

    def margin(self) -> float:
        """How far inside the allowed drop the chosen result should stay: three steps of a metric
        that moves in steps (accuracy on n samples: 1/n, the smallest gap between the scores seen),
        at most the whole drop (a drop of three steps or less cannot tell a loss from noise: then
        only results that lose nothing on the metric's data are chosen); about 0 for a
        continuous metric."""
        values = sorted({self.baseline} | {p["metric"] for p in self.points})
        gaps = [b - a for a, b in zip(values, values[1:]) if b - a > 1e-12]
        return min(MARGIN_STEPS * min(gaps), self.max_drop) if gaps else 0.0

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "max_drop": self.max_drop, "max_evals": self.max_evals,
                "margin": self.margin(), "chosen_tolerance": self.chosen, "points": self.points,
                "warnings": self.warnings}


def baseline(metric: Metric, model: str | os.PathLike | onnx.ModelProto, max_drop: float) -> tuple[float, list[str]]:
    """The input model's score (twice: a metric whose two calls disagree by more than max_drop / 4
    gets a warning), before any long work."""
    with tempfile.TemporaryDirectory(prefix="red_onnx_metric_") as tmp:
        path = str(model) if not isinstance(model, onnx.ModelProto) else _saved(model, Path(tmp) / "input.onnx")
        first = score(metric, path, "the input model")
        second = score(metric, path, "the input model")
    warnings = []
    if abs(first - second) > max_drop / 4:
        warnings.append(f"the metric is not deterministic: two calls on the input model gave {first:.6g} and "
                        f"{second:.6g} (more than max_drop / 4 apart); the search's choices are that noisy")
    return first, warnings


def evaluate(metric: Metric, model: onnx.ModelProto, report, search: Search, tolerance: float) -> dict:
    """Score one built result and record it."""
    with tempfile.TemporaryDirectory(prefix="red_onnx_metric_") as tmp:
        value = score(metric, _saved(model, Path(tmp) / "candidate.onnx"), f"the result at tolerance {tolerance:g}")
    drop = search.baseline - value
    point = {"tolerance": tolerance, "macs": report.macs_after, "params": report.params_after,
             "bytes": report.bytes_after, "latency_ratio": report.latency.get("ratio"), "metric": value,
             "drop": drop, "within": drop <= search.max_drop}
    search.points.append(point)
    return point


def run(compressor, metric: Metric, search: Search, log: Callable[[str], None]):
    """The search (module docstring); returns (model, report) of the chosen result: the one that
    saves the most among those whose drop stays :meth:`Search.margin` inside the allowed drop, or
    where none does, among those within it. (The result at the edge of the drop was chosen for
    being within on the metric's data: on other data a discrete metric flips a sample or two; on
    the bench's held-back halves, 1.3 to 2 points.) Only results that no other beats in both
    saving and drop are kept in memory."""
    kept: list = []  # [point, model, report] within the drop, none beaten in both saving and drop
    last: list = []  # the same for the last result scored

    def saving(point: dict) -> tuple:
        return (-point["macs"], -point["bytes"])

    def scored(t: float) -> dict:
        model, report = compressor.at(t)
        log(f"metric: scoring the result at tolerance {t:g}")
        point = evaluate(metric, model, report, search, t)
        log(f"metric: {point['metric']:.6g} at tolerance {t:g} (drop {point['drop']:.4g}, allowed {search.max_drop:g})")
        last[:] = [point, model, report]
        if point["within"] and not any(saving(k[0]) >= saving(point) and k[0]["drop"] <= point["drop"] for k in kept):
            kept[:] = [k for k in kept if not (saving(point) >= saving(k[0]) and point["drop"] <= k[0]["drop"])]
            kept.append(list(last))
        return point

    held, failed = None, None
    for t in LADDER:
        if len(search.points) >= search.max_evals:
            break
        if scored(t)["within"]:
            held = t
        else:
            failed = t
            break
    while held is not None and failed is not None and failed / held > BRACKET_RATIO \
            and len(search.points) < search.max_evals:
        t = float(f"{math.sqrt(held * failed):.3g}")
        if scored(t)["within"]:
            held = t
        else:
            failed = t
    if not kept:  # even the mildest lossy result cost too much: exact rewrites only
        point = scored(0.0)
        if not point["within"]:
            search.warnings.append(f"even the exact rewrites scored {point['drop']:.4g} below the input "
                                   "(float rounding moved the metric, or it is not deterministic)")
            kept[:] = [last]
    inside = [k for k in kept if k[0]["drop"] <= search.max_drop - search.margin() + 1e-9] or kept
    best = max(inside, key=lambda k: saving(k[0]))
    search.chosen = best[0]["tolerance"]
    return best[1], best[2]


def scored_each(model, results, metric: Metric, max_drop: float):
    """Several tolerances with a metric: the input's score first (before any long work), then each
    ``(tolerance, model, report)`` of ``results`` with ``report.metric`` filled in."""
    base, warnings = baseline(metric, model, max_drop)
    for tolerance, result, report in results:
        search = Search(base, max_drop, 1, warnings=warnings)
        point = evaluate(metric, result, report, search, tolerance)
        report.metric = {"baseline": base, "max_drop": max_drop, "metric": point["metric"], "drop": point["drop"],
                         "within": point["within"], "warnings": warnings}
        yield tolerance, result, report


def _saved(model: onnx.ModelProto, path: Path) -> str:
    from .model_io import save

    save(model, path)
    return str(path)
