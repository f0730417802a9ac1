"""The pipeline: prepare → build → verify / back off → latency guard → finish → report.

:func:`compress` reads as those stages. :func:`prepare` loads and analyses the input model once
(read-only from then on) and runs it on the probes; each build runs the passes of
:data:`red_onnx.passes.SCHEDULE` on its own copy of the graph and of the shapes; the pipeline
owns the model, the probes and the reference outputs, and hands each build a Context.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import model_io, profile, verify
from .budget import DEFAULT_CHECK, DEFAULT_TOLERANCE, Budget, Probes, make_probes, random_probes, run_all
from .context import Context, PassResult, Progress
from .defaults import DEFAULT_MAX_DROP, DEFAULT_MAX_EVALS
from .errors import InputError, VerificationError
from .layers import LINEAR_OPS, QUANTIZED_OPS, Analysis, analyze, find_layers, input_specs, tensor_shapes, weightless
from .passes import AVAILABLE, PLANNED, SCHEDULE, fold
from .passes import hash as hash_pass
from .passes.codebook import INDEX_TYPES
from .report import Report

#: Relative deviation allowed for exact rewrites, by the model's float type (float rounding).
ROUNDING = {onnx.TensorProto.FLOAT: 1e-5, onnx.TensorProto.DOUBLE: 1e-5,
            onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 1e-2}
#: At tolerance 0, exact rewrites that deviate over float rounding's bound (ROUNDING) are still
#: accepted within this factor of the input's own rounding (:func:`_own_rounding`): a model that
#: amplifies rounding (an InstanceNormalization of a nearly constant channel) moves by as much when
#: onnxruntime folds its BatchNorms, or when its weights move by one unit in the last place, as
#: exact rewrites move them; the result's rounding and the reference's add up (two random conv
#: nets whose merges deviated 1.5e-5 and 2.6e-5: 1.2x and 1.0x their own)
OWN_ROUNDING_FACTOR = 2.0
#: Fraction of the tolerance the lossy passes first allocate; after a build whose fresh
#: verification probes disagree, :func:`next_margin` shrinks it, at most LOSSY_BUILDS times in all,
#: then exact rewrites only (margin 0).
FIRST_MARGIN = 0.8
LOSSY_BUILDS = 4
#: With hashing after them, the MAC-saving passes take an edit only if it removes at least this
#: share of the model's MACs per share of the squared budget it uses (2% for all of it): one
#: merge of MobileNetV2 took 24% of it at tolerance 0.03 for 0.04% of the MACs, and left hashing
#: nothing to spend (Budget.mac_worth).
MAC_WORTH = 0.02
#: After a failed build, at most this many of its worst fresh probes join the allocation probes.
TAIL_PROBES = 8
#: The latency guard acts when the result is slower than the input by more than this factor
#: (onnxruntime's timing noise, one thread, median of interleaved pairs).
LATENCY_SLACK = 1.03
#: A timing within these factors below and above LATENCY_SLACK is repeated, and the mean of the two
#: decides: the digits ResNet's separations at 0.1 timed 1.05 to 1.08 in four calls alone, and once,
#: in a bench run, under 1.03 (the bench then timed that result at 1.07); a reading nearer 1 (most
#: results) is not repeated
LATENCY_NEAR = (1.02, 1.05)
#: One timing of the guard takes about this long at most (fewer pairs for a slow model).
LATENCY_SECONDS = 1.0
#: The input's timing session is kept between the guard's timings for models under this size.
TIMING_SESSION_BYTES = 2**28
#: With the latency guard, channel spaces keep counts that are multiples of the first (or their
#: count before): unaligned counts ran 1.28-1.46x slower on onnxruntime CPU (the digits nets,
#: bench/prune_check.md). The guard tries the next ones, in order, once no separation is left to undo.
CHANNEL_ALIGNS = (8, 16)
#: Where the channel removals spent more than this share of the squared target before a conv
#: separation spent, a build with them stopped at it is tried too (build_best).
REMOVAL_SHARE = 0.5
#: ... and kept building only where, after its separations, it saves this share of the input's
#: MACs more than the first build.
REMOVAL_GAIN = 0.01


def next_margin(margin: float, deviation: float, tolerance: float) -> float:
    """The margin after a build at ``margin`` deviated ``deviation`` (over ``tolerance``) on the
    fresh probes: scaled by the overshoot with 10% to spare, ``margin · 0.9 · tolerance /
    deviation`` (the deviation grows about linearly with the budget spent), and at most 0.9x the
    last, so that edits whose deviation does not scale still back off; half if it is not finite."""
    if not math.isfinite(deviation):
        return margin / 2
    return margin * min(0.9 * tolerance / deviation, 0.9)


def resolve_passes(passes: Iterable[str] | str | None) -> list[str]:
    """Pass names in pipeline order; unknown or not-yet-implemented names are an InputError."""
    if passes is None:
        return [p for p in PLANNED if p in AVAILABLE]
    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",") if p.strip()]
    names = list(passes)
    for name in names:
        if name == fold.NAME:
            continue
        if name not in PLANNED:
            raise InputError(f"unknown pass '{name}' (passes: {', '.join(PLANNED)})")
        if name not in AVAILABLE:
            raise InputError(f"pass '{name}' is not implemented yet (available: "
                             f"{', '.join(AVAILABLE) or 'none besides canonicalization'})")
    return [p for p in PLANNED if p in names]


def _not_utf8(err: UnicodeDecodeError) -> InputError:
    return InputError(f"the model holds text that is not valid UTF-8 (a name or doc string: {err.reason})")


@dataclass
class Options:
    """The user's options, checked."""

    tolerance: float
    passes: list[str]
    seed: int
    check: int
    allocation: int
    input_shapes: dict[str, tuple[int, ...]] | None
    probe_inputs: dict[str, np.ndarray] | None
    probe_ranges: dict[str, tuple[float, float]] | None
    exclude: re.Pattern | None
    verify: bool
    latency_check: bool
    codebook: str
    log: Callable[[str], None]
    progress: Progress  # opts.log for long loops, throttled


@dataclass
class Prepared:
    """The input model, analysed once; nothing here changes after :func:`prepare`, but the probes
    and reference outputs that a back-off renews."""

    canonical: onnx.ModelProto | None  # the input's function, Constant nodes as initializers: what builds start from
    template: onnx.ModelProto  # the input without weights: what exports restore (opset, inputs, metadata)
    specs: dict
    shapes: Mapping[str, tuple[int, ...]]  # the input's static shapes (batch 1), read-only
    before: Analysis
    plan: list[verify.Measured]  # what each output's deviation is measured on
    ref_names: list[str]  # what the reference outputs hold
    probes: Probes
    reference: list[list[np.ndarray]] | None  # the input's outputs on the verification probes
    budget: Budget | None
    moved: int  # Constant nodes and sparse initializers turned into initializers
    timing: object = None  # the latency guard's session of the input (verify.timing_session), once made
    own_rounding: tuple | None = None  # (verification probes, _own_rounding on them), once measured
    #: each output's batch axis, by output name and probe count, as checked on a first run
    #: (:func:`red_onnx.budget.probe_runner`): later verifications run their probes as one batch unchecked
    batch_axes: dict = field(default_factory=dict)


@dataclass
class Build:
    """One build: the rewritten model (light, its weights in ``arrays``), what each pass did, the
    build's context, and its verification (None with --no-verify)."""

    light: onnx.ModelProto
    arrays: dict[str, np.ndarray]
    results: list[PassResult]
    ctx: Context
    margin: float
    checked: verify.Verification | None = None
    verified: bool = False
    rounding: float = 0.0  # exact rewrites: float rounding's bound where the model amplifies it (_own_rounding)

    def rewritten_by(self, module_name: str) -> frozenset[str]:
        """The layers that steps running the pass ``module_name`` replaced (e.g. the separated convs)."""
        steps = {s.name for s in SCHEDULE if s.module.NAME == module_name}
        return frozenset(name for r in self.results if r.name in steps for name in r.rewritten)


def compress(model: str | os.PathLike | onnx.ModelProto, tolerance: float = DEFAULT_TOLERANCE,
             passes: Iterable[str] | str | None = None, *, seed: int = 0, check: int = DEFAULT_CHECK,
             allocation: int = 16, input_shapes: dict[str, tuple[int, ...]] | None = None,
             probe_inputs: dict[str, np.ndarray] | None = None,
             probe_ranges: dict[str, tuple[float, float]] | None = None, exclude: str | None = None,
             verify_result: bool = True, latency_check: bool = True, codebook: str = "uint8",
             profile: str | os.PathLike | None = None, metric: Callable[[str], float] | str | None = None,
             max_drop: float = DEFAULT_MAX_DROP, max_evals: int = DEFAULT_MAX_EVALS,
             log: Callable[[str], None] | None = None
             ) -> tuple[onnx.ModelProto, Report]:
    """Compress a model; returns the rewritten model and its report.

    ``tolerance`` is the one error budget of the lossy steps (the deviation defined in
    :mod:`red_onnx.verify`); 0 allows exact rewrites only. Raises InputError on bad input and
    VerificationError when the result does not match the input model. The other options are
    :func:`compress_each`'s.

    ``metric`` (a function of an ONNX file's path returning a float, higher is better; or
    "FILE.py:FUNCTION"): instead of ``tolerance``, search for the result that saves the most whose
    metric is at most ``max_drop`` below the input's, in at most ``max_evals`` metric calls
    (:mod:`red_onnx.metric`); ``report.metric`` holds every scored point.
    """
    if metric is not None:
        from . import metric as metric_module

        if isinstance(metric, str):
            metric = metric_module.load(metric)
        if not (max_drop >= 0 and math.isfinite(max_drop)):
            raise InputError(f"--max-drop must be a finite number >= 0, got {max_drop}")
        if max_evals < 1:
            raise InputError(f"--max-evals must be at least 1, got {max_evals}")
        base, warnings = metric_module.baseline(metric, model, max_drop)
        search = metric_module.Search(base, max_drop, max_evals, warnings=warnings)
        compressor = Compressor(model, passes, max(metric_module.LADDER), seed=seed, check=check,
                                allocation=allocation, input_shapes=input_shapes, probe_inputs=probe_inputs,
                                probe_ranges=probe_ranges, exclude=exclude, verify_result=verify_result,
                                latency_check=latency_check, codebook=codebook, profile=profile, log=log)
        result, report = metric_module.run(compressor, metric, search, compressor.opts.log)
        report.metric = search.to_dict()
        report.notes += search.warnings
        return result, report
    _, result, report = next(compress_each(
        model, [tolerance], passes, seed=seed, check=check, allocation=allocation, input_shapes=input_shapes,
        probe_inputs=probe_inputs, probe_ranges=probe_ranges, exclude=exclude, verify_result=verify_result,
        latency_check=latency_check, codebook=codebook, profile=profile, log=log))
    return result, report


def compress_each(model: str | os.PathLike | onnx.ModelProto, tolerances: Iterable[float] = (DEFAULT_TOLERANCE,),
                  passes: Iterable[str] | str | None = None, *, seed: int = 0, check: int = DEFAULT_CHECK,
                  allocation: int = 16, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  probe_inputs: dict[str, np.ndarray] | None = None,
                  probe_ranges: dict[str, tuple[float, float]] | None = None, exclude: str | None = None,
                  verify_result: bool = True, latency_check: bool = True, codebook: str = "uint8",
                  profile: str | os.PathLike | None = None, log: Callable[[str], None] | None = None
                  ) -> Iterator[tuple[float, onnx.ModelProto, Report]]:
    """Compress a model at each tolerance: yields ``(tolerance, model, report)`` per tolerance, in
    the order given, each built and verified on its own (as :func:`compress` would), from one
    preparation: the input is loaded, analysed and run on the probes once, and the sensitivity
    profile (:mod:`red_onnx.profile`) measured for one tolerance serves the others.

    ``latency_check`` undoes the conv separations when onnxruntime runs the result slower than the
    input. ``codebook`` ("uint8", "auto" = uint8 or uint16, "off") sets how few-valued weights are
    stored. ``profile``: a file the profile is read from (if it exists and was measured on this
    model and these probe settings; another one is an InputError) and saved to after each tolerance.
    """
    tolerances = list(dict.fromkeys(float(t) for t in tolerances))
    if not tolerances:
        raise InputError("--tolerance: give at least one value")
    for t in tolerances:
        _check_tolerance(t)
    compressor = Compressor(model, passes, max(tolerances), seed=seed, check=check, allocation=allocation,
                            input_shapes=input_shapes, probe_inputs=probe_inputs, probe_ranges=probe_ranges,
                            exclude=exclude, verify_result=verify_result, latency_check=latency_check,
                            codebook=codebook, profile=profile, log=log)
    for k, tolerance in enumerate(tolerances):
        yield (tolerance, *compressor.at(tolerance, release=k == len(tolerances) - 1))


class Compressor:
    """One preparation of a model (loaded, analysed, run on the probes, its profile read), from
    which :meth:`at` builds, verifies and reports a result at any tolerance up to
    ``max_tolerance`` (above 0 for lossy results), the later ones reusing the profile."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, passes: Iterable[str] | str | None,
                 max_tolerance: float, *, seed: int = 0, check: int = DEFAULT_CHECK, allocation: int = 16,
                 input_shapes: dict[str, tuple[int, ...]] | None = None,
                 probe_inputs: dict[str, np.ndarray] | None = None,
                 probe_ranges: dict[str, tuple[float, float]] | None = None, exclude: str | None = None,
                 verify_result: bool = True, latency_check: bool = True, codebook: str = "uint8",
                 profile: str | os.PathLike | None = None, log: Callable[[str], None] | None = None):
        self.start = time.perf_counter()
        self.opts = _options(max_tolerance, passes, seed, check, allocation, input_shapes, probe_inputs,
                             probe_ranges, exclude, verify_result, latency_check, codebook, log)
        self.input = Report(tolerance=max_tolerance)  # what prepare learns about the input
        self.prep = prepare(model, self.opts, self.input, profile)
        self.initial = _probe_state(self.prep)
        self.profile_path = profile

    def at(self, tolerance: float, release: bool = False) -> tuple[onnx.ModelProto, Report]:
        """The verified result at ``tolerance``; ``release``: no later call (frees the input's weights)."""
        _check_tolerance(tolerance)
        prep, opts, first = self.prep, self.opts, self.input
        report = Report(tolerance=tolerance, notes=list(first.notes), params_before=first.params_before,
                        macs_before=first.macs_before, bytes_before=first.bytes_before,
                        op_counts_before=first.op_counts_before)
        opts.tolerance = tolerance if opts.verify else 0.0
        _restore_probe_state(prep, self.initial)
        guard = opts.latency_check and opts.verify  # without verification onnxruntime may not run it
        accepted = build_verified(prep, opts, report, channel_align=CHANNEL_ALIGNS[0] if guard else 1)
        if guard:
            accepted = latency_guard(prep, opts, report, accepted)
        result = finish(prep, accepted, release=release)
        _fill_report(report, prep, accepted, result, opts)
        if self.profile_path is not None and prep.budget is not None:
            prep.budget.profile.save(self.profile_path)
        report.seconds = time.perf_counter() - self.start
        self.start = time.perf_counter()
        return result, report


def _probe_state(prep: Prepared) -> tuple:
    """What a back-off changes: the verification probes and their reference, the allocation probes."""
    budget = prep.budget
    return (prep.probes.verification, prep.reference, budget and budget.probes, budget and budget.reference)


def _restore_probe_state(prep: Prepared, state: tuple) -> None:
    prep.probes.verification, prep.reference = state[0], state[1]
    if prep.budget is not None:
        prep.budget.probes, prep.budget.reference = state[2], state[3]


def _check_tolerance(tolerance: float) -> None:
    if tolerance < 0 or not np.isfinite(tolerance):
        raise InputError(f"--tolerance must be a finite number >= 0, got {tolerance}")


def _options(tolerance, passes, seed, check, allocation, input_shapes, probe_inputs, probe_ranges, exclude,
             verify_result, latency_check, codebook, log) -> Options:
    _check_tolerance(tolerance)
    if codebook not in INDEX_TYPES:
        raise InputError(f"--codebook must be one of {', '.join(INDEX_TYPES)}, got '{codebook}'")
    if check < 1:
        raise InputError(f"--check must be at least 1, got {check}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"--seed must be an integer >= 0, got {seed}")
    names = resolve_passes(passes)
    try:
        pattern = re.compile(exclude) if exclude else None
    except re.error as err:
        raise InputError(f"--exclude: invalid regular expression ({err})") from None
    progress = Progress(log or (lambda message: None), shown=log is not None)
    return Options(tolerance, names, seed, check, allocation, input_shapes, probe_inputs, probe_ranges, pattern,
                   verify_result, latency_check, codebook, progress.log, progress)


def prepare(model: str | os.PathLike | onnx.ModelProto, opts: Options, report: Report,
            profile_path: str | os.PathLike | None = None) -> Prepared:
    """Load and analyse the input, run it on the probes, and canonicalize its constants; read the
    profile saved at ``profile_path`` if there is one."""
    opts.log("loading")
    original = model_io.load(model, report.notes)
    specs = input_specs(original, opts.input_shapes)
    _notes_on_input(original, opts, report)
    before = analyze(original, specs)
    report.params_before, report.macs_before = before.params, before.macs
    if before.unknown:
        report.notes.append(f"MACs leave out {len(before.unknown)} linear node(s) whose shapes onnx's shape inference "
                            f"cannot tell ('{before.unknown[0]}'{', …' if len(before.unknown) > 1 else ''})")
    report.bytes_before = model_io.model_bytes(original)
    report.op_counts_before = dict(before.op_counts)
    _check_weights(original)

    plan = verify.measure_plan(original)
    measured, _ = verify.measured_tensors(original)
    ref_names = list(dict.fromkeys(measured + [o.name for o in original.graph.output if verify.is_tensor(o)]))
    if opts.probe_inputs is None:
        _integer_probe_ranges(original, specs, opts, report)
    probes = make_probes(specs, opts.seed, opts.allocation, opts.check, opts.probe_ranges, opts.probe_inputs)
    reference, budget, batch_axes = None, None, {}
    if opts.verify:  # one session on the input model for both probe sets
        if opts.tolerance > 0 and "hash" in opts.passes and INDEX_TYPES[opts.codebook]:
            hash_pass.start_warm_up()  # while onnxruntime runs the reference (after the input's checks)
        opts.log(f"running the input model on {len(probes.allocation)} + {len(probes.verification)} probes")
        ref_session = verify.input_session(original, ref_names)
        try:
            reference = _finite(_run_all(ref_session, probes.verification, input_model=True, known=batch_axes),
                                ref_names)
        except InputError:  # as the model is written, not as onnxruntime's optimizer rewrote it
            ref_session = verify.input_session(original, ref_names, optimize=False)
            reference = _finite(_run_all(ref_session, probes.verification, input_model=True), ref_names)
        for m in plan:
            if len(reference) > 1 and all(_same_on_every_probe(reference, ref_names.index(t)) for t in m.tensors):
                report.notes.append(f"output '{m.output}' is the same on every probe, so its deviation checks that "
                                    f"one value: where it should vary, give --probe-range or --probe-inputs")
        if opts.tolerance > 0:
            allocation = _finite(_run_all(ref_session, probes.allocation, input_model=True, known=batch_axes),
                                 ref_names)
            measured_before = None
            if profile_path is not None:
                measured_before = profile.load(profile_path, profile.fingerprint(
                    model_io.model_digest(original), specs, opts.seed, opts.allocation, opts.probe_ranges,
                    opts.probe_inputs))
            budget = Budget(opts.tolerance, probes.allocation, allocation, ref_names, plan, progress=opts.progress,
                            profile=measured_before)
            budget.memo["batch axes"] = batch_axes
            if "hash" in opts.passes and INDEX_TYPES[opts.codebook]:
                budget.mac_worth, budget.macs = MAC_WORTH, before.macs
        del ref_session
        _release_freed_memory()

    shapes = tensor_shapes(original, specs)
    # from here on the input's weights live in `canonical` only (same function): `template` keeps
    # what to_model restores (opset, inputs, metadata, initializer names), not a second copy of them
    template = weightless(original, keep=0)
    if isinstance(model, onnx.ModelProto):  # the caller's object is never modified
        canonical = onnx.ModelProto()
        canonical.CopyFrom(original)
    else:  # read from a file here: ours to canonicalize in place
        canonical = original
    moved = fold.constants_to_initializers(canonical)
    return Prepared(canonical, template, specs, MappingProxyType(shapes), before, plan, ref_names,
                    probes, reference, budget, moved, batch_axes=batch_axes)


def _release_freed_memory() -> None:
    """Give the heap memory freed since (the reference session's weight copies) back to the
    system. glibc serves allocations under its mmap threshold (raised up to 32 MiB after the first
    large free) from the heap, and keeps what they free: a 1 GiB MLP of 16 MiB layers held 1.7 GiB
    after its reference run. No-op where libc has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _integer_probe_ranges(original: onnx.ModelProto, specs: dict, opts: Options, report: Report) -> None:
    """Integer inputs without a --probe-range: one that only indexes the rows of constant tables
    (Gather on axis 0: token ids into an embedding) is probed uniformly over the rows every table
    has; a uint8 or int8 one (an image's pixels) over all its values; any other stays 0 on every
    probe, which the report says (all probes then agree on it)."""
    constants = {t.name: tuple(t.dims) for t in original.graph.initializer}
    constants.update({n.output[0]: tuple(a.t.dims) for n in original.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    given = dict(opts.probe_ranges or {})
    for name, (_, dtype) in specs.items():
        if np.dtype(dtype) == np.bool_ and name not in given and opts.tolerance > 0:
            report.notes.append(f"boolean input '{name}' is False on every probe: give --probe-range {name}:0,1 "
                                f"(random values) or --probe-inputs so that the probes vary it")
        if not np.issubdtype(dtype, np.integer) or name in given:
            continue
        readers = [n for n in original.graph.node if name in n.input]
        rows = [constants.get(n.input[0], ())[:1] for n in readers
                if n.op_type == "Gather" and list(n.input[1:]) == [name]
                and {a.name: a.i for a in n.attribute}.get("axis", 0) == 0]
        table = min(rows)[0] if readers and len(rows) == len(readers) and all(rows) else 0  # rows every table has
        if table == 1:
            continue  # a one-row table: 0 is its only index
        if table > 1:
            given[name] = (0.0, float(table - 1))
            report.notes.append(f"integer input '{name}' probed uniformly in 0..{table - 1}, the rows of the "
                                f"table(s) it indexes (--probe-range {name}:LOW,HIGH or --probe-inputs to choose)")
        elif np.dtype(dtype).itemsize == 1:  # uint8 / int8: an image's pixels, most often
            info = np.iinfo(dtype)
            given[name] = (float(info.min), float(info.max))
            report.notes.append(f"integer input '{name}' ({np.dtype(dtype).name}) probed uniformly over all its values, "
                                f"{info.min}..{info.max} (--probe-range {name}:LOW,HIGH or --probe-inputs to choose)")
        elif opts.tolerance > 0:
            report.notes.append(f"integer input '{name}' is 0 on every probe: give --probe-range {name}:LOW,HIGH or "
                                f"--probe-inputs so that the probes vary it")
    opts.probe_ranges = given or opts.probe_ranges


def _notes_on_input(original: onnx.ModelProto, opts: Options, report: Report) -> None:
    for inp in original.graph.input:
        dims = inp.type.tensor_type.shape.dim
        free = [d.dim_param or "?" for d in list(dims)[1:] if not d.dim_value > 0]
        if free and inp.name in (opts.input_shapes or {}):
            report.notes.append(f"input '{inp.name}' keeps its dynamic dimension(s) {', '.join(free)}; the result was "
                                f"built and verified at {'x'.join(map(str, opts.input_shapes[inp.name]))} only")
    custom = sorted({n.domain for n in original.graph.node if n.domain not in model_io.STANDARD_DOMAINS})
    if any(n.op_type in QUANTIZED_OPS for n in original.graph.node):
        report.notes.append("the model is already quantized: its quantized layers are left alone")
    if not opts.verify and opts.tolerance > 0:
        report.notes.append("--no-verify: lossy steps need verification, so only exact rewrites were made")
        opts.tolerance = 0.0
    if custom:
        report.notes.append(f"ops of domains other than ai.onnx ({', '.join(custom)}) are left alone")


def build_best(prep: Prepared, opts: Options, margin: float, keep_dense: frozenset[str] = frozenset(),
               channel_align: int = 1) -> Build:
    """:func:`build`; where its channel removals spent over REMOVAL_SHARE of the squared target
    and a conv separation competed for the rest, also the build whose removals stop at that share,
    and the one of the two that saves more (MACs, then bytes). The passes spend in schedule order,
    so the first takes what fits before the second offers anything: on MTCNN O-Net at 0.5 the
    removals took 0.28 of the 0.4 target and left the separations one more edit (MACs 0.705);
    stopped at half, they left them room (MACs 0.436)."""
    first = build(prep, opts, margin, keep_dense, channel_align)
    if margin == 0 or not _removals_compete(first, REMOVAL_SHARE * (margin * opts.tolerance) ** 2):
        return first
    opts.log(f"channel removals took over {REMOVAL_SHARE:.0%} of the squared target: also built with them stopped there")
    first_key = _saving_key(prep, first)
    second = build(prep, opts, margin, keep_dense, channel_align, removal_share=REMOVAL_SHARE,
                   macs_to_beat=first_key[0] - REMOVAL_GAIN * prep.before.macs)
    return second if second is not None and _saving_key(prep, second) < first_key else first


def _removals_compete(current: Build, squared: float) -> bool:
    """Whether the build's channel removals spent over ``squared`` (deviation²) and a separation
    spend followed them."""
    counts = {r.name: r.counts for r in current.results}
    removals = counts.get("merge", {}).get("deviation_allocated", counts.get("prune", {}).get("deviation_allocated"))
    return removals is not None and removals ** 2 > squared and "deviation_allocated" in counts.get("separate", {})


def _graph_macs(ctx: Context, prep: Prepared) -> int:
    return analyze(model_io.snapshot(ctx.graph, prep.template)[0], prep.specs).macs


def _saving_key(prep: Prepared, current: Build) -> tuple[int, int]:
    """(MACs, bytes) of a build: the lower, the more it saves."""
    return (analyze(current.light, prep.specs).macs,
            current.light.ByteSize() + sum(a.nbytes for a in current.arrays.values()))


def build(prep: Prepared, opts: Options, margin: float, keep_dense: frozenset[str] = frozenset(),
          channel_align: int = 1, removal_share: float = 1.0, macs_to_beat: int | None = None) -> Build | None:
    """Run the schedule on a fresh copy of the canonical model, lossy steps spending ``margin ×
    tolerance`` (none at margin 0); export it light (weights stay in the graph's arrays). None
    where, after the conv separations, the graph has more than ``macs_to_beat`` MACs."""
    budget = prep.budget if margin > 0 else None
    if budget is not None:
        budget.tolerance, budget.target = opts.tolerance, margin * opts.tolerance
        budget.after = 0.0  # canonicalization is exact
    ctx = Context(graph=model_io.to_graph(prep.canonical), template=prep.template, shapes=dict(prep.shapes),
                  budget=budget, exclude=opts.exclude, keep_dense=keep_dense, channel_align=channel_align,
                  removal_share=removal_share,
                  passes=frozenset(opts.passes), latency_check=opts.latency_check,
                  codebook=opts.codebook, log=opts.log, progress_log=opts.progress,
                  memo=prep.budget.memo if prep.budget is not None else {})
    results = []
    for step in SCHEDULE:
        if step.wanted(opts.passes):
            results.append(_run_step(step, ctx))
            if step.name == "separate" and macs_to_beat is not None and _graph_macs(ctx, prep) > macs_to_beat:
                return None
    if prep.moved:
        results[0].counts["constants_to_initializers"] = prep.moved
        results[0].modified = True
    try:
        light, arrays = model_io.to_light_model(ctx.graph, prep.template)
    except UnicodeDecodeError as err:
        raise _not_utf8(err) from None
    try:
        model_io.check_structure(light)
    except Exception as err:
        raise RuntimeError(f"the rewritten model fails onnx.checker: {err}") from err
    return Build(light, arrays, results, ctx, margin)


def _run_step(step, ctx: Context) -> PassResult:
    ctx.log(f"pass {step.name}")
    try:
        return step.run(ctx)
    except (InputError, VerificationError):
        raise
    except UnicodeDecodeError as err:  # a pass that exports the graph meets a broken name
        raise _not_utf8(err) from None
    except Exception as err:
        raise RuntimeError(f"pass '{step.name}' failed: {err}") from err


def build_verified(prep: Prepared, opts: Options, report: Report, keep_dense: frozenset[str] = frozenset(),
                   channel_align: int = 1, first_margin: float = FIRST_MARGIN) -> Build:
    """Build at decreasing margins, from ``first_margin``, until the fresh probes agree (see
    :func:`back_off`)."""
    lossy_ok = prep.budget is not None and opts.tolerance > 0 and first_margin > 0
    margin, lossy = (first_margin, LOSSY_BUILDS) if lossy_ok else (0.0, 0)
    for attempt in range(1, LOSSY_BUILDS + 2):
        opts.log(f"build {attempt} of at most {attempt + lossy}: " + (
            f"lossy edits up to {margin:.2g}x the tolerance" if margin > 0 else "exact rewrites only"))
        attempt_build = build_best(prep, opts, margin, keep_dense, channel_align)
        if not opts.verify:
            return attempt_build
        opts.log(f"verifying build {attempt} on {len(prep.probes.verification)} fresh probes")
        checked = _verify(attempt_build.light, prep, attempt_build.arrays, report)
        attempt_build.checked = checked
        allowed = opts.tolerance if margin > 0 else max(opts.tolerance, _rounding(prep.template))
        if checked.max <= allowed or margin == 0 and checked.rounding_max() <= _rounding(prep.template):
            attempt_build.verified = True
            return attempt_build
        if margin == 0:
            if prep.own_rounding is None or prep.own_rounding[0] is not prep.probes.verification:
                prep.own_rounding = (prep.probes.verification, _own_rounding(prep, report))  # once per probe set
            own = prep.own_rounding[1]
            if checked.rounding_max() <= OWN_ROUNDING_FACTOR * own:
                attempt_build.rounding = OWN_ROUNDING_FACTOR * own
                attempt_build.verified = True
                report.notes[:] = [n for n in report.notes if not n.startswith("the exact rewrites deviate")]
                report.notes.append(  # once per call: a later build (the latency guard's) replaces it
                    f"the exact rewrites deviate {checked.rounding_max():.3g}, over float rounding's "
                    f"{_rounding(prep.template):g}: this model amplifies rounding (its own outputs move by {own:.3g} "
                    f"between onnxruntime's plain and optimized runs, or with its weights one unit in the last place "
                    f"off); accepted within {OWN_ROUNDING_FACTOR:g}x that")
                return attempt_build
            raise VerificationError(f"the rewritten model deviates by {checked.max:.3g} from the input model on fresh "
                                    f"probes (allowed {allowed:g}); nothing written. This is a bug: please report it")
        lossy -= 1
        margin = back_off(prep, opts, report, checked, attempt, margin, lossy)
    raise AssertionError("unreachable: the last build is exact")


def back_off(prep: Prepared, opts: Options, report: Report, checked: verify.Verification, attempt: int,
             margin: float, lossy: int) -> float:
    """After a lossy build deviated over the tolerance on its fresh probes: the next margin.

    With random probes, the build's worst fresh probes join the allocation probes and the next
    build is verified on new draws (a probe that chose a build never verifies it), at 0.9x the
    margin; with the user's probe samples, the margin shrinks by the overshoot
    (:func:`next_margin`). No lossy builds left: 0 (exact rewrites only)."""
    note = (f"build {attempt}: lossy edits chosen at {margin:.2g}x the tolerance deviated {checked.max:.3g} on "
            f"{checked.n} fresh probes (tolerance {opts.tolerance:g}); backed off")
    if opts.probe_inputs is None and lossy > 0:
        learned = _learn_tail(checked, prep.budget, prep.probes, prep.reference, margin * opts.tolerance)
        prep.reference = _fresh_verification(prep.canonical, prep.ref_names, prep.probes, prep.specs,
                                             opts.probe_ranges, opts.seed, attempt, prep.batch_axes)
        note += f" with its {learned} worst probe(s) added to the allocation probes and new fresh probes"
        margin *= 0.9
    else:
        margin = next_margin(margin, checked.max, opts.tolerance) if lossy > 0 else 0.0
    report.notes.append(note)
    opts.log(note)
    return margin


def latency_guard(prep: Prepared, opts: Options, report: Report, current: Build) -> Build:
    """While onnxruntime runs the result slower than the input (beyond LATENCY_SLACK), take the
    next fix and rebuild: undo the conv separations; then keep every channel space's count a
    multiple of the next of CHANNEL_ALIGNS (16 after the builds' 8: onnxruntime's CPU kernels work
    on channel blocks of 8 with AVX2 and 16 with AVX-512; which one matters is measured, not
    assumed); then remove no channel."""
    keep_dense: frozenset[str] = frozenset()
    align = current.ctx.channel_align
    aligns = iter([a for a in CHANNEL_ALIGNS if align and a > align])
    while True:
        separated = current.rewritten_by("separate") - keep_dense
        removed = align != 0 and _channels_removed(current)
        if not separated and not removed and not report.latency.get("fixes"):
            break  # nothing that can cost time (after a fix, the final build is timed too)
        opts.log("timing the result against the input (latency guard)")
        t_in, t_out, ratio = _latency(prep, current)
        fixes = report.latency.get("fixes", [])
        report.latency = {"input_ms": round(t_in * 1e3, 4), "result_ms": round(t_out * 1e3, 4),
                          "ratio": round(ratio, 4), "separations_undone": report.latency.get("separations_undone", 0),
                          "channel_align": align, "fixes": fixes}
        if ratio <= LATENCY_SLACK or not separated and not removed:
            break
        if separated:
            keep_dense |= separated
            report.latency["separations_undone"] += len(separated)
            fix = f"{len(separated)} conv separation(s) undone"
        else:
            align = next(aligns, 0)
            fix = (f"channel counts kept at multiples of {align}" if align else
                   "no channel removed (every channel space keeps its count)")
        fixes.append({"ratio_before": round(ratio, 4), "fix": fix})
        report.notes.append(f"latency guard: the result ran {ratio:.2f}x the input's time in onnxruntime; {fix}")
        opts.log(report.notes[-1])
        # from the margin the last build was verified at: a fix spends no more than it did
        current = build_verified(prep, opts, report, keep_dense, align, first_margin=current.margin)
    return current


def _latency(prep: Prepared, current: Build) -> tuple[float, float, float]:
    """verify.latency_ratio of the result to the input (stopped early where clearly on one side of
    LATENCY_SLACK); where well over it, timed again and the faster of the two kept (a busy machine
    slows one timing, rarely two); where near it (LATENCY_NEAR), timed again and the mean of the
    two kept. The input's timing session is made once per call where the model is under 256 MiB
    (else once per timing)."""
    if model_io.model_bytes(prep.canonical) >= TIMING_SESSION_BYTES:
        timing = prep.canonical  # a large model's second copy is not kept (nor over 2 GB, made at all)
    else:
        prep.timing = timing = prep.timing or verify.timing_session(prep.canonical)

    def timing_once():
        return verify.latency_ratio(timing, current.light, prep.probes.verification[0], arrays_b=current.arrays,
                                    seconds=LATENCY_SECONDS, decide_at=LATENCY_SLACK)

    timed = timing_once()
    below, above = LATENCY_NEAR
    if timed[2] > LATENCY_SLACK * above:  # well over: a busy machine slows one timing, rarely two
        timed = min(timed, timing_once(), key=lambda t: t[2])
    elif timed[2] > LATENCY_SLACK / below:  # near it: decided on the mean of two timings
        timed = tuple((a + b) / 2 for a, b in zip(timed, timing_once()))
    return timed


def _channels_removed(current: Build) -> bool:
    return any(r.counts.get(k) for r in current.results
               for k in ("channels_merged", "dead_removed", "channels_pruned", "constant_channels_folded"))


def finish(prep: Prepared, accepted: Build, release: bool = True) -> onnx.ModelProto:
    """The accepted build as a full model; with ``release`` (no build follows), the input's
    weights are released first. Where no step changed anything, the input as loaded (an export
    of the graph would name its unnamed nodes and reorder them: 130 bytes more on a 2.7 KiB model)."""
    if not prep.moved and not any(r.modified for r in accepted.results) and prep.canonical is not None:
        unchanged = prep.canonical
        if release:
            prep.canonical = prep.timing = None
        else:
            unchanged = onnx.ModelProto()
            unchanged.CopyFrom(prep.canonical)
        accepted.light = accepted.arrays = None
        return unchanged
    if release:
        for tensor in accepted.ctx.graph.tensors().values():  # the graph takes its own copy of every weight ...
            if isinstance(tensor, gs.Constant):
                tensor.values  # noqa: B018 (loads a lazily imported weight)
        prep.canonical = prep.timing = None  # ... so the input's copy can go before the result is exported
    accepted.light = accepted.arrays = None
    _release_freed_memory()  # the sessions' copies are gone: the result's weights need that memory
    try:
        return model_io.to_full_model(accepted.ctx.graph, prep.template)
    except UnicodeDecodeError as err:
        raise _not_utf8(err) from None


def _fill_report(report: Report, prep: Prepared, accepted: Build, result: onnx.ModelProto, opts: Options) -> None:
    report.verified = accepted.verified
    if accepted.checked is not None:
        _report_verification(report, accepted.checked, prep.plan,
                             opts.tolerance if opts.tolerance > 0 else max(_rounding(prep.template), accepted.rounding))
    after = analyze(result, prep.specs)
    report.params_after, report.macs_after = after.params, after.macs
    report.bytes_after = model_io.model_bytes(result)
    report.op_counts_after = dict(after.op_counts)
    report.passes = [{"name": r.name, "seconds": round(r.seconds, 4), "modified": r.modified, **r.counts}
                     for r in accepted.results]
    report.left_alone = [{"name": a.name, "pass": a.pass_name, "reason": a.reason}
                         for r in accepted.results for a in r.left_alone]
    report.layers = _layer_rows(accepted.ctx, prep.before.macs_per_node, after, accepted.results)
    if prep.budget is not None:
        measured = prep.budget.profile
        report.profile = {"entries": len(measured.added), "measured": measured.measured, "reused": measured.reused,
                          "predictions": list(measured.predictions)}
        measured.measured = measured.reused = 0
        measured.predictions.clear()


def _same_on_every_probe(outputs: list[list[np.ndarray]], k: int) -> bool:
    first = np.asarray(outputs[0][k])
    return all(np.array_equal(np.asarray(sample[k]), first) for sample in outputs[1:])


def _finite(outputs: list[list[np.ndarray]], names: list[str]) -> list[list[np.ndarray]]:
    """The input model's outputs on the probes. A measured tensor with no finite value on a probe
    checks nothing there (its deviation would read 0): bad input, with the likely cause."""
    for k, sample in enumerate(outputs):
        for name, y in zip(names, sample):
            y = np.asarray(y)
            if y.dtype.kind == "f" and y.size and not np.isfinite(y).any():
                raise InputError(f"the input model's '{name}' has no finite value on probe {k}, so no deviation can be "
                                 "measured there: check --probe-range / --probe-inputs (values the model overflows on?)")
    return outputs


def _learn_tail(checked: verify.Verification, budget: Budget, probes, reference, target: float) -> int:
    """Move the fresh probes that deviated over ``target`` (the worst ``TAIL_PROBES``) to the
    budget's allocation probes, with their reference outputs: the next build spends with them."""
    worst = checked.per_sample.max(axis=1)
    chosen = [int(k) for k in np.argsort(-worst)[:TAIL_PROBES] if worst[k] > target]
    budget.add_probes([probes.verification[k] for k in chosen], [reference[k] for k in chosen])
    return len(chosen)


def _fresh_verification(model: onnx.ModelProto, ref_names: list[str], probes, specs, ranges, seed: int,
                        attempt: int, known: dict | None = None) -> list[list[np.ndarray]]:
    """Replace the verification probes by new draws (a probe that chose a build never verifies it);
    returns the input model's outputs on them."""
    rng = np.random.default_rng([seed, attempt])
    probes.verification = random_probes(specs, len(probes.verification), rng, ranges)
    return _run_all(verify.input_session(model, ref_names), probes.verification, input_model=True, known=known)


def _run_all(sess, probes: list[dict], input_model: bool = False, known: dict | None = None
             ) -> list[list[np.ndarray]]:
    """Every probe's outputs (:func:`budget.run_all`); the input model failing on them is bad input."""
    try:
        return run_all(sess, probes, known)
    except Exception as err:
        if not input_model:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"onnxruntime cannot run the input model on probes of its input shapes ({first})") from None


def _verify(result_model: onnx.ModelProto, prep: Prepared, arrays: dict[str, np.ndarray] | None,
            report: Report, optimize: bool | str = verify.VERIFY_OPTIMIZATION) -> verify.Verification:
    """Deviation of the result from the input model on the verification probes, on the tensors
    :func:`verify.columns` pairs; a result onnxruntime cannot run deviates infinitely (a bug: it is
    never written)."""
    columns = verify.columns(prep.plan, result_model)
    chosen = list(dict.fromkeys(r for _, r, _ in columns))
    probes = prep.probes.verification
    try:
        outputs = _run_all(verify.session(result_model, chosen, arrays=arrays, optimize=optimize), probes,
                           known=prep.batch_axes)
    except Exception as err:
        report.notes.append(f"onnxruntime could not run the result ({str(err).splitlines()[0][:200]})")
        first = prep.plan[0].output
        return verify.Verification(np.full((len(probes), 1), np.inf), [first], [first])
    index = [prep.ref_names.index(t) for t, _, _ in columns]
    at = [chosen.index(r) for _, r, _ in columns]
    reference = [[sample[i] for i in index] for sample in prep.reference]
    d = verify.sample_deviations(reference, [[sample[i] for i in at] for sample in outputs])
    norms = np.array([[np.linalg.norm(np.asarray(y, np.float64)) for y in sample] for sample in reference])
    return verify.Verification(d, [t for t, _, _ in columns], [o for _, _, o in columns], norms.reshape(d.shape))


def _report_verification(report: Report, checked: verify.Verification, plan: list[verify.Measured],
                         allowed: float) -> None:
    """The deviation, per output and per measured tensor, and what the probes support."""
    report.output_deviation = checked.max
    report.deviation_per_output = checked.per_output()
    per_tensor = checked.per_tensor()
    report.measured = {m.output: {"label": m.label, "tensors": {
        t: {"what": w, "deviation": per_tensor.get(t)} for t, w in zip(m.tensors, m.what)}} for m in plan}
    for m in plan:
        if any(t not in per_tensor for t in m.tensors):  # lost by the rewrite: the output itself stood in
            report.measured[m.output]["label"] += " (the output itself where the rewrite lost a tensor)"
    exact = report.tolerance == 0
    report.verification = {"probes": checked.n, "max": checked.max, "p95": checked.percentile(95),
                           "promise": verify.promise(checked.n, allowed if exact else max(allowed, checked.max), exact)}


def _own_rounding(prep: Prepared, report: Report) -> float:
    """The float rounding this model amplifies by itself, measured on the verification probes as a
    result is: the larger of its plain onnxruntime session's deviation from the reference (the
    optimized one: BatchNorm folded into convs, fused ops) and the deviation of the input with
    its linear layers' weights and biases moved by one unit in the last place (random signs), as
    exact rewrites move them."""
    plain = _verify(prep.canonical, prep, None, report, optimize=False).rounding_max()
    nudged = onnx.ModelProto()
    nudged.CopyFrom(prep.canonical)
    linear = {name for n in nudged.graph.node if n.op_type in LINEAR_OPS for name in n.input[1:3]}
    rng = np.random.default_rng(0)
    for init in nudged.graph.initializer:
        if init.name in linear and init.data_type in ROUNDING:
            a = onnx.numpy_helper.to_array(init)
            a = (a * (1 + np.finfo(a.dtype).eps * rng.choice([-1.0, 1.0], a.shape))).astype(a.dtype)
            init.CopyFrom(onnx.numpy_helper.from_array(a, init.name))
    moved = _verify(nudged, prep, None, report).rounding_max()
    return max(d for d in (plain, moved, 0.0) if np.isfinite(d))


def _rounding(model: onnx.ModelProto) -> float:
    types = [o.type.tensor_type.elem_type for o in model.graph.output]
    return max((ROUNDING.get(t, 1e-5) for t in types), default=1e-5)


def _check_weights(model: onnx.ModelProto) -> None:
    """A NaN or infinite value in any constant a pass reads (a linear layer's operands and bias, a
    BatchNormalization's statistics) is bad input; infinite constants elsewhere (masks) are legal."""
    read = {}
    for n in model.graph.node:
        if n.op_type in LINEAR_OPS:
            read.update({name: f"{n.op_type} '{n.name}'" for name in n.input[:3] if name})
        elif n.op_type == "BatchNormalization":
            read.update({name: f"BatchNormalization '{n.name}'" for name in n.input[1:5] if name})
    constants = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in read]
    for init in list(model.graph.initializer) + [fold.constant_value(n, n.output[0]) for n in constants]:
        if init is not None and init.name in read and init.data_type in ROUNDING:
            values = onnx.numpy_helper.to_array(init)
            if not np.isfinite(values).all():
                kind = "NaN" if np.isnan(values).any() else "an infinite value"
                raise InputError(f"'{init.name}' (read by {read[init.name]}) contains {kind}")


def _layer_rows(ctx: Context, macs_before: dict[str, int], after, results: list[PassResult]) -> list[dict]:
    """One row per linear node: shapes, params and MACs before/after, and why it was left alone."""
    layers, skipped = find_layers(ctx.graph, ctx.exclude)
    rows = {}
    for layer in layers:
        w = layer.weight.values
        params = w.size + (layer.bias.values.size if layer.bias is not None else 0)
        rows[layer.name] = {"name": layer.name, "op": layer.op, "weight_shape": list(layer.get_weight().shape),
                            "params_after": int(params), "macs_before": macs_before.get(layer.name),
                            "macs_after": after.macs_per_node.get(layer.name)}
    for s in skipped:
        rows[s.name] = {"name": s.name, "op": s.op, "macs_before": macs_before.get(s.name),
                        "macs_after": after.macs_per_node.get(s.name), "left_alone": s.reason}
    for result in results:
        for row in result.layers:
            rows.setdefault(row["name"], {"name": row["name"]}).setdefault(result.name, {}).update(
                {k: v for k, v in row.items() if k != "name"})
        for record in result.left_alone:
            rows.setdefault(record.name, {"name": record.name}).setdefault(result.name, {})["left_alone"] = record.reason
    return list(rows.values())
