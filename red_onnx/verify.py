"""onnxruntime sessions, the deviation between two models, and latency.

Deviation of a result y' from a reference y, per probe sample and per graph output::

    d = ||y' − y||₂ / ||y||₂   (float64; ||y' − y||₂ itself where ||y||₂ = 0)

Entries where both are the same non-finite value are ignored; any other non-finite entry makes d
infinite. Where a graph output is a Softmax, LogSoftmax or Sigmoid of a linear layer, its input (the
logits) is measured instead: a saturated squashing hides damage. The model's deviation is the
maximum over outputs and samples.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError
from .layers import LINEAR_OPS
from .model_io import IN_PLACE_MIN, TWO_GB, model_bytes, placeholder, without_initializers

SQUASHING_OPS = ("Softmax", "LogSoftmax", "Sigmoid")


def measured_tensors(model: onnx.ModelProto) -> list[str]:
    """For each graph output, the name of the tensor whose deviation is measured."""
    producer = {name: node for node in model.graph.node for name in node.output}
    names = []
    for out in model.graph.output:
        node = producer.get(out.name)
        if node is not None and node.op_type in SQUASHING_OPS and _is_linear(producer.get(node.input[0]), producer):
            names.append(node.input[0])
        else:
            names.append(out.name)
    return names


def _is_linear(node: onnx.NodeProto | None, producer: dict) -> bool:
    if node is None:
        return False
    if node.op_type == "Add":  # MatMul + bias
        return any(_is_linear(producer.get(i), {}) for i in node.input)
    return node.op_type in LINEAR_OPS


def session(model: onnx.ModelProto, outputs: list[str] | None = None, optimize: bool = False,
            threads: int = 0, arrays: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A CPU session; all graph optimizations off unless ``optimize`` (then: ORT_ENABLE_ALL).

    ``outputs`` names the tensors to return (graph outputs or intermediate tensors). ``arrays``:
    the weights of a model from :func:`red_onnx.model_io.to_light_model` (or any initializers to
    read from these arrays instead of the model).
    """
    light, arrays = _split_weights(model, arrays or {})
    if outputs is not None and outputs != [o.name for o in model.graph.output]:
        light = _with_outputs(light, outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors are reported by red_onnx, in one line
    if sum(a.nbytes for a in arrays.values()) < IN_PLACE_BYTES:  # serialized whole, as onnxruntime expects
        for init in light.graph.initializer:
            if init.name in arrays:
                init.CopyFrom(onnx.numpy_helper.from_array(arrays[init.name], init.name))
        return ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if not optimize:  # prepacked weight copies would double the memory of a verification session
        options.add_session_config_entry("session.disable_prepacking", "1")
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    options.add_external_initializers(list(arrays), values)
    sess = ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess._red_onnx_weights = (arrays, values)  # onnxruntime reads these buffers in place: keep them alive
    return sess


#: Weights above this many bytes reach onnxruntime as external initializers instead of inside the
#: serialized model (which protobuf cannot hold past 2 GB, and which costs copies of every weight).
IN_PLACE_BYTES = 2**30


def _split_weights(model: onnx.ModelProto, given: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with its large initializers as external placeholders, and those initializers as
    arrays (``given`` ones as they are): serializing the whole model would cost a copy of every
    weight (and fail over 2 GB)."""
    light = without_initializers(model)
    arrays = {}
    for init in model.graph.initializer:
        array = given.get(init.name)
        if array is None and int(np.prod(init.dims)) > IN_PLACE_MIN and init.data_location != onnx.TensorProto.EXTERNAL:
            array = onnx.numpy_helper.to_array(init)
        if array is None or array.dtype.kind not in "fiub":
            light.graph.initializer.add().CopyFrom(init)
            continue
        placeholder(light.graph.initializer.add(name=init.name, data_type=init.data_type), array.shape)
        arrays[init.name] = np.ascontiguousarray(array)
    return light, arrays


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name: o for o in copy.graph.output}
    elem = {o.name: o.type.tensor_type.elem_type for o in copy.graph.output}
    del copy.graph.output[:]
    for i, name in enumerate(names):
        if name in known:
            copy.graph.output.append(known[name])
        else:  # an intermediate tensor: its type is the graph output's it stands for
            ref = list(elem.values())[min(i, len(elem) - 1)]
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, ref, None))
    return copy


def input_session(model: onnx.ModelProto, outputs: list[str] | None = None) -> ort.InferenceSession:
    """The session on the user's input model; a model onnxruntime cannot load is bad input."""
    try:
        return session(model, outputs)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"onnxruntime cannot load the input model ({first}); "
                         "with --no-verify only exact rewrites are made") from None


def run(sess: ort.InferenceSession, probes: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs for each probe sample."""
    return [sess.run(None, feeds) for feeds in probes]


def run_input(sess: ort.InferenceSession, probes: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs of the user's input model; a model onnxruntime loads but cannot run is bad input."""
    try:
        return run(sess, probes)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"onnxruntime cannot run the input model on probes of its input shapes ({first})") from None


def sample_deviation(reference: np.ndarray, result: np.ndarray) -> float:
    """||y' − y||₂ / ||y||₂ of one output for one sample (see the module docstring)."""
    y = np.asarray(reference, dtype=np.float64)
    y2 = np.asarray(result, dtype=np.float64)
    if y.shape != y2.shape:
        return float("inf")
    y, y2 = y.ravel(), y2.ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        d = y2 - y
        norm, diff = float(np.sqrt(np.dot(y, y))), float(np.sqrt(np.dot(d, d)))
    if norm > 0 and np.isfinite(norm) and np.isfinite(diff):  # no overflow, no inf/nan: the plain ratio
        return diff / norm
    finite = np.isfinite(y) & np.isfinite(y2)
    if not finite.all():
        same = ~finite & ((y == y2) | (np.isnan(y) & np.isnan(y2)))
        if not (finite | same).all():
            return float("inf")
        y, y2 = y[finite], y2[finite]
    scale = max(float(np.max(np.abs(y), initial=0.0)), float(np.max(np.abs(y2), initial=0.0)))
    if scale == 0:
        return 0.0
    norm = np.linalg.norm(y / scale)  # scaled: squares of large values would overflow
    diff = np.linalg.norm((y2 - y) / scale)
    if not np.isfinite(diff):
        return float("inf")
    return float(diff / norm) if norm > 0 else float(diff * scale)


def deviation(references: list[list[np.ndarray]], results: list[list[np.ndarray]]) -> tuple[float, list[float]]:
    """(max deviation, max deviation per output) over samples, for outputs listed per sample."""
    per_output = [0.0] * len(references[0]) if references else []
    for ref, res in zip(references, results):
        for k, (y, y2) in enumerate(zip(ref, res)):
            d = sample_deviation(y, y2)
            per_output[k] = max(per_output[k], d if d == d else float("inf"))
    return (max(per_output) if per_output else 0.0), per_output


def latency_ratio(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feeds: dict[str, np.ndarray],
                  pairs: int = 30, arrays_b: dict[str, np.ndarray] | None = None,
                  one_at_a_time: bool | None = None) -> tuple[float, float, float]:
    """(median seconds of a, of b, median of per-pair ratios b/a): one thread, optimizations on,
    interleaved pairs so that drifts in machine load hit both alike. ``arrays_b``: the weights of a
    light ``model_b`` (see :func:`session`). Models over 2 GB (or ``one_at_a_time``) are timed one
    after the other, one session in memory at a time; the ratio is then that of the medians."""
    if one_at_a_time is None:
        one_at_a_time = model_bytes(model_a) > TWO_GB
    if one_at_a_time:
        ta = _timed(session(model_a, optimize=True, threads=1), feeds, pairs)
        tb = _timed(session(model_b, optimize=True, threads=1, arrays=arrays_b), feeds, pairs)
        return float(np.median(ta)), float(np.median(tb)), float(np.median(tb) / np.median(ta))
    sa = session(model_a, optimize=True, threads=1)
    sb = session(model_b, optimize=True, threads=1, arrays=arrays_b)
    for s in (sa, sb):
        s.run(None, feeds)
    ta, tb = [], []
    for _ in range(pairs):
        for s, times in ((sa, ta), (sb, tb)):
            start = time.perf_counter()
            s.run(None, feeds)
            times.append(time.perf_counter() - start)
    ratios = np.array(tb) / np.array(ta)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(ratios))


def _timed(sess, feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times
