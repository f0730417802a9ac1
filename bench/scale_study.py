"""Which per-channel scale and basin representative should the hash pass use? A whole-model study.

Every linear layer with at least MIN_ELEMENTS weights is hashed to at most 256 codebook entries
(the smallest bandwidth that fits, as the hash pass offers for uint8 indices) with each channel
normalised by its max-abs (each value moved to its basin's mode, as RED does, to the basin's
mean, or to the centre Lloyd's 1-D k-means reaches from those means), by the power of two above
it, or by its standard deviation; as a reference, uniform
per-channel 8-bit rounding (w ≈ s·round(w/s), s = max|w|/127). The table gives the mean relative
weight error, then, with every such layer replaced at once, the relative output deviation on the
model's 16 real inputs (the bench's dev_real) and its task metric.

    python -m bench.scale_study [--models a,b]   # prints markdown (also written to bench/scale_study.md)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from red_onnx.layers import find_layers
from red_onnx.passes import codebook as codebook_pass, hash as hash_pass

from . import measure, zoo
from .common import session

SCALES = ("maxabs", "maxabs, basin mean", "maxabs, Lloyd", "pow2", "std", "uniform int8")
REPRESENTATIVES = {"": "mode", "basin mean": "mean", "Lloyd": "lloyd"}


def hashed(w: np.ndarray, scale: str) -> np.ndarray:
    if scale == "uniform int8":
        flat = w.reshape(w.shape[0], -1)
        s = np.abs(flat).max(axis=1, keepdims=True) / 127
        s[s == 0] = 1
        return (np.round(flat / s) * s).reshape(w.shape).astype(w.dtype)
    scale, _, representative = scale.partition(", ")
    defaults = hash_pass.SCALE, hash_pass.REPRESENTATIVE
    hash_pass.SCALE, hash_pass.REPRESENTATIVE = scale, REPRESENTATIVES[representative]
    try:
        return hash_pass.fitting_hash(w, 256)[1][0]
    finally:
        hash_pass.SCALE, hash_pass.REPRESENTATIVE = defaults


def study(name: str) -> list[str]:
    bm = zoo.get(name)
    path = bm.build()
    real = bm.real_inputs(16)
    reference = session(path).run(None, real)
    cells = []
    for scale in SCALES:
        graph = gs.import_onnx(onnx.load(str(path)))
        errors = []
        for layer in find_layers(graph)[0]:
            w = layer.get_weight()
            if w.size < codebook_pass.MIN_ELEMENTS:
                continue
            v = hashed(w, scale)
            errors.append(float(np.linalg.norm(v - w) / np.linalg.norm(w)))
            layer.weight.values = layer.stored(v)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.onnx"
            onnx.save(gs.export_onnx(graph), str(out))
            metric = bm.evaluate(out)[bm.primary]
            deviation = measure.deviation(None, session(out), real, reference)
        cells.append(f"{np.mean(errors):.4f} / {deviation:.4f} / {metric:.4f}")
    original = bm.evaluate(path)[bm.primary]
    return [f"| {name} | {bm.primary} {original:.4f} | {len(errors)} | " + " | ".join(cells) + " |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits_resnet,mtcnn_onet,captcha_crnn,mobilenet_v2")
    args = parser.parse_args()
    lines = [__doc__.splitlines()[0], "",
             "Each cell: mean relative weight error / output deviation on real inputs / the model's metric,",
             "every layer hashed at once.", "",
             "| model | original | layers | " + " | ".join(SCALES) + " |", "|---" * (3 + len(SCALES)) + "|"]
    for name in args.models.split(","):
        lines += study(name)
        print(lines[-1], flush=True)
    Path(__file__).with_name("scale_study.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
