"""Re-measure some row sets of a results file with the current code, in place of the old rows.

    python -m bench.rerun_rows RESULTS.json --models a,b --variants "hash,hash (codebook auto)"
    python -m bench.rerun_rows RESULTS.json --models a,b --variants all --tolerances 0.005

For a change that affects only those rows (e.g. the hash pass: the rows of red_onnx's hash pass
alone). The models' other rows and baselines stay as they were; the replaced rows carry
`rerun_commit`, and the results file is rewritten after each model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import measure, report, run, tools, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--models", required=True)
    parser.add_argument("--variants", default="hash (codebook auto)",
                        help="comma-separated row labels: all, merge, separate, hash, hash (codebook auto)")
    parser.add_argument("--tolerances", help="comma-separated: re-measure only these tolerances of those variants")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    variants = set(args.variants.split(","))
    tolerances = {float(t) for t in args.tolerances.split(",")} if args.tolerances else None
    info = tools.red_onnx_info()
    runner = measure.ToolRunner(["numpy", "onnx", "onnxruntime", "onnxsim", "red_onnx", "bench.tools"], run.FULL.tool_timeout_s)
    commit = report.environment(False, info)["git_commit"]
    for name in args.models.split(","):
        mb = run.ModelBench(zoo.get(name), run.FULL, runner, print)
        rows = [dict(r, rerun_commit=commit) for r in mb.red_onnx_rows(info, only=variants, only_tolerances=tolerances)]
        results["rows"] = [r for r in results["rows"] if not (r["model"] == name and r["passes"] in variants and (
            tolerances is None or r["setting"] in tolerances))] + rows
        args.results.write_text(json.dumps(results, indent=1, default=run._plain))


if __name__ == "__main__":
    main()
