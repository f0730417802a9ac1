"""A metric for ``--metric``: top-1 accuracy of a digits model on the digits test split (540 images).

    python -m red_onnx models/digits_cnn.onnx /tmp/out.onnx --metric models/digits_metric.py:accuracy \
        --max-drop 0.01 --probe-range input:0,1

red_onnx calls ``accuracy(path)`` with the path of a candidate ONNX file; higher is better.
"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_models import digits_split  # noqa: E402

_, _, X, Y = digits_split()


def accuracy(path: str) -> float:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: X})[0]
    return float(np.mean(logits.argmax(1) == Y))
