"""PP-OCRv6 small text recognizer (rapidocr wheel) on a hard set of rendered text lines."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np

from ..common import as_model, ctc_greedy, edit_distance, run_batched, wheel_file
from .base import BenchModel

WHEEL = ("rapidocr", "3.10.0")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf")
# Letters and digits without glyphs that are ambiguous at small sizes (0/O/o, 1/l/I, case-alike c/s/v/w/x/z...)
CHARS = "23456789ABDEFGHJLMNQRTYabdefghijkmnqrtuy"
HEIGHT, WIDTH = 48, 320  # rapidocr's rec_img_shape; every batch is padded to this width
N_FULL, N_QUICK = 300, 120


def _render(text: str, rng: random.Random) -> np.ndarray:
    """One text line, small glyphs (11-16 px), blurred and noisy; RGB uint8."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(str(FONT_DIR / rng.choice(FONTS)), rng.randint(11, 16))
    left, top, right, bottom = font.getbbox(text)
    pad = rng.randint(2, 5)
    bg, fg = rng.randint(170, 255), rng.randint(0, 90)
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=fg)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.1)))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(5, 16), arr.shape)
    return np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _to_input(rgb: np.ndarray) -> np.ndarray:
    """rapidocr's resize_norm_img: BGR, height 48 keeping the aspect ratio (width capped), (x/255-0.5)/0.5,
    right-padded with zeros to WIDTH."""
    from PIL import Image

    h, w = rgb.shape[:2]
    new_w = min(WIDTH, int(np.ceil(HEIGHT * w / h)))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, HEIGHT), Image.BILINEAR), dtype=np.float32)
    chw = (resized[..., ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :new_w] = chw
    return out


@functools.cache
def _lines(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    texts, images = [], []
    for i in range(n):  # one generator per line: the quick set is the head of the full set
        rng = random.Random(f"ppocr-{seed}-{i}")
        texts.append("".join(rng.choice(CHARS) for _ in range(rng.randint(4, 10))))
        images.append(_to_input(_render(texts[-1], rng)))
    return np.stack(images), texts


@functools.cache
def _charset(path: str) -> list[str]:
    """rapidocr's CTCLabelDecode list: blank, the model's metadata_props 'character' lines, then a space."""
    meta = {p.key: p.value for p in as_model(path).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


class PPOCRRec(BenchModel):
    name = "ppocr_rec"
    description = "PP-OCRv6 small rec (BGR, (x/255-0.5)/0.5, 48x320 -> [N,40,18710] probabilities); rendered 11-16 px lines with blur + noise"
    primary = "exact_line"
    probe_range = {"x": (-1.0, 1.0)}

    def build(self) -> Path:
        return wheel_file(*WHEEL, "rapidocr/models/PP-OCRv6_rec_small.onnx")

    def _evaluate(self, sess, quick: bool) -> dict[str, float]:
        x, texts = self.subset(*_lines(N_QUICK if quick else N_FULL))
        chars = _charset(str(self.build()))  # the compressed model must keep the same list
        probs = run_batched(sess, {"x": x}, batch=30)[0]
        pred = ["".join(chars[i] for i in seq) for seq in ctc_greedy(probs.argmax(-1), blank=0)]
        errors = sum(edit_distance(p, t) for p, t in zip(pred, texts))
        return {
            "exact_line": float(np.mean([p == t for p, t in zip(pred, texts)])),
            "cer": errors / sum(len(t) for t in texts),
        }

    def real_inputs(self, n: int = 16) -> dict[str, np.ndarray]:
        return {"x": _lines(N_FULL)[0][:n]}


def models() -> list[BenchModel]:
    return [PPOCRRec()]
