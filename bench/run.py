"""One command, one process, every bench model: red_onnx (all passes, then each pass alone) at several
tolerances against onnxsim's data-free L2 structured pruning at several sparsities.

    python -m bench.run [--quick] [--models a,b] [--out bench/RESULTS.md]

Writes RESULTS.md (table, headlines, Spearman, Pareto plots in bench/plots/) and results.json beside it.
--quick runs fewer settings on smaller evaluation sets and writes RESULTS_quick.md by default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import measure, onnxsim_check, report, tools, zoo
from .common import BENCH_DIR, CACHE, session


@dataclass(frozen=True)
class Plan:
    quick: bool
    tolerances: tuple[float, ...]
    sparsities: tuple[float, ...]
    ablation: bool  # also each pass alone at every tolerance
    codebook_auto: tuple[float, ...]  # tolerances of extra hash-only rows with --codebook auto (uint16 too)
    latency_pairs: int
    deviation_samples: int
    tool_timeout_s: float


FULL = Plan(False, (0.0, 0.003, 0.005, 0.01, 0.03, 0.1, 0.2, 0.3), (0.05, 0.1, 0.2, 0.3, 0.5), True,
            (0.0, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.03), 40, 16, 1800.0)
QUICK = Plan(True, (0.0, 0.03), (0.1, 0.3), False, (), 10, 8, 600.0)


class ModelBench:
    """Everything measured on one bench model: its baseline and one row per tool setting."""

    def __init__(self, bm: zoo.BenchModel, plan: Plan, runner: measure.ToolRunner, log):
        self.bm, self.plan, self.runner, self.log = bm, plan, runner, log
        self.path = bm.build()
        self.original = onnx.load(str(self.path))
        self.real = bm.real_inputs(plan.deviation_samples)
        self.normal = measure.normal_probes(self.real)
        self.one = {k: v[:1] for k, v in self.real.items()}
        ref = session(self.original)
        self.ref_real, self.ref_normal = ref.run(None, self.real), ref.run(None, self.normal)
        self.latency_session = measure.latency_session(self.original)
        self.out_dir = CACHE / "out" / bm.name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, dict] = {}  # sha1 of a result model -> its measurements

        self.session_s = _timed_session(self.original)[0]
        t0 = time.perf_counter()
        self.metrics = bm.evaluate(self.original, quick=plan.quick)
        self.cost = measure.cost(self.original, self.one)
        self.baseline = {
            "model": bm.name, "description": bm.description, "primary": bm.primary, "guards": list(bm.guards),
            "metrics": self.metrics,
            "eval_seconds": time.perf_counter() - t0, "session_s": self.session_s, **self.cost, "probe_range": bm.probe_range,
            "input_shapes": {k: list(v.shape) for k, v in self.one.items()},
            "red_onnx_analyze": _red_onnx_analyze(self.original, self.one),
        }
        log(f"{bm.name}: {bm.primary}={self.metrics[bm.primary]:.4f} "
            f"({self.cost['params']:,} params, {self.cost['macs']:,} MACs)")

    # ------------------------------------------------------------------------------------------ rows

    def red_onnx_rows(self, info: dict, only: set[str] | None = None,
                      only_tolerances: set[float] | None = None) -> list[dict]:
        """One row per variant (label) and tolerance; ``only``: just these labels and tolerances."""
        rows = []
        variants = [(None, None, self.plan.tolerances)]
        variants += [([p], None, self.plan.tolerances) for p in info["passes"]] if self.plan.ablation else []
        if "hash" in info["passes"]:
            variants.append((["hash"], "auto", self.plan.codebook_auto))
        for passes, codebook, tolerances in variants:
            label = ("all" if info["passes"] else "canonicalize only") if passes is None else passes[0]
            label += f" (codebook {codebook})" if codebook else ""
            if not info["available"]:
                label = "stub (copy)"
            if only is not None and label not in only:
                continue
            for tol in tolerances:
                if only_tolerances is not None and tol not in only_tolerances:
                    continue
                out = self.out_dir / f"red_onnx-{''.join(ch if ch.isalnum() else '_' for ch in label)}-{tol:g}.onnx"
                shapes = {k: list(v.shape) for k, v in self.one.items()}
                out.unlink(missing_ok=True)
                res = self.runner.run(tools.red_onnx_compress, str(self.path), str(out), tol, passes,
                                      self.bm.probe_range, shapes, codebook)
                row = self._row("red_onnx", "tolerance", tol, label, res, out)
                if res.get("ok") and "verification_failed" in res["result"]:
                    row.update(status="verification failed", error=res["result"]["verification_failed"])
                elif res.get("ok") and "report" in res["result"]:
                    row["red_onnx_report"] = _slim_report(res["result"]["report"])
                rows.append(row)
        return rows

    def onnxsim_rows(self) -> list[dict]:
        rows = []
        for sp in self.plan.sparsities:
            out = self.out_dir / f"onnxsim-{sp:g}.onnx"
            simplified = self.out_dir / f"onnxsim-{sp:g}.simplified.onnx"
            out.unlink(missing_ok=True)
            res = self.runner.run(tools.onnxsim_prune, str(self.path), str(out), sp, str(simplified))
            row = self._row("onnxsim", "sparsity", sp, "simplify + L2 channel pruning", res, out)
            if row["status"] == "ok":
                base = onnx.load(str(simplified))
                row["simplify_deviation"] = measure.deviation(None, session(base), self.real, self.ref_real)
                try:
                    row["onnxsim_check"] = onnxsim_check.check(base, onnx.load(str(out)), [self.real, self.normal])
                except Exception as exc:
                    row["onnxsim_check"] = {"equal": False, "max_deviation": None, "resized_tensors": 0,
                                            "removed_elements": 0, "findings": [f"check failed: {exc}"[:300]]}
            rows.append(row)
        return rows

    def _row(self, tool: str, setting_name: str, setting: float, passes: str, res: dict, out: Path) -> dict:
        row = {"model": self.bm.name, "tool": tool, "setting_name": setting_name, "setting": setting,
               "passes": passes, "status": "ok", "tool_seconds": res.get("seconds"),
               "tool_peak_rss_mib": res.get("peak_rss_mib")}
        if not res.get("ok"):
            row.update(status="error", error=res.get("error"), traceback=res.get("traceback"))
            self.log(f"  {tool} {setting_name}={setting:g} [{passes}]: {res.get('error')}")
            return row
        if not out.exists() or res["result"].get("verification_failed"):
            row.update(status="no model")
            self.log(f"  {tool} {setting_name}={setting:g} [{passes}]: no model written")
            return row
        if res["result"].get("stub"):
            row["note"] = "red_onnx.compress missing: stub copy of the input"
        try:
            row.update(self._measure(out))
        except Exception as exc:  # a result the bench cannot run or measure is a finding, not a crash
            row.update(status="unmeasurable result", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            self.log(f"  {tool} {setting_name}={setting:g} [{passes}]: {row['error']}")
            return row
        self.log(f"  {tool} {setting_name}={setting:g} [{passes}]: {self.bm.primary}={row['primary']:.4f} "
                 f"MACs {-row['macs_removed_pct']:+.1f}% params {-row['params_removed_pct']:+.1f}% "
                 f"dev {row['dev_normal']:.3g}/{row['dev_real']:.3g} lat x{row['latency_ratio']:.2f} "
                 f"({row['tool_seconds']:.1f} s)")
        return row

    def _measure(self, out: Path) -> dict:
        data = out.read_bytes()
        key = hashlib.sha1(data).hexdigest()
        if key not in self._seen:
            model = onnx.load_from_string(data)
            c = measure.cost(model, self.one)
            session_s, new = _timed_session(model)
            metrics = self.bm.evaluate(model, quick=self.plan.quick, sess=new)
            self._seen[key] = {
                "params_removed_pct": _pct(self.cost["params"], c["params"]),
                "macs_removed_pct": _pct(self.cost["macs"], c["macs"]),
                "bytes_removed_pct": _pct(self.cost["bytes"], c["bytes"]),
                "params": c["params"], "macs": c["macs"], "bytes": c["bytes"],
                "metrics": metrics, "primary": metrics[self.bm.primary],
                "drop": self.metrics[self.bm.primary] - metrics[self.bm.primary],
                "dev_normal": measure.deviation(None, new, self.normal, self.ref_normal),
                "dev_real": measure.deviation(None, new, self.real, self.ref_real),
                **measure.latency_ratio(self.latency_session, model, self.one, self.plan.latency_pairs),
                "result_sha1": key, "session_s": session_s,
            }
        return dict(self._seen[key])


def _timed_session(model: onnx.ModelProto, repeat: int = 3):
    """(median seconds to create a session with all graph optimizations on, the last session)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess = session(model)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), sess


def _pct(before: float, after: float) -> float:
    return 100.0 * (before - after) / before if before else 0.0


def _red_onnx_analyze(model: onnx.ModelProto, one_sample: dict):
    """red_onnx.analyze's params and MACs of the original, as a cross-check of measure.cost."""
    try:
        import red_onnx

        a = red_onnx.analyze(model, {k: (tuple(v.shape), v.dtype) for k, v in one_sample.items()})
        return {"params": int(a.params), "macs": int(a.macs)}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def _slim_report(rep: dict) -> dict:
    """red_onnx's report without the per-layer table (kept small in results.json)."""
    return {k: v for k, v in rep.items() if k not in ("layers",)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer settings, smaller evaluation sets, fewer latency pairs")
    parser.add_argument("--models", default=",".join(zoo.names()), help="comma-separated subset of: " + ", ".join(zoo.names()))
    parser.add_argument("--out", type=Path, default=None, help="RESULTS.md path (default bench/RESULTS.md, quick: bench/RESULTS_quick.md)")
    parser.add_argument("--skip-red-onnx", action="store_true", help="onnxsim rows only")
    parser.add_argument("--skip-onnxsim", action="store_true", help="red_onnx rows only")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' rows of the existing results file (complete a stopped run)")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    out_md = args.out or BENCH_DIR / ("RESULTS_quick.md" if plan.quick else "RESULTS.md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    info = tools.red_onnx_info()
    log(f"red_onnx: {info}")
    runner = measure.ToolRunner(["numpy", "onnx", "onnxruntime", "onnxsim", "red_onnx", "bench.tools"], plan.tool_timeout_s)
    log(f"tool child baseline peak RSS {runner.baseline_mib:.0f} MiB")
    out_json = out_md.with_name(out_md.stem.replace("RESULTS", "results") + ".json")
    models = [n.strip() for n in args.models.split(",")]
    results = {"environment": report.environment(plan.quick, info), "plan": plan.__dict__,
               "tool_child_baseline_rss_mib": runner.baseline_mib, "baselines": [], "rows": [], "complete": False}
    kept = _previous(out_json, models, plan.quick) if args.merge else None
    for name in models:
        mb = ModelBench(zoo.get(name), plan, runner, log)
        results["baselines"].append(mb.baseline)
        if not args.skip_onnxsim:
            results["rows"] += mb.onnxsim_rows()
        if not args.skip_red_onnx:
            results["rows"] += mb.red_onnx_rows(info)
        results["wall_seconds"] = time.perf_counter() - started
        out_json.write_text(json.dumps(_combined(results, kept), indent=1, default=_plain))  # survives a crash
    results["complete"] = True
    results = _combined(results, kept)
    out_json.write_text(json.dumps(results, indent=1, default=_plain))
    report.write_markdown(results, out_md, BENCH_DIR / "plots" / ("quick" if plan.quick else ""))
    log(f"wrote {out_md} and {out_json}")


def _previous(path: Path, models: list[str], quick: bool) -> dict | None:
    """The other models' baselines and rows of an existing results file, with where they come from."""
    if not path.exists():
        return None
    prev = json.loads(path.read_text())
    if (prev["environment"]["mode"] == "QUICK") != quick:
        raise SystemExit(f"--merge: {path} holds a {prev['environment']['mode']} run; run in the same mode")
    others = [b["model"] for b in prev["baselines"] if b["model"] not in models]
    env = prev["environment"]
    return {"baselines": [b for b in prev["baselines"] if b["model"] in others],
            "rows": [r for r in prev["rows"] if r["model"] in others],
            "source": {"models": others, "date": env["date"], "git_commit": env["git_commit"],
                       "wall_seconds": prev.get("wall_seconds")}}


def _combined(results: dict, kept: dict | None) -> dict:
    """This run's results plus the kept ones of an earlier run, in the zoo's model order."""
    if not kept or not kept["source"]["models"]:
        return results
    order = {n: i for i, n in enumerate(zoo.names())}
    out = dict(results)
    out["baselines"] = sorted(kept["baselines"] + results["baselines"], key=lambda b: order.get(b["model"], 99))
    out["rows"] = sorted(kept["rows"] + results["rows"], key=lambda r: order.get(r["model"], 99))  # stable
    out["merged_from"] = kept["source"]
    return out


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (np.ndarray, tuple, set)):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return str(v)


if __name__ == "__main__":
    main()
