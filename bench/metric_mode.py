"""The accuracy-aware mode on the bench models, judged on data the search did not see.

    python -m bench.metric_mode                     # every bench model -> bench/metric_mode.md, .json
    python -m bench.metric_mode --models mtcnn_onet,mobilenet_v2

Per model: ``red_onnx.compress(model, metric=..., max_drop=0.01)`` (all passes, the model's input range
as probe range) whose metric is the model's primary metric on the **even** samples of its
evaluation set; the result is then judged on the **odd** samples (and the guard metrics, e.g. the
MTCNN nets' clean accuracy). Also: the metric calls and their time, the mode's wall time, and one
plain call at the chosen tolerance (the grid's single call) for the time criterion. The grid rows
it is compared with are bench/prune_check.json's (all passes, tolerances 0.003 to 1, judged on the
full evaluation set; within 1 point there includes the MTCNN nets' clean accuracy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import onnx

from .common import BENCH_DIR

WITHIN = 0.01


def measure(name: str) -> dict:
    import red_onnx

    from . import zoo

    m = zoo.get(name)
    path = str(m.build())
    shapes = {k: tuple(v.shape) for k, v in m.real_inputs(1).items()}
    keys = (m.primary, *m.guards)
    held_back_input = m.evaluate(path, half=1)
    calls = []

    def metric(candidate: str) -> float:
        start = time.perf_counter()
        value = m.evaluate(candidate, half=0)[m.primary]
        calls.append(time.perf_counter() - start)
        return value

    start = time.perf_counter()
    model, report = red_onnx.compress(path, metric=metric, max_drop=WITHIN, probe_ranges=m.probe_range,
                                      input_shapes=shapes)
    wall = time.perf_counter() - start
    chosen = report.metric["chosen_tolerance"]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/m.onnx"
        onnx.save(model, out)
        held_back = m.evaluate(out, half=1)
    start = time.perf_counter()
    red_onnx.compress(path, chosen, probe_ranges=m.probe_range, input_shapes=shapes)
    single = time.perf_counter() - start
    return {"model": name, "chosen": chosen, "macs": report.macs_after / report.macs_before,
            "params": report.params_after / report.params_before, "bytes": report.bytes_after / report.bytes_before,
            "latency_ratio": report.latency.get("ratio"), "metric_calls": len(calls), "metric_s": round(sum(calls), 2),
            "wall_s": round(wall, 2), "single_call_s": round(single, 2),
            "held_back_drop": {k: held_back_input[k] - held_back[k] for k in keys},
            "within_on_held_back": all(held_back_input[k] - held_back[k] <= WITHIN + 1e-12 for k in keys),
            "points": report.metric["points"]}


def grid_best(name: str) -> tuple[dict | None, dict | None]:
    """bench/prune_check.json's all-passes rows (the same options, tolerances 0.003 to 1, judged on
    the full evaluation set): the best within 1 point (MACs first, then bytes) and the default."""
    data = json.loads((BENCH_DIR / "prune_check.json").read_text())["results"]
    rows = [{"tolerance": float(r["setting"].split()[1]), **r}
            for r in next(m for m in data if m["model"] == name)["rows"] if r["tool"] == "red_onnx all"]
    best = min((r for r in rows if r["within"]), key=lambda r: (r["macs"], r["bytes"]), default=None)
    default = next((r for r in rows if r["tolerance"] == 0.003), None)
    return best, default


def table(rows: list[dict]) -> str:
    lines = ["| model | chosen T | MACs | params | bytes | latency | drop on held-back half | metric calls (s) | "
             "wall s | single call at T s | wall / (single + metric) | best grid row within 1 point: T, MACs, bytes "
             "| share of its saving | default (0.003): MACs, bytes |", "|" + "---|" * 14]
    for r in rows:
        best, default = grid_best(r["model"])
        drop = ", ".join(f"{k} {v:+.4f}" for k, v in r["held_back_drop"].items())
        if best is None:
            share = "-"
        elif best["macs"] < 1:
            share = f"{(1 - r['macs']) / (1 - best['macs']):.0%} of MACs"
        else:
            share = f"{(1 - r['bytes']) / (1 - best['bytes']):.0%} of bytes" if best["bytes"] < 1 else "-"
        ratio = r["wall_s"] / (r["single_call_s"] + r["metric_s"])
        lines.append(
            f"| {r['model']} | {r['chosen']:g} | {r['macs']:.3f} | {r['params']:.3f} | {r['bytes']:.3f} | "
            f"{r['latency_ratio'] or '-'} | {drop} ({'within' if r['within_on_held_back'] else 'OVER'}) | "
            f"{r['metric_calls']} ({r['metric_s']:.1f}) | {r['wall_s']:.1f} | {r['single_call_s']:.1f} | {ratio:.2f} | "
            + (f"{best['tolerance']:g}, {best['macs']:.3f}, {best['bytes']:.3f}" if best else "-") + f" | {share} | "
            + (f"{default['macs']:.3f}, {default['bytes']:.3f}" if default else "-") + " |")
    return "\n".join(lines)


def main() -> None:
    from . import zoo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--out", default=str(BENCH_DIR / "metric_mode.md"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH_DIR).stdout.strip()
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "points"}), flush=True)
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        out.write_text(f"# The metric mode, judged on held-back data (bench/metric_mode.py, commit {commit})\n\n"
                       + __doc__.split("\n\n", 2)[2] + "\n" + table(rows) + "\n")


if __name__ == "__main__":
    main()
