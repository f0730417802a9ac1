"""File size against onnxruntime's int8 and float16 conversions, on every bench model, in one run.

    python -m bench.quant_check [--models a,b] [--tolerances 0.003,0.01,...]

The data-free alternatives a user would pick to make a model file smaller, beside red_onnx (every pass,
the default codebook, at each tolerance; the model's input range as probe range, the latency guard on):
onnxruntime's `quantize_dynamic` with int8 weights, one scale per tensor and per output channel (its
default op set: the convs run as ConvInteger), the same on MatMul and Gemm only (the convs stay float),
and onnxruntime's float16 converter (float32 inputs and outputs kept). Each row: the task metrics on the
model's full evaluation set, MACs / params / bytes after ÷ before, the latency ratio to the original
(red_onnx.verify.latency_ratio: one thread, all optimizations on, median of 40 interleaved pairs) and
the tool's seconds. "Within 1 point" as in bench/prune_check.py. Writes bench/quant_check.md and .json,
and the plot plots/quant_check.png.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx

from .common import BENCH_DIR
from .prune_check import Rows, header, parser, row_lines, run_models, save

PEERS = {  # row label → the tools function and its arguments
    "int8 per tensor": ("ort_int8", {"per_channel": False}),
    "int8 per channel": ("ort_int8", {"per_channel": True}),
    "int8 MatMul/Gemm": ("ort_int8", {"per_channel": True, "op_types": ["MatMul", "Gemm"]}),
    "float16": ("ort_fp16", {}),
}
TOOLS = ["red_onnx all"] + list(PEERS)


def measure(name: str, tolerances: list[float], log) -> dict:
    import onnxruntime.quantization  # noqa: F401 (imported before the timings, as red_onnx is)
    import onnxruntime.quantization.shape_inference  # noqa: F401 (quant_pre_process: 2.2 s on its first call)
    import onnxruntime.transformers.float16  # noqa: F401

    from . import tools

    rows = Rows(name, log)
    rows.red_onnx(tolerances)
    for label, (function, kwargs) in PEERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            try:
                info = getattr(tools, function)(rows.path, f"{tmp}/q.onnx", **kwargs)
            except Exception as err:  # a peer that fails on a model is a row that says so
                rows.rows.append({"tool": label, "setting": "", "failed": f"{type(err).__name__}: {err}"[:200]})
                log(f"  {label}: failed: {err}")
                continue
            row = rows.add(label, "", onnx.load(f"{tmp}/q.onnx"), time.perf_counter() - start, info)
            row["macs"] = row["params"] = None  # the same counts in other types: the bytes and the latency compare
    return rows.result()


def _cell(row: dict | None, primary: str) -> str:
    if row is None:
        return "none within 1 point"
    if "failed" in row:
        return "failed"
    setting = f"{row['setting']}, " if row["setting"] else ""
    return (f"file {row['bytes'] - 1:+.1%}, latency {row['latency']:.2f} ({setting}{row['metrics'][primary]:.4f}"
            f"{'' if row['within'] else ', over 1 point'})")


def table(results: list[dict]) -> list[str]:
    """Per model and tool, the smallest file within 1 point (red_onnx), or the one row (a peer)."""
    lines = ["| model | clean | " + " | ".join(TOOLS) + " |", "|---|---|" + "---|" * len(TOOLS)]
    for res in results:
        p = res["primary"]
        cells = []
        for tool in TOOLS:
            rows = [r for r in res["rows"] if r["tool"] == tool]
            if tool.startswith("red_onnx"):
                rows = [r for r in rows if r["within"]]
                cells.append(_cell(min(rows, key=lambda r: (r["bytes"], r["latency"]), default=None), p))
            else:
                cells.append(_cell(rows[0] if rows else None, p))
        lines.append(f"| {res['model']} | {res['clean'][p]:.4f} | " + " | ".join(cells) + " |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    """Per model: the primary metric (top) and the latency ratio (bottom) against the file size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    pairs = -(-len(results) // cols)
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(4.2 * cols, 3.0 * 2 * pairs), dpi=100, squeeze=False)
    styles = {"red_onnx all": ("o-", "tab:blue"), "int8 per tensor": ("s", "tab:red"),
              "int8 per channel": ("D", "tab:orange"), "int8 MatMul/Gemm": ("v", "tab:purple"),
              "float16": ("^", "tab:green")}
    for k, res in enumerate(results):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        p, ref = res["primary"], res["clean"][res["primary"]]
        for tool, (marker, color) in styles.items():
            pts = sorted((r for r in res["rows"] if r["tool"] == tool and "failed" not in r), key=lambda r: r["bytes"])
            x = [100 * r["bytes"] for r in pts]
            top.plot(x, [r["metrics"][p] for r in pts], marker, color=color, label=tool, ms=5)
            bottom.plot(x, [r["latency"] for r in pts], marker, color=color, label=tool, ms=5)
        top.axhline(ref - 0.01, color="grey", lw=0.8, ls="--")
        top.set_ylim(max(0.0, ref - 0.1), min(1.01, ref + 0.03))
        bottom.axhline(1.0, color="grey", lw=0.8, ls="--")
        top.set_title(res["model"], fontsize=9)
        top.set_ylabel(p, fontsize=8)
        bottom.set_ylabel("latency / original's", fontsize=8)
        bottom.set_xlabel("file size (% of the original's)", fontsize=8)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    for k in range(len(results), pairs * cols):
        axes[2 * (k // cols), k % cols].axis("off")
        axes[2 * (k // cols) + 1, k % cols].axis("off")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("top: within 1 point above the dashed line; bottom: slower than the original above it", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write(results: list[dict], out: Path, commit: str, minutes: float) -> None:
    lines = header("File size against int8 and float16 conversions", "quant_check.py", __doc__, commit, minutes,
                   "metric and latency against file size")
    lines += ["Per tool: red_onnx's smallest file within 1 point; each peer's one result (file size and latency "
              "against the original's, then the primary metric):", ""] + table(results)
    lines += [""] + row_lines(results, guard=False)
    plot(results, BENCH_DIR / "plots" / "quant_check.png")
    save(results, out, commit, minutes, lines)


def main() -> None:
    args = parser(__doc__, "quant_check.md", "of the red_onnx rows").parse_args()
    tolerances = [float(t) for t in args.tolerances.split(",")]
    run_models(args.models.split(","), Path(args.out), args.rewrite,
               lambda name, log: measure(name, tolerances, log), write)


if __name__ == "__main__":
    main()
