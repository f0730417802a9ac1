"""Registry of the bench models: trained ONNX models that work offline, each with ground truth.

    from bench import zoo
    m = zoo.get("captcha_crnn")
    path = m.build()                    # extracted / exported into bench/.cache once
    metrics = m.evaluate(path)          # {"exact_match": 0.9, ...}; m.primary names the primary metric
    feeds = m.real_inputs(16)           # real inputs for deviation / latency
    m.probe_range                       # {"image": (0, 255)}

`python -m bench.zoo` builds every model and prints its clean metrics and evaluation time.
"""

from __future__ import annotations

import functools

from .families.base import WITHIN_ONE_POINT, BenchModel

__all__ = ["BenchModel", "WITHIN_ONE_POINT", "all_models", "get", "names"]


@functools.cache
def all_models() -> tuple[BenchModel, ...]:
    from .families import captcha_crnn, digits, mobilenet, mtcnn, ppocr

    return tuple(m for family in (digits, mtcnn, captcha_crnn, ppocr, mobilenet) for m in family.models())


def names() -> list[str]:
    return [m.name for m in all_models()]


def get(name: str) -> BenchModel:
    for m in all_models():
        if m.name == name:
            return m
    raise KeyError(f"unknown bench model {name!r}; known: {', '.join(names())}")


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(names()))
    args = parser.parse_args()
    for name in args.models.split(","):
        m = get(name)
        t0 = time.perf_counter()
        path = m.build()
        t1 = time.perf_counter()
        metrics = m.evaluate(path, quick=args.quick)
        t2 = time.perf_counter()
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"{name:14s} primary={m.primary:15s} {shown}   (build {t1 - t0:.1f} s, eval {t2 - t1:.1f} s)")


if __name__ == "__main__":
    main()
