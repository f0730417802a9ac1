"""Probe inputs for allocation and verification (and, with the lossy passes, the one error budget).

Two disjoint probe sets: **allocation** probes, on which lossy passes choose their edits, and
**fresh** verification probes, which decide the result, so a choice that fits its own probes by
luck is still caught.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

Specs = dict[str, tuple[tuple[int, ...], np.dtype]]
Feeds = dict[str, np.ndarray]


@dataclass
class Probes:
    allocation: list[Feeds]
    verification: list[Feeds]


def random_probes(specs: Specs, count: int, rng: np.random.Generator,
                  ranges: dict[str, tuple[float, float]] | None = None) -> list[Feeds]:
    """``count`` samples: N(0,1) floats (uniform in ``ranges[name]`` where given); integers and bools 0."""
    ranges = ranges or {}
    samples = []
    for _ in range(count):
        feeds = {}
        for name, (shape, dtype) in specs.items():
            if np.issubdtype(dtype, np.floating):
                if name in ranges:
                    low, high = ranges[name]
                    x = rng.uniform(low, high, size=shape)
                else:
                    x = rng.standard_normal(shape)
                feeds[name] = x.astype(dtype)
            else:
                feeds[name] = np.zeros(shape, dtype=dtype)
        samples.append(feeds)
    return samples


def file_probes(arrays: dict[str, np.ndarray], specs: Specs) -> list[Feeds]:
    """Samples from arrays keyed by input name, first axis = samples."""
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InputError(f"--probe-inputs: no array for input(s) {', '.join(missing)}")
    counts = {arrays[n].shape[0] for n in specs}
    if len(counts) != 1:
        raise InputError(f"--probe-inputs: arrays have different sample counts {sorted(counts)}")
    samples = []
    for k in range(counts.pop()):
        feeds = {}
        for name, (shape, dtype) in specs.items():
            x = np.asarray(arrays[name][k])
            if x.ndim == len(shape) - 1:
                x = x[None]
            if x.ndim != len(shape):
                raise InputError(f"--probe-inputs: '{name}' sample has shape {x.shape}, input expects rank {len(shape)}")
            feeds[name] = x.astype(dtype)
        samples.append(feeds)
    return samples


def make_probes(specs: Specs, seed: int = 0, allocation: int = 8, verification: int = 8,
                ranges: dict[str, tuple[float, float]] | None = None,
                arrays: dict[str, np.ndarray] | None = None) -> Probes:
    """Allocation and verification probes, disjoint.

    With ``arrays`` (user data): the first half allocates, the rest verifies; a single sample
    verifies and allocation falls back to random probes.
    """
    rng = np.random.default_rng(seed)
    if arrays is not None:
        samples = file_probes(arrays, specs)
        if not samples:
            raise InputError("--probe-inputs: no samples")
        if len(samples) == 1:
            return Probes(random_probes(specs, allocation, rng, ranges), samples)
        half = len(samples) // 2
        return Probes(samples[:half], samples[half:])
    alloc = random_probes(specs, allocation, rng, ranges)
    return Probes(alloc, random_probes(specs, verification, rng, ranges))
