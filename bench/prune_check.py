"""Channel pruning against onnxsim's L2 pruner, and the latency guard, on every bench model, in one run.

    python -m bench.prune_check [--models a,b] [--tolerances 0.01,0.03,...] [--sparsities 0.1,0.2,...]

Per bench model, in this one process: the task metrics of the original; red_onnx with every pass (the
default) and with pruning alone at each tolerance (the model's input range as probe range, the latency
guard on); onnxsim 0.8.1's `simplify` + `apply_structured_pruning(sparsity, importance_norm='l2')` at each
sparsity. Each row: the task metrics on the model's full evaluation set, MACs / params / bytes after
/ before (red_onnx.analyze), the latency ratio to the original (red_onnx.verify.latency_ratio: one thread,
all optimizations on, median of 40 interleaved pairs, each timing repeats the run to 2 ms) and the tool's
seconds. "Within 1 point": the primary metric drops by at most 0.01 and, on the MTCNN nets (primary: AUC
under input noise), the clean accuracy too. Writes bench/prune_check.md and .json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnx

from .common import BENCH_DIR

CLEAN_TOO = {"mtcnn_rnet": "accuracy", "mtcnn_onet": "accuracy"}


def within(row: dict, clean: dict, model: str, primary: str) -> bool:
    ok = row["metrics"][primary] >= clean[primary] - 0.01
    extra = CLEAN_TOO.get(model)
    return ok and (extra is None or row["metrics"][extra] >= clean[extra] - 0.01)


class Rows:
    """One bench model, its original's task metrics, and the rows measured against it."""

    def __init__(self, name: str, log) -> None:
        from red_onnx.layers import analyze, input_specs

        from . import zoo

        self.name, self.log, self.rows = name, log, []
        self.bench = zoo.get(name)
        self.path = str(self.bench.build())
        self.original = onnx.load(self.path)
        self.shapes = {k: tuple(v.shape) for k, v in self.bench.real_inputs(1).items()}
        self.one = self.bench.real_inputs(1)
        self.specs = input_specs(self.original, self.shapes)
        self.before = analyze(self.original, self.specs)
        self.clean = self.bench.evaluate(self.path)
        log(f"{name}: clean {self.clean}")

    def add(self, tool: str, setting: str, model: onnx.ModelProto, seconds: float, extra: dict) -> dict:
        """A row: ``model``'s task metrics, MACs / params / bytes after ÷ before, latency ratio."""
        from red_onnx import verify
        from red_onnx.layers import analyze

        m = self.bench
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/m.onnx"
            onnx.save(model, out)
            metrics = m.evaluate(out)
        after = analyze(model, self.specs)
        ratio = verify.latency_ratio(self.original, model, self.one, pairs=40)[2]
        row = {"tool": tool, "setting": setting, "metrics": metrics, "macs": after.macs / self.before.macs,
               "params": after.params / self.before.params, "bytes": model.ByteSize() / self.original.ByteSize(),
               "latency": ratio, "seconds": round(seconds, 2), **extra}
        row["within"] = within(row, self.clean, self.name, m.primary)
        self.rows.append(row)
        self.log(f"  {tool} {setting}: {m.primary} {metrics[m.primary]:.4f} MACs {row['macs']:.3f} bytes "
                 f"{row['bytes']:.3f} latency {ratio:.3f} {seconds:.1f} s")
        return row

    def red_onnx(self, tolerances: list[float], passes: str = "all") -> None:
        """Rows of red_onnx.compress at each tolerance (the model's input range as probe range)."""
        import red_onnx

        for t in tolerances:
            start = time.perf_counter()
            model, report = red_onnx.compress(self.path, t, passes=None if passes == "all" else [passes],
                                              probe_ranges=self.bench.probe_range, input_shapes=self.shapes)
            self.add(f"red_onnx {passes}", f"tol {t:g}", model, time.perf_counter() - start,
                     {"deviation": report.output_deviation, "guard": report.latency.get("fixes", [])})

    def result(self) -> dict:
        return {"model": self.name, "primary": self.bench.primary, "clean": self.clean, "rows": self.rows}


def measure_rows(name: str, tolerances: list[float], prune_tolerances: list[float], sparsities: list[float], log
                 ) -> dict:
    from . import tools

    rows = Rows(name, log)
    rows.red_onnx(tolerances)
    rows.red_onnx(prune_tolerances, "prune")
    for s in sparsities:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            tools.onnxsim_prune(rows.path, f"{tmp}/p.onnx", s, f"{tmp}/s.onnx")
            seconds = time.perf_counter() - start
            rows.add("onnxsim", f"spa {s:g}", onnx.load(f"{tmp}/p.onnx"), seconds, {})
    return rows.result()


def table(results: list[dict]) -> list[str]:
    lines = ["| model | clean | red_onnx all passes | red_onnx pruning alone | onnxsim L2 pruning | red_onnx rows: "
             "highest latency ratio |", "|---|---|---|---|---|---|"]
    for res in results:
        p = res["primary"]
        cells = []
        for tool in ("red_onnx all", "red_onnx prune", "onnxsim"):
            ok = [r for r in res["rows"] if r["tool"] == tool and r["within"]]
            best = min(ok, key=lambda r: (r["macs"], r["bytes"]), default=None)
            cells.append("none within 1 point" if best is None else
                         f"MACs {best['macs'] - 1:+.1%}, file {best['bytes'] - 1:+.1%}, latency {best['latency']:.2f} "
                         f"({best['setting']}, {best['metrics'][p]:.4f})")
        ours = [r for r in res["rows"] if r["tool"].startswith("red_onnx")]
        worst = max(ours, key=lambda r: r["latency"])
        lines.append(f"| {res['model']} | {res['clean'][p]:.4f} | " + " | ".join(cells)
                     + f" | {worst['latency']:.2f} ({worst['tool'][9:]}, {worst['setting']}) |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    """Per model: primary metric against MACs removed, red_onnx (all passes, pruning alone) and onnxsim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=100, squeeze=False)
    styles = {"red_onnx all": ("o-", "tab:blue"), "red_onnx prune": ("^-", "tab:green"), "onnxsim": ("s-", "tab:orange")}
    for ax, res in zip(axes.ravel(), results):
        p, ref = res["primary"], res["clean"][res["primary"]]
        for tool, (marker, color) in styles.items():
            pts = sorted((r for r in res["rows"] if r["tool"] == tool), key=lambda r: 1 - r["macs"])
            ax.plot([100 * (1 - r["macs"]) for r in pts], [r["metrics"][p] for r in pts], marker, color=color,
                    label=tool, ms=4)
            bad = [r for r in pts if not r["within"] and r["metrics"][p] >= ref - 0.01]
            ax.plot([100 * (1 - r["macs"]) for r in bad], [r["metrics"][p] for r in bad], "x", color="red", ms=8)
        ax.axhline(ref - 0.01, color="grey", lw=0.8, ls="--")
        ax.set_ylim(max(0.0, ref - 0.1), min(1.01, ref + 0.03))
        ax.set_title(res["model"], fontsize=9)
        ax.set_xlabel("MACs removed (%)", fontsize=8)
        ax.set_ylabel(p, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(results):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("within 1 point: above the dashed line (red x: the clean accuracy of an MTCNN net dropped more)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def row_lines(results: list[dict], guard: bool) -> list[str]:
    """Every row: primary metric, MACs / params / bytes after ÷ before (a peer's MACs and params:
    "unchanged", as red_onnx.analyze counts float ops only), latency ratio, tool seconds, red_onnx's
    measured deviation (and, with ``guard``, what its latency guard did); a peer that failed, why."""
    lines = ["Every row: primary metric, MACs / params / bytes after ÷ before, latency ratio, tool seconds, "
             "red_onnx's measured deviation" + (" and what its latency guard did." if guard else "."), "",
             "| model | tool | setting | metric | within | MACs | params | bytes | latency | s | deviation |"
             + (" guard |" if guard else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if guard else "")]
    for res in results:
        for r in res["rows"]:
            if "failed" in r:
                lines.append(f"| {res['model']} | {r['tool']} | | failed: {r['failed']} | | | | | | | |"
                             + (" |" if guard else ""))
                continue
            dev = f"{r['deviation']:.3g}" if r.get("deviation") is not None else ""
            ratios = ["unchanged" if r[k] is None else f"{r[k]:.3f}" for k in ("macs", "params")]
            line = (f"| {res['model']} | {r['tool']} | {r['setting']} | {r['metrics'][res['primary']]:.4f} | "
                    f"{'yes' if r['within'] else 'no'} | {ratios[0]} | {ratios[1]} | {r['bytes']:.3f} | "
                    f"{r['latency']:.2f} | {r['seconds']:.1f} | {dev} |")
            if guard:
                line += " " + "; ".join(f"{g['fix']} (was {g['ratio_before']:.2f})" for g in r.get("guard", [])) + " |"
            lines.append(line)
    return lines


def save(results: list[dict], out: Path, commit: str, minutes: float, lines: list[str]) -> None:
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"commit": commit, "minutes": round(minutes, 1),
                                                    "results": results}, indent=1))
    print("\n".join(lines))


def run_models(models: list[str], out: Path, rewrite: bool, measure, write) -> None:
    """``measure(name, log)`` per model (its results saved after each), then ``write(results, out,
    commit, minutes)``; with ``rewrite``, only ``write`` again from the saved .json."""
    import subprocess

    out.parent.mkdir(parents=True, exist_ok=True)
    if rewrite:
        saved = json.loads(out.with_suffix(".json").read_text())
        write(saved["results"], out, saved["commit"], saved["minutes"])
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    start = time.perf_counter()
    results = []
    for name in models:
        results.append(measure(name, lambda msg: print(msg, flush=True)))
        out.with_suffix(".json").write_text(json.dumps({"commit": commit, "minutes": None, "results": results}))
    write(results, out, commit, (time.perf_counter() - start) / 60)


def parser(doc: str, out: str, tolerances_help: str) -> argparse.ArgumentParser:
    """A check's command line: --models, --tolerances (of its red_onnx rows), --out, --rewrite."""
    from . import zoo

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(zoo.names()))
    p.add_argument("--tolerances", default="0.003,0.01,0.03,0.1,0.3,0.5,1", help=tolerances_help)
    p.add_argument("--out", default=str(BENCH_DIR / out))
    p.add_argument("--rewrite", action="store_true", help="write the .md and the plot again from the .json")
    return p


def header(title: str, script: str, doc: str, commit: str, minutes: float, plot_alt: str) -> list[str]:
    """A check's .md opening: title, what it measures (the docstring's third paragraph), wall time, plot."""
    name = script.removesuffix(".py")
    return [f"# {title} (bench/{script}, commit {commit})", "", doc.split("\n\n")[2].replace("\n", " "), "",
            f"Wall time {minutes:.0f} min on this 2-core machine.", "", f"![{plot_alt}](plots/{name}.png)", ""]


def write(results: list[dict], out: Path, commit: str, minutes: float) -> None:
    """bench/prune_check.md (headline table, plot, every row) and the plot."""
    lines = header("Channel pruning against onnxsim, and the latency guard", "prune_check.py", __doc__, commit,
                   minutes, "metric against MACs removed")
    lines += ["Most MACs removed within 1 point, per tool (then the smaller file):", ""] + table(results)
    lines += [""] + row_lines(results, guard=True)
    plot(results, BENCH_DIR / "plots" / "prune_check.png")
    save(results, out, commit, minutes, lines)


def main() -> None:
    p = parser(__doc__, "prune_check.md", "of the all-passes rows")
    p.add_argument("--prune-tolerances", default="0.03,0.1,0.3,1", help="of the pruning-alone rows")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.5")
    args = p.parse_args()
    tolerances = [float(t) for t in args.tolerances.split(",")]
    prune_tolerances = [float(t) for t in args.prune_tolerances.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    run_models(args.models.split(","), Path(args.out), args.rewrite,
               lambda name, log: measure_rows(name, tolerances, prune_tolerances, sparsities, log), write)


if __name__ == "__main__":
    main()
