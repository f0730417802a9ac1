"""onnxruntime sessions, the deviation between two models, and latency.

Deviation of a result y' from a reference y, per probe sample and per graph output::

    d = ||y' − y||₂ / ||y||₂   (float64, or float32 norms for float32 tensors; ||y' − y||₂ itself where ||y||₂ = 0)

Entries where both are the same non-finite value are ignored; any other non-finite entry makes d
infinite. Integer and boolean tensors (labels, indices, masks) have no scale to be relative to: d is
the share of their entries that differ. An output is measured on the tensors :func:`measure_plan`
names (each part of a Concat on its own; the logits of a Softmax, LogSoftmax or Sigmoid and the
scores of an ArgMax, ArgMin or TopK besides its output); its deviation is the maximum over them.
The model's deviation is the maximum over outputs and samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError
from .model_io import IN_PLACE_MIN, TWO_GB, model_bytes, placeholder, without_initializers

SQUASHING_OPS = ("Softmax", "LogSoftmax", "Sigmoid")
#: Ops that pick entries of their first input (the scores): measured on those too, a change of a
#: label tells how often it flips, not how close the others came to flipping.
PICKING_OPS = ("ArgMax", "ArgMin", "TopK")
#: Ops that only move values (their output holds their first input's values): followed back from a graph output.
SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")
#: At most this many tensors per graph output; beyond, the output is measured as a whole.
MAX_PARTS = 32


@dataclass(frozen=True)
class Measured:
    """What one graph output's deviation is measured on: tensors of the input model, each with what it is.

    The output's deviation is the maximum of their deviations. A Concat (reached through ``SHAPE_OPS``)
    is measured part by part, so a small part is not hidden by a large one; a Softmax, LogSoftmax or
    Sigmoid is measured both on its input (the logits: a saturated squashing hides damage) and on its
    output (where the logits are large, a small relative change of them can be a large one of the
    probabilities); an ArgMax, ArgMin or TopK both on its input (the scores) and its output."""

    output: str
    tensors: tuple[str, ...]
    what: tuple[str, ...]  # per tensor, in words

    @property
    def label(self) -> str:
        if self.tensors == (self.output,):
            return "the output itself"
        return f"max over {len(self.tensors)}: " + "; ".join(self.what) if len(self.tensors) > 1 else self.what[0]


def measure_plan(model: onnx.ModelProto) -> list[Measured]:
    """Per graph output, the tensors whose deviation is measured (see :class:`Measured`)."""
    producer = {name: node for node in model.graph.node for name in node.output}
    constants = {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    plan = []
    for out in model.graph.output:
        parts: dict[str, str] = {}
        if not is_tensor(out):  # a sequence or map (ZipMap's): measured on the tensors it is made of
            node = producer.get(out.name)
            for name in (node.input if node is not None else []):
                if name and name not in constants:
                    inner: dict[str, str] = {}
                    _collect(name, "", producer, constants, inner, depth=1)
                    parts.update({t: what if not what.startswith("the output") else
                                  f"input of {node.op_type} '{node.name or out.name}'" for t, what in inner.items()})
            if not parts or len(parts) > MAX_PARTS:
                raise InputError(f"output '{out.name}' is not a tensor (a sequence or map) and is not made of tensors "
                                 "the tool can measure: nothing could check the result")
        else:
            _collect(out.name, "", producer, constants, parts, depth=0)
            if not parts or len(parts) > MAX_PARTS:
                parts = {out.name: "the output itself"}
        plan.append(Measured(out.name, tuple(parts), tuple(parts.values())))
    return plan


def is_tensor(value: onnx.ValueInfoProto) -> bool:
    """Whether a graph input or output is a tensor (not a sequence, map or optional)."""
    return value.type.WhichOneof("value") in ("tensor_type", "sparse_tensor_type", None)


def _collect(name: str, where: str, producer: dict, constants: set[str], parts: dict[str, str], depth: int) -> None:
    """Add the tensors that measure ``name`` to ``parts`` (tensor: what it is; ``where``: its place in the output)."""
    node, source = producer.get(name), name
    while node is not None and node.op_type in SHAPE_OPS and node.input:
        source = node.input[0]
        node = producer.get(source)
    if node is None or depth > 8 or node.op_type not in ("Concat", *SQUASHING_OPS, *PICKING_OPS):
        parts.setdefault(name, f"part {where.strip()}" if where else "the output itself")
        return
    if node.op_type == "Concat":
        inputs = [i for i in node.input if i and i not in constants]
        for k, part in enumerate(inputs):
            _collect(part, f"{where} {k + 1}/{len(inputs)} of Concat '{node.name or source}'", producer, constants,
                     parts, depth + 1)
        return
    here = f" (part {where.strip()})" if where else ""
    parts.setdefault(name, f"{node.op_type} '{node.name or source}' output{here}")
    logits = node.input[0]
    if logits not in constants:
        inner: dict[str, str] = {}
        _collect(logits, where, producer, constants, inner, depth + 1)
        for tensor, what in inner.items():
            if what.startswith(("part", "the output")):
                scores = "scores" if node.op_type in PICKING_OPS else "logits"
                what = f"{scores} before {node.op_type} '{node.name or source}'{here}"
            parts.setdefault(tensor, what)


def columns(plan: list[Measured], model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """For each tensor the input's ``plan`` measures: (its name in the input, the tensor of
    ``model`` that holds it, its graph output), without repeats.

    A rewrite may rename the tensors (fold removes an Identity before a Softmax, moves a bias):
    where ``model``'s own plan describes an output with the same words, its tensors pair in order;
    otherwise a tensor ``model`` no longer has is replaced by the graph output, compared whole."""
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    own = {m.output: m for m in measure_plan(model)}
    pairs = []
    for m in plan:
        if all(t in produced for t in m.tensors):
            pairs += [(t, t, m.output) for t in m.tensors]
        elif m.output in own and own[m.output].what == m.what:
            pairs += [(t, r, m.output) for t, r in zip(m.tensors, own[m.output].tensors)]
        else:
            pairs += [(t, t, m.output) if t in produced else (m.output, m.output, m.output) for t in m.tensors]
    return list(dict.fromkeys(pairs))


def measured_tensors(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The measured tensors of all outputs as two aligned lists: tensor, and the graph output it belongs to."""
    tensors, owners = [], []
    for m in measure_plan(model):
        tensors += m.tensors
        owners += [m.output] * len(m.tensors)
    return tensors, owners


def session(model: onnx.ModelProto, outputs: list[str] | None = None, optimize: bool | str = False,
            threads: int = 0, arrays: dict[str, np.ndarray] | None = None) -> ort.InferenceSession | FedSession:
    """A CPU session; all graph optimizations off unless ``optimize`` (True: ORT_ENABLE_ALL;
    "basic": ORT_ENABLE_BASIC, constant folding and fusions that keep the function up to float
    rounding, so that a codebook's Cast → Gather → Mul is decoded once, not on every run).

    ``outputs`` names the tensors to return (graph outputs or intermediate tensors). ``arrays``:
    the weights of a model from :func:`red_onnx.model_io.to_light_model` (or any initializers to
    read from these arrays instead of the model).
    """
    light, arrays = _split_weights(model, arrays or {})
    if outputs is not None and outputs != [o.name for o in model.graph.output]:
        light = _with_outputs(light, outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = {False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}.get(
        optimize, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors are reported by red_onnx, in one line
    if sum(a.nbytes for a in arrays.values()) < IN_PLACE_BYTES:  # serialized whole, as onnxruntime expects
        for init in light.graph.initializer:
            if init.name in arrays:
                init.CopyFrom(onnx.numpy_helper.from_array(arrays[init.name], init.name))
        return ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if not optimize:  # fed as inputs, which onnxruntime reads in place: no copy of any weight
        _as_inputs(light, arrays)
        return FedSession(ort.InferenceSession(light.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"]), arrays)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    options.add_external_initializers(list(arrays), values)  # constants to the optimizer (copied)
    sess = ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess._red_onnx_weights = (arrays, values)
    return sess


class FedSession:
    """A session whose large weights are graph inputs, fed on every run. onnxruntime 1.32 copies
    external initializers at session creation (a 1 GiB MLP's session took 1 GiB more); inputs it
    reads in place, as fast (0.12 s for 16 probes either way)."""

    def __init__(self, sess: ort.InferenceSession, weights: dict[str, np.ndarray]):
        self._sess, self._weights = sess, weights

    def run(self, names, feeds, *args, **kwargs):
        return self._sess.run(names, {**self._weights, **feeds}, *args, **kwargs)

    def get_inputs(self):
        return [i for i in self._sess.get_inputs() if i.name not in self._weights]

    def __getattr__(self, name):
        return getattr(self._sess, name)


def _as_inputs(light: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
    """The placeholders of ``arrays`` become graph inputs (typed) instead of initializers."""
    kept = [t for t in light.graph.initializer if t.name not in arrays]
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    inputs = {i.name for i in light.graph.input}
    for name, array in arrays.items():
        if name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))


#: The optimization level of the sessions that run the input and the result on the verification
#: probes: all of onnxruntime's (function-preserving up to float rounding; NCHWc convs run 0.78x
#: the unoptimized time on VGG-11, 0.55x on MobileNetV2; the result's codebooks decode once).
VERIFY_OPTIMIZATION = True

#: Weights above this many bytes reach onnxruntime as external initializers instead of inside the
#: serialized model (which protobuf cannot hold past 2 GB, and which costs copies of every weight:
#: a 0.5 GiB MLP's reference run took 3.2 GiB and 5.3 s serialized, 1.7 GiB and 0.8 s in place).
IN_PLACE_BYTES = 2**28


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
    """The model returning the tensors ``names``: graph outputs, or intermediate tensors (declared
    without a type, which onnxruntime infers)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name: o for o in copy.graph.output}
    del copy.graph.output[:]
    for name in names:
        copy.graph.output.append(known[name] if name in known else onnx.ValueInfoProto(name=name))
    return copy


def input_session(model: onnx.ModelProto, outputs: list[str] | None = None, optimize: bool = True
                  ) -> ort.InferenceSession:
    """The session on the user's input model: optimized as a result's verification session is
    (:data:`VERIFY_OPTIMIZATION`) where its weights are serialized with it and onnxruntime's
    optimizer takes it, else plain; a model onnxruntime cannot load plain is bad input."""
    if optimize and model_bytes(model) < IN_PLACE_BYTES:
        try:
            return session(model, outputs, optimize=VERIFY_OPTIMIZATION)
        except Exception:
            pass  # the plain session decides
    try:
        return session(model, outputs)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"onnxruntime cannot load the input model ({first}); "
                         "with --no-verify only exact rewrites are made") from None


def run(sess: ort.InferenceSession, probes: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs for each probe sample."""
    return [sess.run(None, feeds) for feeds in probes]


def sample_deviation(reference: np.ndarray, result: np.ndarray) -> float:
    """||y' − y||₂ / ||y||₂ of one output for one sample (see the module docstring). Two float32
    tensors: BLAS's scaled float32 norms (the difference of two float32 values is exact within a
    factor 2 of each other, and the norms are within ~1e-7 of their value; 40x faster than
    float64 on PP-OCRv6's 265k logits); else, or where those are not finite, in float64. Two
    integer or boolean tensors: the share of entries that differ."""
    if isinstance(reference, np.ndarray) and isinstance(result, np.ndarray) and reference.dtype.kind in "biu" \
            and result.dtype.kind in "biu":
        if reference.shape != result.shape:
            return float("inf")
        return float(np.count_nonzero(reference != result)) / reference.size if reference.size else 0.0
    if isinstance(reference, np.ndarray) and isinstance(result, np.ndarray) and reference.dtype == np.float32 \
            and result.dtype == np.float32 and reference.shape == result.shape:
        with np.errstate(invalid="ignore", over="ignore"):
            norm = float(np.linalg.norm(reference.ravel()))
            diff = float(np.linalg.norm(result.ravel() - reference.ravel()))
        if norm > 0 and np.isfinite(norm) and np.isfinite(diff):
            return diff / norm
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


def sample_deviations(references: list[list[np.ndarray]], results: list[list[np.ndarray]]) -> np.ndarray:
    """Deviation per probe sample (rows) and measured tensor (columns); NaN counts as infinite."""
    columns = len(references[0]) if references else 0
    d = np.array([[sample_deviation(y, y2) for y, y2 in zip(ref, res)] for ref, res in zip(references, results)],
                 dtype=np.float64).reshape(len(references), columns)
    d[np.isnan(d)] = np.inf
    return d


def deviation(references: list[list[np.ndarray]], results: list[list[np.ndarray]]) -> tuple[float, list[float]]:
    """(max deviation, max deviation per output) over samples, for outputs listed per sample."""
    d = sample_deviations(references, results)
    per_output = [float(v) for v in d.max(axis=0)] if d.size else [0.0] * d.shape[1]
    return (max(per_output) if per_output else 0.0), per_output


@dataclass
class Verification:
    """A result's deviation on ``n`` fresh probes: per sample and measured tensor, grouped by graph output."""

    per_sample: np.ndarray  # samples × measured tensors
    tensors: list[str]
    owners: list[str]  # per measured tensor, the graph output it belongs to
    norms: np.ndarray | None = None  # samples × measured tensors: ||y|| of the reference

    def rounding_max(self) -> float:
        """The deviation of an exact rewrite, float rounding's measure: ||y' − y|| relative to
        max(||y||, the median ||y|| of that tensor over the probes); a probe whose output nearly
        cancels (||y|| far below the typical norm) amplifies rounding in the plain ratio."""
        if self.norms is None or not self.per_sample.size:
            return self.max
        typical = np.median(self.norms, axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(self.norms > 0, self.norms / np.maximum(self.norms, typical), 1.0)
        return float(np.nanmax(self.per_sample * scale))

    @property
    def n(self) -> int:
        return self.per_sample.shape[0]

    @property
    def max(self) -> float:
        return float(self.per_sample.max()) if self.per_sample.size else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile over probes of each probe's worst output (linear interpolation)."""
        worst = self.per_sample.max(axis=1) if self.per_sample.size else np.zeros(1)
        return float(np.percentile(worst, q))

    def per_output(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for owner, d in zip(self.owners, self.per_sample.max(axis=0) if self.per_sample.size else []):
            result[owner] = max(result.get(owner, 0.0), float(d))
        return result

    def per_tensor(self) -> dict[str, float]:
        return {t: float(d) for t, d in zip(self.tensors, self.per_sample.max(axis=0))} if self.per_sample.size else {}


def promise(n: int, bound: float, exact: bool = False) -> str:
    """What ``n`` fresh probes, none above ``bound``, support (the rule of three: 0 of n at 95 % confidence)."""
    if exact:
        return (f"exact rewrites: on {n} fresh probes every output equals the input model's to float rounding "
                f"({bound:.3g} of its norm, or of its median norm over the probes where it is smaller)")
    return (f"on {n} fresh probes from the probe distribution no output deviated more than {bound:.3g}; the share of "
            f"such inputs above {bound:.3g} is below {min(3 / n, 1):.1%} with 95% confidence")


#: a latency sample repeats the model's run until it takes this long
SAMPLE_SECONDS = 2e-3
#: the fewest interleaved pairs a latency ratio is the median of
MIN_PAIRS = 7
#: a timing with ``decide_at`` stops early only once its pairs took this long (a small model's
#: pairs cost little, and 7 of them on a busy machine can all fall on the wrong side)
DECIDE_SECONDS = 0.25
#: ... and after FAR_PAIRS pairs where every ratio is beyond ``decide_at`` by this factor or more
#: (VGG-11 at tolerance 0.1 ran 0.2x the input's time: 4 more pairs of it cost 1.1 s)
FAR, FAR_PAIRS = 1.25, 3


def latency_ratio(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feeds: dict[str, np.ndarray],
                  pairs: int = 30, arrays_b: dict[str, np.ndarray] | None = None,
                  one_at_a_time: bool | None = None, seconds: float | None = None,
                  decide_at: float | None = None) -> tuple[float, float, float]:
    """(median seconds of a, of b, median of per-pair ratios b/a): one thread, optimizations on,
    interleaved pairs so that drifts in machine load hit both alike; each timing repeats the run
    until it takes SAMPLE_SECONDS (a 10 µs model is timed over 100 runs, not one). ``model_a``
    may be a session made by :func:`timing_session` (kept for several timings). ``arrays_b``:
    the weights of a light ``model_b`` (see :func:`session`); ``seconds``: fewer pairs (at least
    MIN_PAIRS) where ``pairs`` would take longer (a slow model's timings vary less); ``decide_at``:
    stop once MIN_PAIRS ratios or more lie on one side of it (:func:`_one_side`, a sign test: were
    the median ratio at ``decide_at``, 7 of 7 on one side has probability 1/64), or the first FAR_PAIRS
    are all beyond it by a factor FAR, and the pairs took DECIDE_SECONDS (a small model times all
    its pairs). Models over 2 GB (or
    ``one_at_a_time``) are timed one after the other, one session in memory at a time; the ratio
    is then that of the medians."""
    if one_at_a_time is None:
        one_at_a_time = not hasattr(model_a, "run") and model_bytes(model_a) > TWO_GB
    if one_at_a_time:
        ta = _timed(timing_session(model_a), feeds, pairs)
        tb = _timed(session(model_b, optimize=True, threads=1, arrays=arrays_b), feeds, pairs)
        return float(np.median(ta)), float(np.median(tb)), float(np.median(tb) / np.median(ta))
    sa = model_a if hasattr(model_a, "run") else timing_session(model_a)
    sb = session(model_b, optimize=True, threads=1, arrays=arrays_b)
    (repeats_a, once_a), (repeats_b, once_b) = _repeats(sa, feeds), _repeats(sb, feeds)
    repeats = max(repeats_a, repeats_b)
    if seconds is not None:
        pairs = max(MIN_PAIRS, min(pairs, int(seconds / (repeats * (once_a + once_b)))))
    ta, tb = [], []
    for _ in range(pairs):
        for s, times in ((sa, ta), (sb, tb)):
            start = time.perf_counter()
            for _ in range(repeats):
                s.run(None, feeds)
            times.append((time.perf_counter() - start) / repeats)
        if decide_at is not None and len(ta) >= FAR_PAIRS and (sum(ta) + sum(tb)) * repeats >= DECIDE_SECONDS:
            so_far = np.array(tb) / np.array(ta)
            if (so_far < decide_at / FAR).all() or (so_far > decide_at * FAR).all() or _one_side(so_far, decide_at):
                break
    ratios = np.array(tb) / np.array(ta)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(ratios))


def _one_side(ratios: np.ndarray, at: float) -> bool:
    """A sign test: whether the median of ``ratios`` lies on one side of ``at`` at the level of
    MIN_PAIRS of MIN_PAIRS pairs on one side (probability 2^-MIN_PAIRS each way, were the median
    at ``at``): k of n pairs on the other side (or on ``at``) pass where P(Bin(n, 1/2) <= k) is
    that small (1 of 11, 2 of 14, 3 of 17), so one slow outlier no longer costs every pair."""
    n = len(ratios)
    if n < MIN_PAIRS:
        return False
    other = n - max(int((ratios < at).sum()), int((ratios > at).sum()))
    return sum(math.comb(n, i) for i in range(other + 1)) <= 2 ** (n - MIN_PAIRS)


def timing_session(model: onnx.ModelProto):
    """The session :func:`latency_ratio` times a model in: one thread, all optimizations on."""
    return session(model, optimize=True, threads=1)


def _repeats(sess, feeds: dict[str, np.ndarray]) -> tuple[int, float]:
    """How many runs take SAMPLE_SECONDS, and the seconds of one (after a warm-up run)."""
    sess.run(None, feeds)
    start = time.perf_counter()
    sess.run(None, feeds)
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(np.ceil(SAMPLE_SECONDS / once))), once


def _timed(sess, feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times
