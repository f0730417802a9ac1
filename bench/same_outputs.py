"""Does a refactor keep red_onnx's outputs? Rebuild the headline rows of a results file and print
the sha1 of each output, to compare between two checkouts.

For every bench model, the red_onnx rows of ``bench/results.json`` that RESULTS.md headlines (the
smallest file within 1 point and the most MACs removed within 1 point) are re-run with the same
arguments as ``bench.tools.red_onnx_compress``; one line per row: model, passes, tolerance, sha1.

    python -m bench.same_outputs > after.txt
    git worktree add /tmp/before <commit> && PYTHONPATH=/tmp/before python -m bench.same_outputs > before.txt
    diff before.txt after.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json

import red_onnx

from . import zoo
from .common import BENCH_DIR
from .report import within


def headline_rows(results: dict) -> list[dict]:
    """Per model: the red_onnx rows with the smallest file and with the most MACs removed within 1 point."""
    baselines = {b["model"]: b for b in results["baselines"]}
    chosen = []
    for name, base in baselines.items():
        ok = [r for r in results["rows"] if r["model"] == name and r["tool"] == "red_onnx" and within(r, base)]
        if not ok:
            continue
        smallest = min(ok, key=lambda r: (r["bytes"], -r["macs_removed_pct"]))
        most_macs = max(ok, key=lambda r: (r["macs_removed_pct"], -r["bytes"]))
        chosen += [smallest] + ([most_macs] if most_macs is not smallest else [])
    return chosen


def run_row(row: dict, baseline: dict) -> str:
    label = row["passes"]
    passes = None if label == "all" else [label.split(" ")[0]]
    codebook = "auto" if "codebook auto" in label else None
    kwargs = dict(tolerance=row["setting"], passes=passes, seed=0, probe_ranges=baseline["probe_range"],
                  input_shapes=baseline["input_shapes"], verify_result=True)
    if codebook:
        kwargs["codebook"] = codebook
    model, _ = red_onnx.compress(str(zoo.get(row["model"]).build()), **kwargs)
    return hashlib.sha1(model.SerializeToString()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(BENCH_DIR / "results.json"))
    parser.add_argument("--models", help="comma-separated; default: every model of the results file")
    args = parser.parse_args()
    results = json.loads(open(args.results).read())
    baselines = {b["model"]: b for b in results["baselines"]}
    wanted = set(args.models.split(",")) if args.models else None
    for row in headline_rows(results):
        if wanted is None or row["model"] in wanted:
            sha1 = run_row(row, baselines[row["model"]])
            print(f"{row['model']}\t{row['passes']}\t{row['setting']:g}\t{sha1}", flush=True)


if __name__ == "__main__":
    main()
