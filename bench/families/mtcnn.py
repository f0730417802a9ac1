"""MTCNN R-Net and O-Net (facenet-pytorch weights) as face / non-face classifiers on skimage's LFW subset."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..common import BUILT, roc_auc, run_batched, wheel_file
from .base import BenchModel

WHEEL = ("facenet-pytorch", "2.6.0")
NOISE_STD = 0.3  # N(0, 0.3) added to the normalized input
NOISE_SEEDS_FULL = (0, 1, 2)  # noisy copies of the 200 crops in a full run (quick: the first only)


def _net(kind: str):
    """facenet-pytorch's RNet / ONet layer for layer (attribute names match its state dicts)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if kind == "rnet":
                convs = [(3, 28, 3, (3, 2)), (28, 48, 3, (3, 2)), (48, 64, 2, None)]
                dense, heads = (576, 128), {"dense5_1": 2, "dense5_2": 4}
            else:
                convs = [(3, 32, 3, (3, 2)), (32, 64, 3, (3, 2)), (64, 64, 3, (2, 2)), (64, 128, 2, None)]
                dense, heads = (1152, 256), {"dense6_1": 2, "dense6_2": 4, "dense6_3": 10}
            self.n_conv = len(convs)
            for i, (cin, cout, k, pool) in enumerate(convs, 1):
                setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k))
                setattr(self, f"prelu{i}", nn.PReLU(cout))
                if pool:
                    setattr(self, f"pool{i}", nn.MaxPool2d(*pool, ceil_mode=True))
            d = self.n_conv + 1
            self.dense_name = f"dense{d}"
            setattr(self, self.dense_name, nn.Linear(*dense))
            setattr(self, f"prelu{d}", nn.PReLU(dense[1]))
            self.heads = list(heads)
            for h, n in heads.items():
                setattr(self, h, nn.Linear(dense[1], n))

        def forward(self, x):
            for i in range(1, self.n_conv + 1):
                x = getattr(self, f"prelu{i}")(getattr(self, f"conv{i}")(x))
                if hasattr(self, f"pool{i}"):
                    x = getattr(self, f"pool{i}")(x)
            x = x.permute(0, 3, 2, 1).contiguous()  # as the original (weights were converted from Caffe)
            x = getattr(self, self.dense_name)(x.reshape(x.shape[0], -1))
            x = getattr(self, f"prelu{self.n_conv + 1}")(x)
            outs = [getattr(self, h)(x) for h in self.heads]
            prob = torch.softmax(outs[0], dim=1)
            return (*outs[1:], prob)  # box regression, [landmarks,] face probability

    return Net()


@functools.cache
def _faces(size: int) -> tuple[np.ndarray, np.ndarray]:
    """200 LFW-subset crops (100 faces, then 100 non-faces), grey to RGB, resized to size x size,
    normalized as facenet-pytorch does: (x - 127.5) * 0.0078125."""
    import skimage.data
    from skimage.transform import resize

    imgs = skimage.data.lfw_subset()  # [200, 25, 25] float 0..1
    labels = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    x = np.stack([resize(im, (size, size), order=1, anti_aliasing=True) for im in imgs]) * 255.0
    x = np.repeat(x[:, None], 3, axis=1)
    return ((x - 127.5) * 0.0078125).astype(np.float32), labels


class MTCNNNet(BenchModel):
    # AUC under noise: threshold-free, since accuracy under noise moves up or down with calibration shifts; the
    # clean accuracy at the 0.5 threshold guards against the shifts AUC is blind to
    primary = "auc_noisy"
    guards = ("accuracy",)
    probe_range = {"input": (-1.0, 1.0)}

    def __init__(self, kind: str, size: int):
        self.kind, self.size = kind, size
        self.name = f"mtcnn_{kind}"
        self.description = (
            f"MTCNN {kind[0].upper()}-Net ({size}x{size} RGB, (x-127.5)/128), facenet-pytorch weights; "
            f"face/non-face on skimage lfw_subset, clean and with N(0,{NOISE_STD}) input noise"
        )

    def build(self) -> Path:
        out = BUILT / f"{self.name}.onnx"
        if out.exists():
            return out
        import torch

        net = _net(self.kind).eval()
        state = torch.load(wheel_file(*WHEEL, f"facenet_pytorch/data/{self.kind}.pt"), map_location="cpu")
        net.load_state_dict(state)
        names = ["box", "prob"] if self.kind == "rnet" else ["box", "landmarks", "prob"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part.onnx")
        torch.onnx.export(
            net, torch.zeros(1, 3, self.size, self.size), str(tmp), input_names=["input"], output_names=names,
            dynamic_axes={k: {0: "batch"} for k in ["input", *names]}, opset_version=17, dynamo=False,
        )
        tmp.replace(out)
        return out

    def _evaluate(self, sess, quick: bool) -> dict[str, float]:
        x, y = self.subset(*_faces(self.size))
        metrics = self._scores(sess, x, y, "")
        seeds = NOISE_SEEDS_FULL[:1] if quick else NOISE_SEEDS_FULL
        noisy = np.concatenate([x + np.random.default_rng(s).normal(0, NOISE_STD, x.shape).astype(np.float32) for s in seeds])
        metrics.update(self._scores(sess, noisy, np.tile(y, len(seeds)), "_noisy"))
        return metrics

    @staticmethod
    def _scores(sess, x, y, suffix) -> dict[str, float]:
        prob = run_batched(sess, {"input": x}, batch=200)[-1][:, 1]
        return {f"accuracy{suffix}": float(np.mean((prob > 0.5) == y)), f"auc{suffix}": roc_auc(prob, y)}

    def real_inputs(self, n: int = 16) -> dict[str, np.ndarray]:
        x, _ = _faces(self.size)
        idx = np.linspace(0, len(x) - 1, n).round().astype(int)  # faces and non-faces
        return {"input": x[idx]}


def models() -> list[BenchModel]:
    return [MTCNNNet("rnet", 24), MTCNNNet("onet", 48)]
