"""Does the verified deviation hold on inputs the tool never saw?

For every bench model at tolerances 0.003, 0.01, 0.03 and 0.1 (all passes, the model's input range
as ``probe_ranges``, red_onnx's default ``check``): compress, then draw 1000 new probes from the
same distribution as the tool's (uniform in that range, another seed) and measure each one's
deviation exactly as the tool does (``verify.measure_plan``: Concat parts, logits and outputs of
squashings). The tool promises that the share above the tolerance is below 3/N (N: its fresh
verification probes) at 95 % confidence; a row above that is a defect.

    python -m bench.tail_check [--models a,b] [--tolerances 0.003,0.01] [--probes 1000] [--out bench/tail_check.md]
    python -m bench.tail_check --combine a.json b.json --out bench/tail_check.md   # one table from several runs
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx

from . import zoo
from .common import BENCH_DIR

TOLERANCES = (0.003, 0.01, 0.03, 0.1)
CHUNK = 16  # probes per batched run (PP-OCRv6's outputs are 6 MB per probe)


def tail(original: onnx.ModelProto, result: onnx.ModelProto, probes: list[dict]) -> np.ndarray:
    """Each probe's deviation (max over the measured tensors), run in batches of CHUNK."""
    from red_onnx import verify
    from red_onnx.budget import run_all

    pairs = verify.columns(verify.measure_plan(original), result)  # the tensors the tool measures, paired
    ref = verify.session(original, [t for t, _, _ in pairs])
    res = verify.session(result, [r for _, r, _ in pairs])
    worst = []
    for start in range(0, len(probes), CHUNK):
        chunk = probes[start:start + CHUNK]
        worst.extend(verify.sample_deviations(run_all(ref, chunk), run_all(res, chunk)).max(axis=1))
    return np.array(worst)


def check_model(name: str, tolerances, n_probes: int, seed: int) -> list[dict]:
    import red_onnx
    from red_onnx.budget import random_probes
    from red_onnx.layers import input_specs

    m = zoo.get(name)
    path = m.build()
    original = onnx.load(str(path))
    shapes = {k: tuple(v.shape) for k, v in m.real_inputs(1).items()}
    specs = input_specs(original, shapes)
    probes = random_probes(specs, n_probes, np.random.default_rng(seed), m.probe_range)
    rows = []
    for tol in tolerances:
        t0 = time.perf_counter()
        try:
            result, report = red_onnx.compress(str(path), tolerance=tol, probe_ranges=m.probe_range,
                                               input_shapes=shapes, seed=0)
        except red_onnx.VerificationError as err:
            rows.append({"model": name, "tolerance": tol, "error": str(err)})
            continue
        seconds = time.perf_counter() - t0
        d = tail(original, result, probes)
        n = report.verification["probes"]
        rows.append({
            "model": name, "tolerance": tol, "tool_probes": n, "tool_max": report.output_deviation,
            "tool_p95": report.verification["p95"], "new_probes": len(d), "share_above": float(np.mean(d > tol)),
            "allowed_share": 3 / n, "worst": float(d.max()), "p99": float(np.percentile(d, 99)),
            "median": float(np.median(d)), "smaller_by": report.bytes_before / report.bytes_after,
            "macs_removed": 1 - report.macs_after / report.macs_before, "tool_seconds": seconds,
            "backed_off": sum("backed off" in note for note in report.notes),
            "measured": {k: v["label"] for k, v in report.measured.items()},
        })
        print(json.dumps(rows[-1]), flush=True)
        del result
    rows.extend(_verification_cost(name, original, specs, m.probe_range))
    return rows


def _verification_cost(name: str, model: onnx.ModelProto, specs, ranges) -> list[dict]:
    """Seconds of the reference run of the input model on 8 and on 64 fresh probes, as the tool runs them."""
    from red_onnx import verify
    from red_onnx.budget import random_probes, run_all

    measured, owners = verify.measured_tensors(model)
    sess = verify.session(model, list(dict.fromkeys(measured + owners)))
    out = {}
    for n in (8, 64):
        probes = random_probes(specs, n, np.random.default_rng(1), ranges)
        best = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            run_all(sess, probes)
            best = min(best, time.perf_counter() - t0)
        out[n] = best
    return [{"model": name, "cost_8": out[8], "cost_64": out[64]}]


def write(rows: list[dict], out: Path) -> None:
    checks = [r for r in rows if "share_above" in r or "error" in r]
    costs = {r["model"]: r for r in rows if "cost_8" in r}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH_DIR).stdout.strip()
    lines = [
        "# The deviation on 1000 new probes (`python -m bench.tail_check`)",
        "",
        f"red_onnx at {commit} (plus the working tree of this run), all passes, the model's input range as "
        "`probe_ranges`, default `check`; 1000 new probes from the same uniform distribution with another seed, "
        f"measured as the tool measures. {platform.machine()}, {platform.python_version()}.",
        "",
        "Promise: none of the tool's N fresh probes above the tolerance T, so the share of such inputs above T is "
        "below 3/N at 95 % confidence. `ok` = the share on the new probes is at most 3/N.",
        "",
        "| model | T | tool: N, max, p95 | new probes: share > T (allowed 3/N) | worst | p99 | ok | smaller by | "
        "MACs removed | backed off | tool s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in checks:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tolerance']:g} | verification failed: {r['error'][:80]} |")
            continue
        ok = r["share_above"] <= r["allowed_share"]
        lines.append(
            f"| {r['model']} | {r['tolerance']:g} | {r['tool_probes']}, {r['tool_max']:.3g}, {r['tool_p95']:.3g} | "
            f"{r['share_above']:.1%} ({r['allowed_share']:.1%}) | {r['worst']:.3g} | {r['p99']:.3g} | "
            f"{'yes' if ok else '**no**'} | {r['smaller_by']:.2f}x | {r['macs_removed']:.1%} | {r['backed_off']} | "
            f"{r['tool_seconds']:.1f} |")
    lines += ["", "What each output's deviation was measured on (the tool's report, `measured[].label`):", ""]
    seen = set()
    for r in checks:
        if r["model"] in seen or "measured" not in r:
            continue
        seen.add(r["model"])
        for output, label in r["measured"].items():
            lines.append(f"- {r['model']} `{output}`: {label}")
    if costs:
        lines += ["", "Cost of the verification probes: the input model's run on them as the tool runs it "
                  "(one batch where the model allows), best of 3, seconds:", "",
                  "| model | 8 probes | 64 probes |", "|---|---|---|"]
        lines += [f"| {m} | {c['cost_8']:.3f} | {c['cost_64']:.3f} |" for m, c in costs.items()]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--tolerances", default=",".join(f"{t:g}" for t in TOLERANCES))
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default=str(BENCH_DIR / "tail_check.md"))
    parser.add_argument("--combine", nargs="*", help="JSON files of earlier runs: write one table from them")
    args = parser.parse_args()
    if args.combine:
        rows = [r for f in args.combine for r in json.loads(Path(f).read_text())]
    else:
        tolerances = [float(t) for t in args.tolerances.split(",")]
        rows = [r for name in args.models.split(",") for r in check_model(name, tolerances, args.probes, args.seed)]
    write(rows, Path(args.out))


if __name__ == "__main__":
    main()
