"""Does the tool's time grow linearly with depth? Chains of 16-wide Gemm → Relu layers.

    python -m bench.chain_scale                     # 250, 500, 1000, 2000 layers at the default tolerance
    python -m bench.chain_scale --layers 250,2000 --tolerance 0

Each chain is built with random weights (seeded), then ``python -m red_onnx IN OUT`` runs on it in
a fresh process; prints one markdown row per depth: wall time, the time per layer, and the ratio
to the first depth's time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 16


def build(path: Path, layers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for k in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{k}")]
        nodes += [helper.make_node("Gemm", [h, f"w{k}", f"b{k}"], [f"g{k}"], name=f"fc{k}", transB=1),
                  helper.make_node("Relu", [f"g{k}"], [f"r{k}"], name=f"relu{k}")]
        h = f"r{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", WIDTH])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="250,500,1000,2000")
    parser.add_argument("--tolerance", default=None, help="default: the tool's")
    args = parser.parse_args()
    print("| layers | exit | wall s | ms per layer | x the first |\n|---|---|---|---|---|")
    first = None
    for layers in map(int, args.layers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "chain.onnx"
            build(src, layers)
            cmd = [sys.executable, "-m", "red_onnx", str(src), str(Path(tmp) / "out.onnx"), "-q"]
            if args.tolerance is not None:
                cmd += ["--tolerance", args.tolerance]
            start = time.perf_counter()
            code = subprocess.run(cmd).returncode
            seconds = time.perf_counter() - start
        first = first or seconds
        print(f"| {layers} | {code} | {seconds:.1f} | {1e3 * seconds / layers:.1f} | {seconds / first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
