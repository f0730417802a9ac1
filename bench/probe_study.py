"""Does the hash pass keep more with a few real, unlabeled inputs as probes? A study of --probe-inputs.

Every benchmark row is data-free: its probes are uniform in the model's input range. Here the hash
pass alone (`--codebook auto`, as the bench's "hash (codebook auto)" rows) runs at a few tolerances
twice per model: with those random probes, and with 32 real inputs given as `--probe-inputs` (16
choose the edits, 16 verify). The real inputs come from a calibration set disjoint from the model's
evaluation set: the digits training split, captchas and text lines of another seed, MobileNetV2
crops of another seed (of the same 8 photos as its evaluation crops). The MTCNN nets are left out:
all 200 images of their set are in their evaluation.

    python -m bench.probe_study [--models a,b]   # prints markdown (also written to bench/probe_study.md)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx

import red_onnx

from . import zoo
from .families import captcha_crnn, digits, mobilenet, ppocr

TOLERANCES = (0.005, 0.01, 0.02)
CALIBRATION = {  # 32 real inputs per model, none of them in its evaluation set
    "digits_cnn": lambda: {"input": digits._split()[0][:32]},
    "digits_resnet": lambda: {"input": digits._split()[0][:32]},
    "captcha_crnn": lambda: {"image": captcha_crnn._captchas(32, seed=1)[0]},
    "ppocr_rec": lambda: {"x": ppocr._lines(32, seed=1)[0]},
    "mobilenet_v2": lambda: {"input": mobilenet._crops(4, seed=1)},
}


def study(name: str) -> list[str]:
    bm = zoo.get(name)
    path = str(bm.build())
    original = bm.evaluate(path)
    calibration = CALIBRATION[name]()
    shapes = {k: (1, *v.shape[1:]) for k, v in calibration.items()}
    lines = []
    for tol in TOLERANCES:
        cells = []
        for probes in ({"probe_ranges": bm.probe_range}, {"probe_inputs": calibration}):
            start = time.perf_counter()
            model, report = red_onnx.compress(path, tolerance=tol, passes=["hash"], codebook="auto",
                                              input_shapes=shapes, **probes)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out.onnx"
                onnx.save(model, str(out))
                metrics = bm.evaluate(str(out))
            within = bm.within_one_point(original, metrics)
            cells.append(f"{report.bytes_before / report.bytes_after:.2f}×, {metrics[bm.primary]:.4f}"
                         f"{'' if within else ' (over 1 pt)'}, {seconds:.0f} s")
        lines.append(f"| {name} | {bm.primary} {original[bm.primary]:.4f} | {tol:g} | {cells[0]} | {cells[1]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CALIBRATION))
    args = parser.parse_args()
    lines = [__doc__.split("\n\n    python")[0].strip(), "",
             "Each cell: file smaller by, the task metric (drop over 1 point marked), the tool's seconds.", "",
             "| model | original | tolerance | random probes (the bench) | 32 real inputs as --probe-inputs |",
             "|---|---|---|---|---|"]
    for name in args.models.split(","):
        lines += study(name)
        print("\n".join(lines[-len(TOLERANCES):]), flush=True)
    Path(__file__).with_name("probe_study.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
