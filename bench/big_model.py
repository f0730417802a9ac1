"""A model over 2 GB through the command line: wall time and peak memory.

    python -m bench.big_model                       # ~2.5 GB MLP, tolerance 0
    python -m bench.big_model --size-gb 0.3         # a quick try
    python -m bench.big_model --tolerance 0.05 --max-rss-gb 12

Builds, in a temporary folder, a synthetic MLP of float32 Gemm layers (``--width`` wide, as many as
make ``--size-gb``), weights written straight into one external-data file (the build never holds
more than one layer in memory), with ``--dup`` exactly duplicated neurons in a few hidden layers.
Runs ``python -m red_onnx IN OUT --report R`` on it as a subprocess, polling its resident memory
and killing it above ``--max-rss-gb`` (so a run that would swamp the machine stops early), and
prints one markdown row: wall time, peak RSS (``getrusage`` of the child), exit code, sizes, what
the report says. The temporary folder is removed afterwards unless ``--keep``.

Not part of the test suite (minutes, gigabytes of disk).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEADER = ("| model | layers × width | tolerance | exit | wall s | peak RSS GiB | in GiB | out GiB | params after | "
          "verified (deviation) | note |\n|---|---|---|---|---|---|---|---|---|---|---|")


def build(folder: Path, size_gb: float, width: int, dup: int, dup_layers: int, seed: int) -> tuple[Path, int]:
    """Write model.onnx + model.onnx.data into ``folder``; returns (model path, number of Gemm layers)."""
    layer_bytes = width * width * 4
    hidden = max(2, math.ceil(size_gb * 2**30 / layer_bytes))
    rng = np.random.default_rng(seed)
    planted = set(np.linspace(0, hidden - 2, dup_layers).astype(int).tolist()) if dup and dup_layers else set()
    data_path = folder / "model.onnx.data"
    nodes, inits = [], []
    offset = 0
    h = "x"
    widths = [width] * (hidden + 1) + [10]
    with open(data_path, "wb") as data:
        for k, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            w = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
            w *= np.float32(1 / math.sqrt(fan_in))
            b = (rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.1))
            if k in planted:
                for j in range(dup):  # neuron fan_out-1-j duplicates neuron j
                    w[fan_out - 1 - j] = w[j]
                    b[fan_out - 1 - j] = b[j]
            raw = w.tobytes()
            data.write(raw)
            tensor = TensorProto(name=f"w{k}", data_type=TensorProto.FLOAT, dims=list(w.shape),
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            del w, raw
            inits += [tensor, numpy_helper.from_array(b, f"b{k}")]
            nodes.append(helper.make_node("Gemm", [h, f"w{k}", f"b{k}"], [f"g{k}"], name=f"fc{k}", transB=1))
            h = f"g{k}"
            if k < len(widths) - 2:
                nodes.append(helper.make_node("Relu", [h], [f"r{k}"], name=f"relu{k}"))
                h = f"r{k}"
    graph = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench.big_model")
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path, len(widths) - 1


def run(args: list[str], max_rss_gb: float, timeout_s: float) -> tuple[int | None, float, float, float, str]:
    """(exit code or None if killed, wall s, peak RSS GiB from getrusage, peak polled GiB, stderr tail)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "red_onnx", *args], stdout=subprocess.DEVNULL, stderr=err,
                                text=True)
        polled, killed = 0.0, False
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20
            except (OSError, StopIteration):
                rss = 0.0
            polled = max(polled, rss)
            if rss > max_rss_gb or time.perf_counter() - start > timeout_s:
                proc.kill()
                killed = True
                break
            time.sleep(0.2)
        proc.wait()
        wall = time.perf_counter() - start
        err.seek(0)
        tail = err.read()[-3000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB
    if peak * 2**20 <= before:  # an earlier child peaked higher: fall back to the polled figure
        peak = polled
    return (None if killed else proc.returncode), wall, peak, polled, tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.5, help="weights in GiB (default 2.5)")
    p.add_argument("--width", type=int, default=2048, help="neurons per layer (default 2048: 16 MiB per layer)")
    p.add_argument("--dup", type=int, default=4, help="duplicated neurons per planted layer (default 4)")
    p.add_argument("--dup-layers", type=int, default=3, help="layers with duplicated neurons (default 3)")
    p.add_argument("--tolerance", type=float, default=0.0)
    p.add_argument("--max-rss-gb", type=float, default=15.0, help="kill the run above this resident memory")
    p.add_argument("--timeout", type=float, default=3600.0, help="kill the run after this many seconds")
    p.add_argument("--dir", help="parent of the temporary folder (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="red_onnx_big_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        model, layers = build(folder, args.size_gb, args.width, args.dup, args.dup_layers, args.seed)
        in_bytes = model.stat().st_size + (folder / "model.onnx.data").stat().st_size
        print(f"built {layers} Gemm layers, {in_bytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s "
              f"({folder})", file=sys.stderr, flush=True)
        out = folder / "out"
        out.mkdir()
        report_path = out / "report.json"
        code, wall, peak, polled, tail = run(
            [str(model), str(out / "small.onnx"), "--tolerance", str(args.tolerance), "--report", str(report_path),
             ], args.max_rss_gb, args.timeout)
        out_bytes = sum(f.stat().st_size for f in out.iterdir() if f.name != "report.json")
        note, params, verified = "", "", ""
        if code is None:
            note = f"killed: resident memory over {args.max_rss_gb:g} GiB or over {args.timeout:g} s"
        elif code != 0:
            note = ([line for line in tail.strip().splitlines() if not line.startswith("[")] or ["?"])[-1][:160]
        if report_path.exists():
            report = json.loads(report_path.read_text())
            params = f"{report['params_after']:,} / {report['params_before']:,}"
            verified = f"{report['verified']} ({report['output_deviation']:.2g})" \
                if report.get("output_deviation") is not None else str(report.get("verified"))
        row = (f"| synthetic MLP | {layers} × {args.width} | {args.tolerance:g} | "
               f"{'killed' if code is None else code} | {wall:.0f} | {peak:.2f} | {in_bytes / 2**30:.2f} | "
               f"{out_bytes / 2**30:.2f} | {params} | {verified} | {note} |")
        print(HEADER)
        print(row)
        print("\nred_onnx's log (tail):\n" + tail, file=sys.stderr)
        return 0 if code == 0 else 1
    finally:
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
