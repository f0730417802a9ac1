"""Re-measure some row sets of a results file with the current code, in place of the old rows.

    python -m bench.rerun_rows RESULTS.json --models a,b --variant "hash (codebook auto)"

For a fix that changes only those rows (here: the codebook index choice of --codebook auto). The
models' other rows and baselines stay as they were; the replaced rows carry `rerun_commit`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from . import measure, report, run, tools, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--models", required=True)
    parser.add_argument("--variant", default="hash (codebook auto)", choices=["hash (codebook auto)"])
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    plan = replace(run.FULL, tolerances=(), ablation=False)  # only the codebook-auto rows
    info = tools.red_onnx_info()
    runner = measure.ToolRunner(["numpy", "onnx", "onnxruntime", "onnxsim", "red_onnx", "bench.tools"], plan.tool_timeout_s)
    commit = report.environment(False, info)["git_commit"]
    for name in args.models.split(","):
        mb = run.ModelBench(zoo.get(name), plan, runner, print)
        rows = [dict(r, rerun_commit=commit) for r in mb.red_onnx_rows(info) if r["passes"] == args.variant]
        results["rows"] = [r for r in results["rows"] if not (r["model"] == name and r["passes"] == args.variant)] + rows
        args.results.write_text(json.dumps(results, indent=1, default=run._plain))


if __name__ == "__main__":
    main()
