"""Per-channel or per-tensor KDE hashing? A weight-space study on the bench models.

For every linear layer of every bench model (after canonicalization, as the hash pass sees them),
both modes are swept over bandwidth factors; at each target relative weight error the study records
the fewest codebook entries either mode reaches at or under that error. Fewer entries at the same
error means narrower indices and more exposed duplicates. Biases are counted apart: their share of
the bytes says whether hashing them could pay.

    python -m bench.hash_study            # prints a markdown table (also written to bench/hash_study.md)
"""

from __future__ import annotations

import numpy as np
import onnx

from red_onnx import model_io
from red_onnx.context import Context
from red_onnx.kde import hash_channels
from red_onnx.layers import find_layers, input_specs, tensor_shapes
from red_onnx.passes import fold

from . import zoo

FACTORS = np.geomspace(1e-3, 1.0, 16)
TARGETS = (0.003, 0.01, 0.03)
SHAPES = {"PP-OCR": {"x": (1, 3, 48, 320)}}


def canonical_layers(path):
    model = model_io.load(path)
    canonical = onnx.ModelProto()
    canonical.CopyFrom(model)
    fold.constants_to_initializers(canonical)
    name = next((k for k in SHAPES if k in str(path)), None)
    specs = input_specs(model, SHAPES.get(name))
    ctx = Context(graph=model_io.to_graph(canonical), template=model, shapes=tensor_shapes(model, specs))
    fold.run(ctx)
    return find_layers(ctx.graph)[0]


def entries_at(weight, per_channel):
    """{target error: fewest codebook entries with relative error <= target}."""
    norm = np.linalg.norm(weight)
    best = {t: len(np.unique(weight)) for t in TARGETS}
    for f in FACTORS:
        hashed, codebook, _ = hash_channels(weight, f, per_channel=per_channel, scale="pow2")
        err = np.linalg.norm(hashed - weight) / norm
        for t in TARGETS:
            if err <= t:
                best[t] = min(best[t], len(codebook))
    return best


def main():
    rows = []
    for m in zoo.all_models():
        path = m.build()
        totals = {(mode, t): 0.0 for mode in ("channel", "tensor") for t in TARGETS}
        n_layers, weights, biases = 0, 0, 0
        for layer in canonical_layers(path):
            w = layer.get_weight()
            if w.size < 1024:
                continue
            n_layers += 1
            weights += w.size
            biases += layer.bias.values.size if layer.bias is not None else 0
            for mode, per_channel in (("channel", True), ("tensor", False)):
                for t, e in entries_at(w, per_channel).items():
                    totals[mode, t] += np.log2(max(e, 2)) * w.size  # index bits the layer needs
        cells = [f"{totals['channel', t] / weights:.1f} / {totals['tensor', t] / weights:.1f}" for t in TARGETS]
        rows.append(f"| {m.name} | {n_layers} | {weights:,} | {100 * biases / max(weights + biases, 1):.2f}% | "
                    + " | ".join(cells) + " |")
    head = ("| model | layers | weights | biases (share) | "
            + " | ".join(f"index bits at error {t}: per-channel / per-tensor" for t in TARGETS) + " |")
    table = "\n".join([head, "|" + "---|" * (4 + len(TARGETS))] + rows)
    print(table)
    with open("bench/hash_study.md", "w") as f:
        f.write(__doc__.split("\n\n")[0] + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
