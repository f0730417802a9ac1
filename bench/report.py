"""RESULTS.md from the benchmark's results: environment, headlines, Spearman, onnxsim check, full table, plots."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

from red_onnx.cli import DEFAULT_TOLERANCE

from .common import REPO_DIR
from .families.base import WITHIN_ONE_POINT, within_one_point

PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxsim", "onnx-graphsurgeon", "numba", "torch", "scikit-image",
            "scikit-learn", "captcha", "Pillow", "matplotlib", "scipy")


def environment(quick: bool, red_onnx_info: dict) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "none"
    except Exception:
        commit = "unknown"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "QUICK" if quick else "full",
        "nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem / 2**20, 1),
        "python": platform.python_version(), "packages": versions,
        "red_onnx": {k: v for k, v in red_onnx_info.items()}, "git_commit": commit,
    }


# ------------------------------------------------------------------------------------------ analysis


def guards(baseline: dict) -> list[str]:
    """The model's guard metrics (results files written before guards existed: from the zoo)."""
    if "guards" in baseline:
        return baseline["guards"]
    from . import zoo

    return list(zoo.get(baseline["model"]).guards)


def within(r: dict, baseline: dict) -> bool:
    """A measured row within 1 point: primary and guard metrics each dropped by at most 0.01."""
    return r["status"] == "ok" and within_one_point(baseline["metrics"], r["metrics"], [baseline["primary"], *guards(baseline)])


def headline(rows: list[dict], baseline: dict) -> dict:
    """Per tool: the rows with the most MACs and the most params removed within 1 point of the metric."""
    out = {}
    for tool in ("red_onnx", "onnxsim"):
        ok = [r for r in rows if r["tool"] == tool and within(r, baseline)]
        if not ok:
            out[tool] = None
            continue
        by_macs = max(ok, key=lambda r: (r["macs_removed_pct"], r["params_removed_pct"]))
        by_params = max(ok, key=lambda r: (r["params_removed_pct"], r["macs_removed_pct"]))
        out[tool] = {"macs": by_macs, "params": by_params}
    return out


def spearman(rows: list[dict]) -> tuple[float | None, int]:
    """Spearman rank correlation of N(0,1) deviation and metric drop over the red_onnx rows; None when either
    is constant or fewer than 3 rows."""
    from scipy.stats import spearmanr

    ok = [r for r in rows if r["tool"] == "red_onnx" and r["status"] == "ok"]
    dev = np.array([r["dev_normal"] for r in ok], dtype=float)
    drop = np.array([r["drop"] for r in ok], dtype=float)
    if len(ok) < 3 or np.ptp(dev) == 0 or np.ptp(drop) == 0:
        return None, len(ok)
    return float(spearmanr(dev, drop).statistic), len(ok)


# ------------------------------------------------------------------------------------------- plotting


def plot(rows: list[dict], baseline: dict, path: Path) -> None:
    """Primary metric vs MACs removed %, both tools."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = baseline["metrics"][baseline["primary"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ok = [r for r in rows if r["status"] == "ok"]
    sim = sorted((r for r in ok if r["tool"] == "onnxsim"), key=lambda r: r["setting"])
    if sim:
        ax.plot([r["macs_removed_pct"] for r in sim], [r["primary"] for r in sim], "s-", color="tab:orange",
                label="onnxsim L2 pruning (sparsity)")
        for r in sim:
            ax.annotate(f"{r['setting']:g}", (r["macs_removed_pct"], r["primary"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color="tab:orange")
    red = [r for r in ok if r["tool"] == "red_onnx"]
    labels = list(dict.fromkeys(r["passes"] for r in red))
    markers = "o^vD<>px"
    for i, label in enumerate(labels):
        pts = sorted((r for r in red if r["passes"] == label), key=lambda r: r["setting"])
        main = i == 0
        ax.plot([r["macs_removed_pct"] for r in pts], [r["primary"] for r in pts], markers[i % len(markers)] + ("-" if main else ""),
                color="tab:blue" if main else None, alpha=1.0 if main else 0.6, label=f"red_onnx {label} (tolerance)")
        if main:
            for r in pts:
                ax.annotate(f"{r['setting']:g}", (r["macs_removed_pct"], r["primary"]), fontsize=7,
                            xytext=(3, -9), textcoords="offset points", color="tab:blue")
    failed = [r for r in ok if not within(r, baseline) and ref - r["primary"] <= WITHIN_ONE_POINT + 1e-12]
    if failed:
        ax.plot([r["macs_removed_pct"] for r in failed], [r["primary"] for r in failed], "x", color="red", ms=9,
                label=f"guard metric ({', '.join(guards(baseline))}) dropped > 1 point")
    ax.axhline(ref, color="grey", lw=0.8)
    ax.axhline(ref - WITHIN_ONE_POINT, color="grey", lw=0.8, ls="--", label="1 point below the original")
    ax.set_xlabel("MACs removed (%)")
    ax.set_ylabel(baseline["primary"])
    ax.set_title(baseline["model"])
    ax.set_ylim(bottom=max(-0.02, min([r["primary"] for r in ok] + [ref]) - 0.05), top=min(1.02, ref + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- markdown


def _f(v, fmt: str = ".3g", none: str = "") -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return none
    return format(v, fmt)


def _secondary(r: dict, primary: str) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in r.get("metrics", {}).items() if k != primary)


def _chg(removed_pct: float) -> str:
    """A removed-% as a signed change: 12.5 -> "-12.5%", -0.1 (grew) -> "+0.1%"."""
    return f"{-removed_pct:+.1f}%".replace("-0.0%", "0.0%").replace("+0.0%", "0.0%")


def _head_cell(h) -> str:
    if h is None:
        return "none within 1 point"
    m, p = h["macs"], h["params"]
    if m["macs_removed_pct"] < 0.05 and p["params_removed_pct"] < 0.05:
        return "no MACs or params removed within 1 point"

    def s(r):
        return f"{r['setting_name'][:3]} {r['setting']:g}" + (f" [{r['passes']}]" if r["tool"] == "red_onnx" else "") + f", {r['primary']:.3f}"

    text = f"MACs {_chg(m['macs_removed_pct'])}, params {_chg(m['params_removed_pct'])} ({s(m)})"
    if p["params_removed_pct"] >= m["params_removed_pct"] + 0.05:
        text += f"; params {_chg(p['params_removed_pct'])}, MACs {_chg(p['macs_removed_pct'])} ({s(p)})"
    return text


def write_markdown(results: dict, path: Path, plot_dir: Path) -> None:
    env, rows, baselines = results["environment"], results["rows"], results["baselines"]
    quick = env["mode"] == "QUICK"
    lines = []
    title = "# red_onnx benchmark" + (" — QUICK MODE (fewer settings, smaller eval sets; not the reference numbers)" if quick else "")
    lines += [title, "", "Regenerated by `python -m bench.run" + (" --quick" if quick else "") + "`; machine-readable: "
              f"`{path.with_name(path.stem.replace('RESULTS', 'results') + '.json').name}`.", ""]
    if not results.get("complete", True):
        lines += ["**PARTIAL RESULTS: the run stopped before every model was measured.**", ""]
    if results.get("merged_from"):
        src = results["merged_from"]
        lines += [f"Rows of {', '.join(src['models'])} come from an earlier run ({src['date']}, commit "
                  f"{src['git_commit']}); the header below describes the run of the other models.", ""]
    if results.get("parallel_runs"):
        lines += ["Measured by side-by-side runs of `bench.run --models ...` (one per CPU core, so latency pairs "
                  "shared the machine with the other run), combined with `bench.report --combine`: " +
                  "; ".join(f"{', '.join(p['models'])} ({p['wall_seconds'] / 60:.0f} min, commit {p['git_commit']})"
                            for p in results["parallel_runs"]) + ".", ""]
    reruns = {}  # commit -> passes -> model -> tolerances re-measured
    for r in rows:
        if r.get("rerun_commit"):
            reruns.setdefault(r["rerun_commit"], {}).setdefault(r["passes"], {}).setdefault(r["model"], set()).add(
                r["setting"])
    for commit, by_passes in reruns.items():
        parts = []
        for passes, by_model in sorted(by_passes.items()):
            groups = {}  # the same tolerances: one phrase for their models
            for model, settings in sorted(by_model.items()):
                every = settings == {r["setting"] for r in rows if r["passes"] == passes and r["model"] == model
                                     and r["tool"] == "red_onnx"}
                groups.setdefault("" if every else tuple(sorted(settings)), []).append(model)
            for settings, models in groups.items():
                at = f" at tolerance {', '.join(f'{t:g}' for t in settings)}" if settings else ""
                parts.append(f"{passes!r}{at} of {', '.join(models)}")
        lines += [f"Rows {'; '.join(parts)} were re-measured at commit {commit} (`python -m bench.rerun_rows`), after "
                  "a change that affects only those rows; the other rows are from the run described below.", ""]
    pk = env["packages"]
    red = env["red_onnx"]
    red_state = (f"red_onnx {red.get('version')} (passes: {', '.join(red['passes']) or 'none yet: canonicalization only'})"
                 if red.get("available") else f"red_onnx unavailable ({red.get('why')}): its rows are a stub copy")
    lines += [
        f"- date: {env['date']}; wall time of this run: {results['wall_seconds'] / 60:.1f} min; git commit {env['git_commit']}",
        f"- machine: {env['nproc']} CPUs ({env['cpu']}), {env['memory_gib']} GiB RAM; Python {env['python']}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in pk.items()),
        f"- {red_state}",
        f"- plan: tolerances {', '.join(f'{t:g}' for t in results['plan']['tolerances'])}; onnxsim sparsities "
        f"{', '.join(f'{s:g}' for s in results['plan']['sparsities'])}; each pass alone: "
        f"{'yes' if results['plan']['ablation'] else 'no'}; latency pairs {results['plan']['latency_pairs']}; "
        f"deviation samples {results['plan']['deviation_samples']}",
        "",
        "## How to read",
        "",
        "- **primary**: the model's task metric (higher is better, 0..1); **drop** = original − compressed; "
        "\"within 1 point\" = drop ≤ 0.01, and for the MTCNN nets (primary: AUC under input noise, which is blind "
        "to calibration shifts) the clean accuracy must also drop by ≤ 0.01.",
        "- **params/MACs/bytes −%**: weight elements of initializers and Constant tensors (float, and integer codes "
        "that store weights: a hashed weight stored as a codebook index still counts, its codebook too; int64 shape "
        "vectors do not), multiply-accumulates at "
        "batch 1 (Conv: output elements × C_in/group × kernel; Gemm/MatMul: M×K×N; shapes measured by onnxruntime "
        "on a real input), serialized model size.",
        "- **dev N(0,1)** / **dev real**: max over samples and outputs of ‖y′−y‖₂/‖y‖₂ (float64) against the original, "
        "on N(0,1) probes / on real evaluation inputs (same shapes).",
        "- **latency**: compressed/original, median of per-pair ratios over interleaved pairs of single batch-1 runs, "
        "onnxruntime CPU, intra_op_num_threads=1, all graph optimizations on.",
        f"- **tool s / peak MiB**: wall time of the tool call and peak RSS (VmHWM from /proc/self/status) of the child "
        f"process that ran it, forked from a forkserver that preloaded numpy/onnx/onnxruntime/onnxsim/red_onnx; an idle "
        f"child peaks at {results['tool_child_baseline_rss_mib']:.0f} MiB, included in every number.",
        "- **onnxsim** rows run `onnxsim.simplify` (exact; folds BN and per-channel Mul/Add into convs, without which "
        "most chains are not matched) then `onnxsim.apply_structured_pruning(sparsity, importance_norm='l2')`.",
        "",
        "## Models (original)",
        "",
        "| model | primary | clean metrics | params | MACs | = red_onnx.analyze | eval s | description |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in baselines:
        ms = ", ".join(f"{k}={v:.4f}" for k, v in b["metrics"].items())
        a = b.get("red_onnx_analyze") or {}
        agree = ("yes" if (a.get("params"), a.get("macs")) == (b["params"], b["macs"])
                 else f"no ({a.get('params')}, {a.get('macs')})" if "macs" in a else "n/a")
        lines.append(f"| {b['model']} | {b['primary']} | {ms} | {b['params']:,} | {b['macs']:,} | {agree} | "
                     f"{b['eval_seconds']:.1f} | {b['description']} |")
    lines += ["", "## Headline: largest reduction within 1 point of the primary metric", "",
              "Most MACs removed within 1 point (then, if another row removes more params, that row).", "",
              "| model | red_onnx | onnxsim |", "|---|---|---|"]
    by_model = {b["model"]: [r for r in rows if r["model"] == b["model"]] for b in baselines}
    for b in baselines:
        h = headline(by_model[b["model"]], b)
        lines.append(f"| {b['model']} | {_head_cell(h['red_onnx'])} | {_head_cell(h['onnxsim'])} |")
    lines += _bytes_section(by_model, baselines)
    lines += ["", "## Does N(0,1) deviation rank the damage? Spearman(dev N(0,1), drop) over red_onnx rows", "",
              "| model | Spearman | rows |", "|---|---|---|"]
    for b in baselines:
        rho, n = spearman(by_model[b["model"]])
        lines.append(f"| {b['model']} | {'n/a (constant)' if rho is None else f'{rho:.2f}'} | {n} |")
    lines += _onnxsim_section(rows, baselines)
    lines += _failures(rows)
    lines += ["", "## Pareto plots (primary metric vs MACs removed)", ""]
    for b in baselines:
        png = plot_dir / f"{b['model']}.png"
        plot(by_model[b["model"]], b, png)
        lines.append(f"![{b['model']}]({os.path.relpath(png, path.parent)})")
    lines += ["", "## All rows", "",
              "| model | tool | setting | passes | params −% | MACs −% | bytes −% | primary | other metrics | drop | "
              "≤ 1 pt | dev N(0,1) | dev real | latency | session s | tool s | peak MiB | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in baselines:
        lines.append(f"| {b['model']} | original | | | 0 | 0 | 0 | {b['metrics'][b['primary']]:.4f} | "
                     f"{_secondary({'metrics': b['metrics']}, b['primary'])} | | | | | 1 | {_f(b.get('session_s'), '.3f')} | | | |")
        for r in by_model[b["model"]]:
            setting = f"{r['setting_name'][:3]} {r['setting']:g}"
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | {r['tool']} | {setting} | {r['passes']} | | | | | | | | | | | | "
                             f"{_f(r.get('tool_seconds'), '.1f')} | {_f(r.get('tool_peak_rss_mib'), '.0f')} | {r['status']} |")
                continue
            status = "ok" if r["tool"] != "onnxsim" else ("ok" if r["onnxsim_check"]["equal"] else "≠ zeroed ref")
            if r.get("note"):
                status += f" ({r['note']})"
            lines.append(
                f"| {r['model']} | {r['tool']} | {setting} | {r['passes']} | {r['params_removed_pct']:.2f} | "
                f"{r['macs_removed_pct']:.2f} | {r['bytes_removed_pct']:.2f} | {r['primary']:.4f} | "
                f"{_secondary(r, b['primary'])} | {r['drop']:+.4f} | {'yes' if within(r, b) else 'no'} | "
                f"{_f(r['dev_normal'])} | {_f(r['dev_real'])} | "
                f"{r['latency_ratio']:.3f} | {_f(r.get('session_s'), '.3f')} | {_f(r['tool_seconds'], '.1f')} | {_f(r['tool_peak_rss_mib'], '.0f')} | {status} |")
    notes = path.with_name(path.stem + "_notes.md")  # hand-written notes survive regeneration
    if notes.exists():
        kept = [ln for ln in notes.read_text().splitlines() if not ln.startswith("<!--")]
        lines += [""] + "\n".join(kept).strip("\n").splitlines()
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def _bytes_section(by_model: dict, baselines: list[dict]) -> list[str]:
    """File size: smallest red_onnx file within 1 point, the default tolerance, session creation, hash speed."""
    lines = ["", "## File size (uncompressed bytes) and session creation", "",
             "Smallest red_onnx file within 1 point of the primary metric, and the full pipeline at the CLI's "
             f"default tolerance {DEFAULT_TOLERANCE:g}. **session s**: median of 3 onnxruntime session creations (all graph "
             "optimizations on; the codebook chains are folded there). **hash pass**: the hash pass's own seconds "
             "(budget checks included) in the hash-only row at 0.01, as model weights per second.", "",
             "| model | original | smallest within 1 pt | × smaller | its setting | session s (orig → it) "
             f"| default {DEFAULT_TOLERANCE:g} [all] | hash pass at 0.01 |", "|---|---|---|---|---|---|---|---|"]
    for b in baselines:
        ok = [r for r in by_model[b["model"]] if r["tool"] == "red_onnx" and r["status"] == "ok"]
        best = min((r for r in ok if within(r, b)), key=lambda r: r["bytes"], default=None)
        default = next((r for r in ok if r["passes"] == "all" and r["setting"] == DEFAULT_TOLERANCE), None)
        hashed = next((r for r in ok if r["passes"] == "hash" and r["setting"] == 0.01), None)
        secs = next((p["seconds"] for p in (hashed or {}).get("red_onnx_report", {}).get("passes", [])
                     if p["name"] == "hash"), None)
        speed = f"{secs:.1f} s, {b['params'] / secs:,.0f} weights/s" if secs else ""
        cells = [f"{b['bytes']:,}"]
        cells += ([f"{best['bytes']:,}", f"{b['bytes'] / best['bytes']:.2f}", f"tol {best['setting']:g} [{best['passes']}]",
                   f"{_f(b.get('session_s'), '.3f')} → {_f(best.get('session_s'), '.3f')}"] if best else ["none", "", "", ""])
        cells += [f"{default['bytes']:,} ({b['bytes'] / default['bytes']:.2f}×)" if default else "", speed]
        lines.append(f"| {b['model']} | " + " | ".join(cells) + " |")
    return lines


def _onnxsim_section(rows: list[dict], baselines: list[dict]) -> list[str]:
    lines = ["", "## onnxsim: is its output the original with the pruned channels zeroed?", "",
             "For each onnxsim result the bench rebuilds, in weight space, its input (the simplified model) with every "
             "slice that onnxsim removed set to 0, and compares outputs with onnxruntime on real and N(0,1) inputs. "
             "\"rounding floor\" is the deviation between graph-optimized and unoptimized sessions of the same models: "
             "a destroyed model can be so ill-conditioned that float rounding alone moves its outputs.", "",
             "| model | sparsity | resized tensors | elements removed | max deviation vs zeroed ref | rounding floor | equal | findings |",
             "|---|---|---|---|---|---|---|---|"]
    defects = []
    for r in rows:
        if r["tool"] != "onnxsim":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['setting']:g} | | | | | | onnxsim failed: {r.get('error', r['status'])} |")
            defects.append(f"{r['model']} at sparsity {r['setting']:g}: onnxsim failed ({r.get('error', r['status'])})")
            continue
        c = r["onnxsim_check"]
        lines.append(f"| {r['model']} | {r['setting']:g} | {c['resized_tensors']} | {c['removed_elements']:,} | "
                     f"{_f(c['max_deviation'])} | {_f(c.get('rounding_floor'))} | {'yes' if c['equal'] else '**no**'} | "
                     f"{'; '.join(c['findings'])} |")
        if not c["equal"] or c["findings"]:
            defects.append(f"{r['model']} at sparsity {r['setting']:g}: {'; '.join(c['findings'])}")
        if r.get("simplify_deviation", 0) > 1e-4:
            defects.append(f"{r['model']}: onnxsim.simplify alone deviates by {r['simplify_deviation']:.3g}")
    unmatched = sorted({r["model"] for r in rows if r["tool"] == "onnxsim" and r["status"] == "ok"
                        and r["onnxsim_check"]["resized_tensors"] == 0})
    lines += [""]
    lines.append("**Defects found:** " + ("none: every result equals its zeroed-channel reference within float rounding, "
                                          "so the rows measure the method." if not defects else ""))
    lines += [f"- {d}" for d in defects]
    if unmatched:
        lines.append(f"\nNo chain matched (nothing pruned) on: {', '.join(unmatched)}.")
    return lines


def _failures(rows: list[dict]) -> list[str]:
    bad = [r for r in rows if r["tool"] == "red_onnx" and r["status"] != "ok"]
    if not bad:
        return []
    lines = ["", "## red_onnx runs without a measurable model", ""]
    for r in bad:
        lines.append(f"- {r['model']} tolerance {r['setting']:g} [{r['passes']}]: {r['status']}: {str(r.get('error'))[:300]}")
    return lines


def combine(parts: list[dict]) -> dict:
    """One results dict from runs of disjoint model sets made side by side (same plan and commit)."""
    from .zoo import names

    order = {n: i for i, n in enumerate(names())}
    out = dict(parts[0])
    out["baselines"] = sorted((b for p in parts for b in p["baselines"]), key=lambda b: order.get(b["model"], 99))
    out["rows"] = sorted((r for p in parts for r in p["rows"]), key=lambda r: order.get(r["model"], 99))
    out["complete"] = set(names()) <= {b["model"] for b in out["baselines"]}  # a model's rows land with its baseline
    out["wall_seconds"] = max(p.get("wall_seconds", 0.0) for p in parts)
    out["parallel_runs"] = [{"models": [b["model"] for b in p["baselines"]], "git_commit": p["environment"]["git_commit"],
                             "wall_seconds": p.get("wall_seconds")} for p in parts]
    return out


def main() -> None:
    """`python -m bench.report bench/results.json`: rewrite RESULTS.md (and plots) from a results file, e.g. the
    partial one a crashed or stopped run left."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RESULTS[_quick].md beside the results file")
    parser.add_argument("--combine", type=Path, nargs="*", default=[],
                        help="results files of runs of other models made at the same time (one per CPU core): "
                             "their models are added to RESULTS, and the combined file replaces RESULTS")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    if args.combine:
        results = combine([results] + [json.loads(p.read_text()) for p in args.combine])
        args.results.write_text(json.dumps(results, indent=1))
    quick = results["environment"]["mode"] == "QUICK"
    out = args.out or args.results.with_name("RESULTS_quick.md" if quick else "RESULTS.md")
    results.setdefault("wall_seconds", float("nan"))
    write_markdown(results, out, args.results.parent / "plots" / ("quick" if quick else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
