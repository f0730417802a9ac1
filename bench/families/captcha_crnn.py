"""captcha-whisperer's CRNN (CNN + unrolled BiLSTM + CTC) on seeded `captcha` images with known text."""

from __future__ import annotations

import contextlib
import functools
import random
from pathlib import Path

import numpy as np

from ..common import run_batched, wheel_file
from .base import BenchModel

WHEEL = ("captcha-whisperer", "0.1.0")
ALPHABET = "23456789ABCDEFGHJKLMNPRSTUVWXY"
LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_"  # the package's constants.LABELS; "_" (36) is the CTC blank
N_FULL, N_QUICK = 300, 100


class _SeededSecrets:
    """Stand-in for the `secrets` module that `captcha.image` draws its noise from."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq):
        return self._rng.choice(seq)


@contextlib.contextmanager
def _seeded_captcha(seed: int):
    import captcha.image

    saved = captcha.image.secrets
    captcha.image.secrets = _SeededSecrets(seed)
    try:
        yield captcha.image
    finally:
        captcha.image.secrets = saved


@functools.cache
def _captchas(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """n captchas of 4 characters, as the package preprocesses them: [n, 3, 60, 160] BGR float 0..255."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(4)) for _ in range(n)]
    with _seeded_captcha(seed) as image_module:
        gen = image_module.ImageCaptcha(width=160, height=60)
        imgs = [np.asarray(gen.generate_image(t).convert("RGB"), dtype=np.float32) for t in texts]
    x = np.stack(imgs)[..., ::-1].transpose(0, 3, 1, 2)  # RGB -> BGR, HWC -> CHW
    return np.ascontiguousarray(x), texts


def decode(logits: np.ndarray) -> list[str]:
    """The package's greedy CTC decoding (recognizer.decode): logits [T, N, 37]; at step t it takes the argmax
    over labels 1..36 of row t-1 for t = 1..T-1 (so the last row is unused and label 0 is never emitted),
    collapses repeats, then removes the blank '_'."""
    steps = logits.shape[0]
    idx = logits[: steps - 1, :, 1:].argmax(-1) + 1  # [T-1, N]
    texts = []
    for col in idx.T:
        keep = np.ones(len(col), dtype=bool)
        keep[1:] = col[1:] != col[:-1]
        texts.append("".join(LABELS[i] for i in col[keep]).replace("_", "").strip())
    return texts


class CaptchaCRNN(BenchModel):
    name = "captcha_crnn"
    description = "captcha-whisperer CRNN (BGR 0..255, 60x160 -> [20,N,37] CTC logits); exact match on seeded 4-char captchas"
    primary = "exact_match"
    probe_range = {"image": (0.0, 255.0)}

    def build(self) -> Path:
        return wheel_file(*WHEEL, "captcha_whisperer/models/captcha_crnn.onnx")

    def _evaluate(self, sess, quick: bool) -> dict[str, float]:
        x, texts = self.subset(*_captchas(N_QUICK if quick else N_FULL))
        pred = decode(run_batched(sess, {"image": x}, batch=50)[0])
        chars = sum(a == b for p, t in zip(pred, texts) for a, b in zip(p.ljust(4), t))
        return {"exact_match": float(np.mean([p == t for p, t in zip(pred, texts)])), "char_accuracy": chars / (4 * len(texts))}

    def real_inputs(self, n: int = 16) -> dict[str, np.ndarray]:
        return {"image": _captchas(N_FULL)[0][:n]}


def models() -> list[BenchModel]:
    return [CaptchaCRNN()]
