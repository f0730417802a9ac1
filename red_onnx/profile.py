"""The sensitivity profile: what each candidate edit costs alone, measured once per model and probe set.

For a candidate edit e (merge the first m near-duplicate channels of a channel space, separate a
conv at a rank ladder level, hash a layer at a codebook size) the profile holds its *added*
deviation alone, a(e) = sqrt(max(d(e)² − d₀², 0)), with d(e) the deviation of the model with e
applied and d₀ the deviation before it, both measured on the ranking probes (the first allocation
probes, :data:`red_onnx.budget.RANKING_PROBES`). Independent edits add in quadrature, so the
budget predicts a set's deviation as sqrt(d₀² + Σ a²) and measures only the sets it may accept.

An entry is keyed by the candidate's key and a digest of the values of the tensors it edits (as
they are when it is proposed), so it is reused by every later build, tolerance and call whose
candidate edits the same values, and never for other values. A profile saved to a file
(``--profile``) carries the fingerprint of the model and of the probe settings it was measured
with; :func:`load` refuses a profile whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

VERSION = 2  # 2: digests are SHA-256 (were BLAKE2b)


def digest(values: np.ndarray) -> str:
    """A short digest of an array's dtype, shape and bytes: SHA-256, which CPUs with SHA
    extensions run at twice BLAKE2b's speed (0.057 against 0.109 s for VGG-11's 103 MB classifier)."""
    h = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    h.update(np.ascontiguousarray(values).data)
    return h.hexdigest()[:16]


@dataclass
class Profile:
    """Added deviations alone by candidate (see the module docstring), and how they were used."""

    fingerprint: dict = field(default_factory=dict)
    added: dict[str, float] = field(default_factory=dict)
    measured: int = 0  # entries measured by this process
    reused: int = 0  # look-ups answered without a model run
    predictions: list[dict] = field(default_factory=list)  # per accepted set: predicted vs measured

    def get(self, key: str) -> float | None:
        value = self.added.get(key)
        self.reused += value is not None
        return value

    def put(self, key: str, value: float) -> None:
        self.added[key] = float(value)
        self.measured += 1

    def save(self, path: str | os.PathLike) -> None:
        from .model_io import write_text

        write_text(path, json.dumps({"red_onnx_profile": VERSION, "fingerprint": self.fingerprint,
                                     "added": self.added}, indent=None, sort_keys=True))


def load(path: str | os.PathLike, fingerprint: dict) -> Profile:
    """The profile saved at ``path``; an empty one (to be measured and saved) if there is no file.
    A file that is not a profile, or one measured on another model or other probes, is an InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return Profile(fingerprint)
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--profile {path}: cannot read it ({err})") from None
    try:
        data = json.loads(text)
        ok = data.get("red_onnx_profile") == VERSION and isinstance(data.get("added"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise InputError(f"--profile {path}: not a red_onnx profile (version {VERSION}); give a new path to measure one")
    saved = data.get("fingerprint", {})
    differs = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differs:
        what = {"model": "another model", "input shapes": "other input shapes",
                "probes": "other probe settings (--seed, --probe-range, --probe-inputs)"}
        raise InputError(f"--profile {path} was measured on {' and '.join(what.get(k, k) for k in differs)} than "
                         "this call's: it is not used; give a new path (or delete the file) to measure a new profile")
    return Profile(fingerprint, {str(k): float(v) for k, v in data["added"].items()})


def fingerprint(model_digest: bytes, specs: dict, seed: int, allocation: int, ranges: dict | None,
                probe_inputs: dict | None) -> dict:
    """What a profile's entries depend on: the input model, its input shapes, and the allocation probes."""
    h = model_digest.hex()
    probes = {"seed": seed, "allocation probes": allocation,
              "probe ranges": sorted((k, list(map(float, v))) for k, v in (ranges or {}).items())}
    if probe_inputs is not None:
        probes["probe inputs"] = {k: digest(np.asarray(v)) for k, v in sorted(probe_inputs.items())}
    shapes = {k: [int(d) for d in s] for k, (s, _) in sorted(specs.items())}
    return json.loads(json.dumps({"model": h, "input shapes": shapes, "probes": probes}))  # as a file holds it
