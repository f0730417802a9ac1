"""How far above the floor red_onnx runs: every bench model and two larger ones, one run each.

    python -m bench.speed                          # all models -> bench/speed.md, bench/speed.json
    python -m bench.speed --models vgg11_224,mobilenet_v2 --repeats 1

Per model, each in a fresh process:
- **floor**: import onnx and onnxruntime, load the model, create one onnxruntime session, run 24
  single-sample probes through it (16 allocation + 8 verification probes, the tool's probes before
  verification took 64), save it. Fixed on purpose: the tool's 64 verification probes must fit
  within it by batching.
- ``python -m red_onnx IN OUT`` at the default tolerance (0.003), at 0.01 and at 0.03, and one
  call with ``--tolerance 0.003,0.01,0.03,0.1`` (one profile, four verified outputs).
The floor, the 0.03 call and the 4-tolerance call run REPEATS times (the two calls interleaved)
and their medians are reported: one reading of the 4-tolerance ratio moved by up to 10% between
runs of this bench on this 2-core machine. Each time is reported as a ratio to the floor; the hash pass's speed as the model's parameters
per second of the hash pass (proposal and allocation); and the profile's predicted deviation of
each pass's accepted edits against the measured one.

The two larger models are built here with torch from their published layouts, with random
weights (no model hub is reachable offline; batch-norm statistics randomised so that folding them
is not trivial): ``vgg11_224`` is VGG-11 with batch norm (configuration A of Simonyan & Zisserman,
a 1024-wide classifier instead of 4096) on 3x224x224, 7.5 GMACs; ``yolo_320`` is a YOLO-style
detector on 3x320x320: a CSP-like backbone of stride-2 convs with residual blocks (SiLU), and a
head at strides 16 and 32 whose box, objectness-sigmoid and class-sigmoid outputs are concatenated
into one [1, 500, 85] output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BENCH_DIR, BUILT

TOLERANCES = (0.003, 0.01, 0.03, 0.1)
REPEATS = 3
FLOOR_SCRIPT = r"""
import sys, time
start = time.perf_counter()
import numpy as np, onnx, onnxruntime as ort
path, out, shapes = sys.argv[1], sys.argv[2], eval(sys.argv[3])
model = onnx.load(path)
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
for _ in range(24):
    sess.run(None, {i.name: rng.standard_normal(shapes[i.name]).astype(np.float32) for i in sess.get_inputs()})
onnx.save(model, out)
print(time.perf_counter() - start)
"""


def build_vgg(path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, c = [], 3
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 1024), nn.ReLU(), nn.Linear(1024, 1000))
    return _export(model, (1, 3, 224, 224), path, ["logits"])


def build_yolo(path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)

    def conv(c_in, c_out, k=3, s=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = conv(c, c // 2, 1), conv(c // 2, c, 3)

        def forward(self, x):
            return x + self.b(self.a(x))

    class Detector(nn.Module):
        def __init__(self, classes=80):
            super().__init__()
            self.stem = nn.Sequential(conv(3, 16, 3, 2), conv(16, 32, 3, 2), Residual(32), conv(32, 64, 3, 2),
                                      Residual(64), Residual(64), conv(64, 128, 3, 2), Residual(128), Residual(128))
            self.down = nn.Sequential(conv(128, 256, 3, 2), Residual(256))
            self.lateral = conv(256, 128, 1)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.fuse = conv(256, 128, 3)
            self.heads = nn.ModuleList([nn.Conv2d(128, 5 + classes, 1), nn.Conv2d(256, 5 + classes, 1)])

        def forward(self, x):
            p4 = self.stem(x)
            p5 = self.down(p4)
            p4 = self.fuse(torch.cat([p4, self.up(self.lateral(p5))], 1))
            outs = []
            for head, feat in zip(self.heads, (p4, p5)):
                y = head(feat).flatten(2).transpose(1, 2)  # [1, cells, 85]
                outs.append(torch.cat([y[..., :4], torch.sigmoid(y[..., 4:5]), torch.sigmoid(y[..., 5:])], -1))
            return torch.cat(outs, 1)

    return _export(Detector(), (1, 3, 320, 320), path, ["detections"])


def _export(model, shape, path: Path, outputs: list[str]) -> Path:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.randn(*shape), str(path), input_names=["input"], output_names=outputs,
                      dynamo=False)
    return path


LARGE = {"vgg11_224": (build_vgg, {"input": (1, 3, 224, 224)}), "yolo_320": (build_yolo, {"input": (1, 3, 320, 320)})}


def model_setup(name: str) -> tuple[Path, dict, dict]:
    """(path, input shapes, probe ranges) of a bench or large model."""
    if name in LARGE:
        build, shapes = LARGE[name]
        path = BUILT / f"{name}.onnx"
        if not path.exists():
            build(path)
        return path, shapes, {}
    from . import zoo

    m = zoo.get(name)
    path = Path(m.build())
    return path, {k: tuple(v.shape) for k, v in m.real_inputs(1).items()}, m.probe_range


def _timed(cmd: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1]


def measure(name: str, folder: Path, repeats: int = REPEATS) -> dict:
    path, shapes, ranges = model_setup(name)
    row: dict = {"model": name}
    floors = []
    for _ in range(repeats):
        floor, code, err = _timed([sys.executable, "-c", FLOOR_SCRIPT, str(path), str(folder / "floor.onnx"), repr(shapes)])
        assert code == 0, err
        floors.append(floor)
    floor = statistics.median(floors)
    row["floor_s"], row["floor_runs"] = round(floor, 3), [round(f, 3) for f in floors]
    common = [sys.executable, "-m", "red_onnx", str(path)] + [f"--input-shape={k}:{','.join(map(str, s))}" for k, s in shapes.items()]
    common += [f"--probe-range={k}:{lo:g},{hi:g}" for k, (lo, hi) in ranges.items()] + ["-q"]
    calls = [("default", "0.003"), ("t0.01", "0.01")] + [("t0.03", "0.03"), ("four", ",".join(map(str, TOLERANCES)))] * repeats
    for label, tolerance in calls:
        report = folder / f"{label}.json"
        seconds, code, err = _timed(common + [str(folder / f"{label}.onnx"), "--tolerance", tolerance, "--report", str(report)])
        entry = row.setdefault(label, {"runs": []})
        entry["runs"].append(round(seconds, 2))
        entry["seconds"] = round(statistics.median(entry["runs"]), 2)
        entry["ratio"] = round(entry["seconds"] / floor, 2)
        entry["exit"] = max(entry.get("exit", 0), code)
        if code == 0:
            data = json.loads(report.read_text())
            reports = data["outputs"] if "outputs" in data else [data]
            entry["outputs"] = [_summary(r) for r in reports]  # the last run's (the outputs are deterministic)
        else:
            entry["error"] = err
    row["four_over_t0.03"] = [round(f / t, 2) for f, t in zip(row["four"]["runs"], row["t0.03"]["runs"])]
    return row


def _summary(r: dict) -> dict:
    hash_s = sum(p["seconds"] for p in r["passes"] if p["name"] == "hash")
    return {"tolerance": r["tolerance"], "macs": r["macs_after"] / r["macs_before"],
            "bytes": r["bytes_after"] / r["bytes_before"], "deviation": r["output_deviation"],
            "hash_s": round(hash_s, 3), "hash_weights_per_s": round(r["params_before"] / hash_s) if hash_s else None,
            "backed_off": sum("backed off" in n for n in r["notes"]),
            "predictions": r.get("profile", {}).get("predictions", []),
            "profile": {k: v for k, v in r.get("profile", {}).items() if k != "predictions"}}


def table(rows: list[dict]) -> str:
    lines = ["| model | floor s | default (0.003) | 0.01 | 0.03 | 4 tolerances | 4 tol. / 0.03 (range over pairs) | hash weights/s at 0.01 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        def cell(label):
            e = row[label]
            return f"{e['seconds']:.1f} s ({e['ratio']:.1f}x)" if e["exit"] == 0 else f"exit {e['exit']}"

        rate = (row["t0.01"].get("outputs") or [{}])[0].get("hash_weights_per_s")
        pairs = row.get("four_over_t0.03", [])
        ratio = f"{row['four']['seconds'] / row['t0.03']['seconds']:.2f}"
        if len(pairs) > 1:
            ratio += f" ({min(pairs):.2f}-{max(pairs):.2f})"
        lines.append(f"| {row['model']} | {row['floor_s']:.2f} | {cell('default')} | {cell('t0.01')} | {cell('t0.03')} | "
                     f"{cell('four')} | {ratio} | {f'{rate / 1e6:.2f} M' if rate else '-'} |")
    lines += ["", "Per output of the 4-tolerance call: MACs and bytes after / before, the verified deviation, and the "
              "profile's predicted deviation of each pass's accepted edits against the measured one (allocation probes).", "",
              "| model | T | MACs | bytes | deviation | backed off | predicted / measured per pass |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for out in row["four"].get("outputs", []):
            pairs = ", ".join(f"{p['pass']} {p['predicted']:.3g}/{p['measured']:.3g}" for p in out["predictions"])
            lines.append(f"| {row['model']} | {out['tolerance']:g} | {out['macs']:.3f} | {out['bytes']:.3f} | "
                         f"{out['deviation']:.3g} | {out['backed_off']} | {pairs or '-'} |")
    return "\n".join(lines)


def main() -> None:
    from . import zoo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.names() + list(LARGE)))
    parser.add_argument("--out", default=str(BENCH_DIR / "speed.md"))
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs of the floor, the 0.03 and the 4-tolerance calls")
    args = parser.parse_args()
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH_DIR).stdout.strip()
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(name, Path(tmp), args.repeats))
        print(json.dumps(rows[-1]), flush=True)
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        out.write_text(f"# Tool time against the floor (bench/speed.py, commit {commit})\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}\n"
                       + table(rows) + "\n")


if __name__ == "__main__":
    main()
