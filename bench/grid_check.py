"""Two checkouts side by side on the bench models' task metrics, all passes, a tolerance grid.

    python -m bench.grid_check --old /tmp/oldtree            # this checkout against the one at /tmp/oldtree
    python -m bench.grid_check --old /tmp/oldtree --models mobilenet_v2 --tolerances 0.003,0.01

For each checkout (each in its own process, importing its own red_onnx), each bench model and each
tolerance: ``red_onnx.compress`` with all passes and the model's input range as probe range, the
task metric on the model's full evaluation set, MACs and file size after / before, and the tool
time. Writes bench/grid_check.md: per model, the smallest file and the most MACs removed among the
rows within 1 point of the original's metric, for both checkouts, and every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BENCH_DIR, REPO_DIR

WORKER = r"""
import json, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
import onnx, red_onnx
from bench import zoo
for name in sys.argv[2].split(","):
    m = zoo.get(name)
    path = str(m.build())
    shapes = {k: tuple(v.shape) for k, v in m.real_inputs(1).items()}
    clean = m.evaluate(path)
    print(json.dumps({"model": name, "tolerance": None, "metric": clean[m.primary], "primary": m.primary}), flush=True)
    for t in map(float, sys.argv[3].split(",")):
        start = time.perf_counter()
        model, report = red_onnx.compress(path, t, probe_ranges=m.probe_range, input_shapes=shapes)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/m.onnx"
            onnx.save(model, out)
            metric = m.evaluate(out)[m.primary]
        print(json.dumps({"model": name, "tolerance": t, "metric": metric, "macs": report.macs_after / report.macs_before,
                          "bytes": report.bytes_after / report.bytes_before, "seconds": round(seconds, 2),
                          "deviation": report.output_deviation}), flush=True)
"""


def run(tree: str, models: str, tolerances: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", WORKER, tree, models, tolerances], capture_output=True, text=True,
                          cwd=tree)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def best(rows: list[dict], clean: float) -> tuple[dict | None, dict | None]:
    within = [r for r in rows if r["metric"] >= clean - 0.01]
    smallest = min(within, key=lambda r: r["bytes"], default=None)
    fastest = min(within, key=lambda r: (r["macs"], r["bytes"]), default=None)
    return smallest, fastest


def main() -> None:
    from . import zoo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="path of the other checkout")
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--tolerances", default="0.003,0.01,0.03,0.1")
    parser.add_argument("--out", default=str(BENCH_DIR / "grid_check.md"))
    args = parser.parse_args()
    commits = {}
    results = {}
    for label, tree in (("old", args.old), ("new", str(REPO_DIR))):
        commits[label] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=tree).stdout.strip()
        results[label] = run(tree, args.models, args.tolerances)
    lines = [f"# Task metrics, all passes: {commits['new']} against {commits['old']} (bench/grid_check.py)", "",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| model | clean | smallest file within 1 point: new | old | most MACs removed within 1 point: new | old |",
             "|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        cells = {}
        for label in ("old", "new"):
            rows = [r for r in results[label] if r["model"] == name]
            clean = next(r["metric"] for r in rows if r["tolerance"] is None)
            smallest, fastest = best([r for r in rows if r["tolerance"] is not None], clean)
            cells[label] = (clean, smallest, fastest)

        def fmt(r, key):
            return "-" if r is None else f"{1 / r[key]:.2f}x at {r['tolerance']:g} ({r['metric']:.4f})"

        clean = cells["new"][0]
        lines.append(f"| {name} | {clean:.4f} | {fmt(cells['new'][1], 'bytes')} | {fmt(cells['old'][1], 'bytes')} | "
                     f"{fmt(cells['new'][2], 'macs')} | {fmt(cells['old'][2], 'macs')} |")
    lines += ["", "Every row (metric, MACs and bytes after / before, tool seconds):", "",
              "| model | T | new: metric | MACs | bytes | s | old: metric | MACs | bytes | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for new in results["new"]:
        if new["tolerance"] is None:
            continue
        old = next(r for r in results["old"] if r["model"] == new["model"] and r["tolerance"] == new["tolerance"])
        lines.append(f"| {new['model']} | {new['tolerance']:g} | " + " | ".join(
            f"{r['metric']:.4f} | {r['macs']:.3f} | {r['bytes']:.3f} | {r['seconds']:.1f}" for r in (new, old)) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
