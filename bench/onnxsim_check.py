"""Is onnxsim's pruned model the original with the pruned channels zeroed?

From the original and the pruned model, recover for every resized weight which indices survived along each
shrunk axis; build the original model with every removed slice set to zero (in weight space, same graph);
then compare its outputs with the pruned model's on real and N(0,1) inputs. A mismatch beyond float rounding
is a defect of the tool (a cut through a coupled channel, a wrong slice), not of its method."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from .common import session
from .measure import deviation

MATCH_TOLERANCE = 1e-4  # relative output deviation always counted as float rounding


def _tensor_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    tensors[node.output[0]] = a.t
    return tensors


def _monotone_match(orig: np.ndarray, new: np.ndarray, axis: int, equal) -> list[int] | None:
    """Increasing indices i_0 < i_1 < ... of orig's slices along `axis` with equal(orig slice, new slice j)."""
    keep, start = [], 0
    for j in range(new.shape[axis]):
        s_new = np.take(new, j, axis=axis)
        for i in range(start, orig.shape[axis]):
            if equal(np.take(orig, i, axis=axis), s_new):
                keep.append(i)
                start = i + 1
                break
        else:
            return None
    return keep


def _subset(a: np.ndarray, b: np.ndarray) -> bool:
    """Every value of b occurs in a (a slice of b's tensor may also be cut along other axes)."""
    return bool(np.isin(b.ravel(), a.ravel()).all())


def _keep_sets(orig: np.ndarray, new: np.ndarray, known: dict[tuple[int, int], list[list[int]]]):
    """Kept indices per shrunk axis, or None when `new` is not a sub-block of `orig`."""
    axes = [a for a in range(orig.ndim) if orig.shape[a] != new.shape[a]]
    keeps: dict[int, list[int]] = {}
    for a in axes:  # a first guess per axis, from value membership alone
        keeps[a] = _monotone_match(orig, new, a, _subset)
        if keeps[a] is None:
            return None

    def exact(axes_keeps) -> bool:
        ix = [axes_keeps.get(a, range(orig.shape[a])) for a in range(orig.ndim)]
        return bool(np.array_equal(orig[np.ix_(*ix)], new))

    if exact(keeps):
        # prefer a keep set already found on another tensor of the same sizes (1-D tensors with repeated
        # values, e.g. equal PRelu slopes, match several index sets equally well)
        for a in axes:
            for cand in known.get((orig.shape[a], new.shape[a]), []):
                trial = {**keeps, a: cand}
                if cand != keeps[a] and exact(trial):
                    keeps = trial
                    break
        return keeps
    for a in axes:  # refine each axis by exact slice equality, the others cut by the first guess
        others = {b: k for b, k in keeps.items() if b != a}
        ix = [others.get(b, range(orig.shape[b])) if b != a else range(orig.shape[a]) for b in range(orig.ndim)]
        sub = orig[np.ix_(*ix)]
        keeps[a] = _monotone_match(sub, new, a, np.array_equal)
        if keeps[a] is None:
            return None
    return keeps if exact(keeps) else None


def zeroed_reference(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The original model with every slice onnxsim removed set to 0, and what was found on the way."""
    before, after = _tensor_map(original), _tensor_map(pruned)
    info = {"resized_tensors": 0, "removed_elements": 0, "unmatched": [], "changed_in_place": [], "missing": []}
    ref = onnx.ModelProto()
    ref.CopyFrom(original)
    ref_tensors = _tensor_map(ref)
    resized = []
    for name, t in before.items():
        if name not in after:
            info["missing"].append(name)
            continue
        a, b = numpy_helper.to_array(t), numpy_helper.to_array(after[name])
        if a.shape == b.shape:
            if not np.array_equal(a, b):
                info["changed_in_place"].append(name)
        elif a.ndim == b.ndim and all(x >= y for x, y in zip(a.shape, b.shape)):
            resized.append((name, a, b))
        else:
            info["unmatched"].append(name)
    # tensors with a single shrunk axis first: their keep sets are unambiguous and guide the others
    resized.sort(key=lambda r: (sum(x != y for x, y in zip(r[1].shape, r[2].shape)), -r[1].ndim))
    known: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
    for name, a, b in resized:
        keeps = _keep_sets(a, b, known)
        if keeps is None:
            info["unmatched"].append(name)
            continue
        for ax, k in keeps.items():
            if a.ndim > 1 and k not in known[(a.shape[ax], b.shape[ax])]:
                known[(a.shape[ax], b.shape[ax])].append(k)
        z = np.zeros_like(a)
        z[np.ix_(*[keeps.get(ax, range(a.shape[ax])) for ax in range(a.ndim)])] = b
        ref_tensors[name].CopyFrom(numpy_helper.from_array(z, name=ref_tensors[name].name))
        info["resized_tensors"] += 1
        info["removed_elements"] += int(a.size - b.size)
    return ref, info


def check(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Compare the pruned model with the zeroed reference on each batch of `feeds`.

    Returns {"equal": bool | None, "max_deviation", "findings": [str], **zeroed_reference info}."""
    ref, info = zeroed_reference(original, pruned)
    findings = []
    if info["unmatched"]:
        findings.append(f"{len(info['unmatched'])} resized tensors are not a sub-block of the original "
                        f"({', '.join(info['unmatched'][:4])})")
    if info["changed_in_place"]:
        findings.append(f"{len(info['changed_in_place'])} tensors changed value without changing shape "
                        f"({', '.join(info['changed_in_place'][:4])}); the reference keeps the original values")
    if info["missing"]:
        findings.append(f"{len(info['missing'])} original tensors are gone ({', '.join(info['missing'][:4])})")
    try:
        onnx.checker.check_model(pruned)
    except Exception as exc:
        findings.append(f"onnx.checker rejects the pruned model: {str(exc).splitlines()[0][:200]}")
    try:
        s_ref, s_new = session(ref), session(pruned)
        dev = max(deviation(s_ref, s_new, f) for f in feeds)
        # A badly damaged model can be ill-conditioned: rounding alone (e.g. another summation order) then moves
        # its outputs a lot. Measure that floor as the deviation between optimized and unoptimized sessions.
        floor = max(
            deviation(s, session(m, optimize=False), f) for s, m in ((s_ref, ref), (s_new, pruned)) for f in feeds
        )
    except Exception as exc:
        findings.append(f"cannot run the pruned model against the reference: {str(exc).splitlines()[0][:200]}")
        return {"equal": False, "max_deviation": None, "rounding_floor": None, "findings": findings, **info}
    allowed = max(MATCH_TOLERANCE, 2 * floor)
    equal = dev <= allowed and not info["unmatched"]
    if dev > allowed:
        findings.append(f"outputs differ from the zeroed-channel reference by {dev:.3g} (relative; rounding floor "
                        f"of these models {floor:.3g})")
    return {"equal": equal, "max_deviation": dev, "rounding_floor": floor, "findings": findings, **info}
