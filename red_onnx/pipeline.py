"""The pipeline: load → canonicalize → passes → verify against the input model → report.

The pipeline owns the model, the probes and the onnxruntime sessions; passes get a Context.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import model_io, verify
from .budget import DEFAULT_CHECK, DEFAULT_TOLERANCE, Budget, make_probes, probe_runner, random_probes
from .context import Context, PassResult
from .errors import InputError, VerificationError
from .layers import QUANTIZED_OPS, analyze, find_layers, input_specs, tensor_shapes, weightless
from .passes import AVAILABLE, PLANNED, fold
from .passes import hash as hash_pass
from .passes.hash import INDEX_TYPES
from .report import Report

#: Relative deviation allowed for exact rewrites, by the model's float type (float rounding).
ROUNDING = {onnx.TensorProto.FLOAT: 1e-5, onnx.TensorProto.DOUBLE: 1e-5,
            onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 1e-2}
STANDARD_DOMAINS = ("", "ai.onnx")
#: Fraction of the tolerance the lossy passes first allocate; after a build whose fresh
#: verification probes disagree, :func:`next_margin` shrinks it, at most LOSSY_BUILDS times in all,
#: then exact rewrites only (margin 0).
FIRST_MARGIN = 0.8
LOSSY_BUILDS = 4
#: After a failed build, at most this many of its worst fresh probes join the allocation probes.
TAIL_PROBES = 8
#: The latency guard undoes separations when the result is slower than the input by more than this
#: factor (onnxruntime's timing noise, one thread, median of interleaved pairs).
LATENCY_SLACK = 1.03


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


def compress(model: str | os.PathLike | onnx.ModelProto, tolerance: float = DEFAULT_TOLERANCE,
             passes: Iterable[str] | str | None = None, *, seed: int = 0, check: int = DEFAULT_CHECK,
             allocation: int = 16,
             input_shapes: dict[str, tuple[int, ...]] | None = None, probe_inputs: dict[str, np.ndarray] | None = None,
             probe_ranges: dict[str, tuple[float, float]] | None = None, exclude: str | None = None,
             verify_result: bool = True, latency_check: bool = True, codebook: str = "uint8",
             log: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, Report]:
    """Compress a model; returns the rewritten model and its report.

    ``tolerance`` is the one error budget of the lossy steps (the deviation defined in
    :mod:`red_onnx.verify`); 0 allows exact rewrites only. Raises InputError on bad input and
    VerificationError when the result does not match the input model. ``latency_check`` undoes
    the conv separations when onnxruntime runs the result slower than the input. ``codebook``
    ("uint8", "auto" = uint8 or uint16, "off") sets how few-valued weights are stored.
    """
    start = time.perf_counter()
    log = log or (lambda message: None)
    if tolerance < 0 or not np.isfinite(tolerance):
        raise InputError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if codebook not in INDEX_TYPES:
        raise InputError(f"--codebook must be one of {', '.join(INDEX_TYPES)}, got '{codebook}'")
    if check < 1:
        raise InputError(f"--check must be at least 1, got {check}")
    names = resolve_passes(passes)
    try:
        pattern = re.compile(exclude) if exclude else None
    except re.error as err:
        raise InputError(f"--exclude: invalid regular expression ({err})") from None
    log("loading")
    original = model_io.load(model)
    report = Report(tolerance=tolerance)
    specs = input_specs(original, input_shapes)
    custom = sorted({n.domain for n in original.graph.node if n.domain not in STANDARD_DOMAINS})
    if any(n.op_type in QUANTIZED_OPS for n in original.graph.node):
        report.notes.append("the model is already quantized: its quantized layers are left alone")
    if not verify_result and tolerance > 0:
        report.notes.append("--no-verify: lossy steps need verification, so only exact rewrites were made")
        tolerance = 0.0
    if custom:
        report.notes.append(f"custom-domain ops ({', '.join(custom)}) are left alone")

    before = analyze(original, specs)
    report.params_before, report.macs_before = before.params, before.macs
    report.bytes_before = model_io.model_bytes(original)
    report.op_counts_before = dict(before.op_counts)

    plan = verify.measure_plan(original)
    measured, owners = verify.measured_tensors(original)
    graph_outputs = [o.name for o in original.graph.output]
    ref_names = list(dict.fromkeys(measured + graph_outputs))
    probes = make_probes(specs, seed, allocation, check, probe_ranges, probe_inputs)
    reference, budget = None, None
    if verify_result:  # one session on the input model for both probe sets
        log(f"running the input model on {len(probes.allocation)} + {len(probes.verification)} probes")
        ref_session = verify.input_session(original, ref_names)
        reference = _run_all(ref_session, probes.verification, input_model=True)
        if tolerance > 0:
            budget = Budget(tolerance, probes.allocation, _run_all(ref_session, probes.allocation, input_model=True),
                            ref_names, measured, owners, log=log)
        del ref_session

    shapes = tensor_shapes(original, specs)
    # from here on the input's weights live in `canonical` only (same function): `original` keeps
    # what to_model restores (opset, inputs, metadata, initializer names), not a second copy of them
    template = weightless(original, keep=0)
    if isinstance(model, onnx.ModelProto):  # the caller's object is never modified
        canonical = onnx.ModelProto()
        canonical.CopyFrom(original)
    else:  # read from a file here: ours to canonicalize in place
        canonical = original
    original = template
    moved = fold.constants_to_initializers(canonical)
    _check_weights(canonical)

    def build(margin: float, keep_dense: frozenset[str] = frozenset()
              ) -> tuple[onnx.ModelProto, list[PassResult], Context]:
        """Canonicalize and run the passes, lossy ones spending ``margin × tolerance``."""
        if budget is not None:
            budget.target = margin * tolerance
        ctx = Context(graph=model_io.to_graph(canonical), template=original, shapes=shapes,
                      tolerance=tolerance if margin > 0 else 0.0, exclude=pattern, keep_dense=keep_dense,
                      latency_check=latency_check,
                      budget=budget if margin > 0 else None, log=log,
                      codebook=codebook)
        results: list[PassResult] = []
        for name, module in [(fold.NAME, fold)] + [(n, AVAILABLE[n]) for n in names]:
            log(f"pass {name}")
            try:
                result = module.run(ctx)
            except (InputError, VerificationError):
                raise
            except UnicodeDecodeError as err:  # a pass that exports the graph meets a broken name
                raise _not_utf8(err) from None
            except Exception as err:
                raise RuntimeError(f"pass '{name}' failed: {err}") from err
            if name == fold.NAME and moved:
                result.counts["constants_to_initializers"] = moved
                result.modified = True
            results.append(result)
        results += _finish(ctx, names)
        try:  # weights stay in the graph's arrays until the result is accepted: no second copy
            light, arrays = model_io.to_light_model(ctx.graph, original)
        except UnicodeDecodeError as err:
            raise _not_utf8(err) from None
        try:
            model_io.check_structure(light)
        except Exception as err:
            raise RuntimeError(f"the rewritten model fails onnx.checker: {err}") from err
        return light, arrays, results, ctx

    def build_verified(keep_dense: frozenset[str] = frozenset()):
        """Build at decreasing margins until the fresh probes agree."""
        nonlocal reference
        dev, checked, allowed, attempt = 0.0, None, 0.0, 0
        margin, lossy = (FIRST_MARGIN, LOSSY_BUILDS) if budget is not None else (0.0, 0)
        while True:
            attempt += 1
            log(f"build {attempt} of at most {attempt + lossy}: " + (
                f"lossy edits up to {margin:.2g}x the tolerance" if margin > 0 else "exact rewrites only"))
            light, arrays, results, ctx = build(margin, keep_dense)
            if not verify_result:
                return light, arrays, results, ctx, None, False
            log(f"verifying build {attempt} on {len(probes.verification)} fresh probes")
            checked = _verify(light, measured, owners, ref_names, reference, probes.verification, arrays, report)
            dev = checked.max
            allowed = tolerance if margin > 0 else max(tolerance, _rounding(original))
            if dev <= allowed:
                return light, arrays, results, ctx, checked, True
            if margin == 0:
                break
            lossy -= 1
            note = (f"build {attempt}: lossy edits chosen at {margin:.2g}x the tolerance deviated {dev:.3g} on "
                    f"{checked.n} fresh probes (tolerance {tolerance:g}); backed off")
            if probe_inputs is None and lossy > 0:  # random probes: learn the tail, verify on new ones
                learned = _learn_tail(checked, budget, probes, reference, margin * tolerance)
                reference = _fresh_verification(canonical, ref_names, probes, specs, probe_ranges, seed, attempt)
                note += f" with its {learned} worst probe(s) added to the allocation probes and new fresh probes"
                margin = margin * 0.9
            else:
                margin = next_margin(margin, dev, tolerance) if lossy > 0 else 0.0
            report.notes.append(note)
            log(note)
        raise VerificationError(f"the rewritten model deviates by {dev:.3g} from the input model on fresh "
                                f"probes (allowed {allowed:g}); nothing written. This is a bug: please report it")

    light, arrays, results, ctx, checked, report.verified = build_verified()
    keep_dense: frozenset[str] = frozenset()
    while latency_check and (separated := _separated(results)):
        log("timing the result against the input (latency guard)")
        t_in, t_out, ratio = verify.latency_ratio(canonical, light, probes.verification[0], arrays_b=arrays)
        undone = report.latency.get("separations_undone", 0)
        report.latency = {"input_ms": round(t_in * 1e3, 4), "result_ms": round(t_out * 1e3, 4),
                          "ratio": round(ratio, 4), "separations_undone": undone}
        if ratio <= LATENCY_SLACK:
            break
        keep_dense |= separated
        report.latency["separations_undone"] = undone + len(separated)
        report.notes.append(f"latency guard: with {len(separated)} conv(s) separated the result ran {ratio:.2f}x "
                            "the input's time in onnxruntime; those separations undone")
        light, arrays, results, ctx, checked, report.verified = build_verified(keep_dense)
    del light, arrays
    for tensor in ctx.graph.tensors().values():  # the graph takes its own copy of every weight ...
        if isinstance(tensor, gs.Constant):
            tensor.values  # noqa: B018 (loads a lazily imported weight)
    canonical = None  # ... so the input's copy can go before the result is exported
    try:
        result_model = model_io.to_full_model(ctx.graph, original)
    except UnicodeDecodeError as err:
        raise _not_utf8(err) from None
    if checked is not None:
        _report_verification(report, checked, plan, tolerance if tolerance > 0 else _rounding(original))

    after = analyze(result_model, specs)
    report.params_after, report.macs_after = after.params, after.macs
    report.bytes_after = model_io.model_bytes(result_model)
    report.op_counts_after = dict(after.op_counts)
    report.passes = [{"name": r.name, "seconds": round(r.seconds, 4), "modified": r.modified, **r.counts}
                     for r in results]
    report.layers = _layer_rows(ctx, before.macs_per_node, after, results)

    report.seconds = time.perf_counter() - start
    return result_model, report


def _finish(ctx: Context, names: list[str]) -> list[PassResult]:
    """After hashing, the exact merge and separation rules run again on the hashed weights; then
    few-valued weights are stored as codebooks (last: it turns weights into computed tensors)."""
    results = []
    if "hash" in names:
        ctx.budget = None
        ctx.tolerance = 0.0
        for name in ("merge", "separate"):
            if name in names:
                ctx.log(f"pass {name} (exact, after hashing)")
                result = AVAILABLE[name].run(ctx)
                result.name = f"{name}_after_hash"
                results.append(result)
    ctx.log("codebook storage")
    results.append(hash_pass.encode(ctx))
    return results


def _separated(results: list[PassResult]) -> frozenset[str]:
    return frozenset(r["name"] for res in results if res.name == "separate" for r in res.layers
                     if "depthwise_channels" in r)


def _learn_tail(checked: verify.Verification, budget: Budget, probes, reference, target: float) -> int:
    """Move the fresh probes that deviated over ``target`` (the worst ``TAIL_PROBES``) to the
    budget's allocation probes, with their reference outputs: the next build spends with them."""
    worst = checked.per_sample.max(axis=1)
    chosen = [int(k) for k in np.argsort(-worst)[:TAIL_PROBES] if worst[k] > target]
    budget.add_probes([probes.verification[k] for k in chosen], [reference[k] for k in chosen])
    return len(chosen)


def _fresh_verification(model: onnx.ModelProto, ref_names: list[str], probes, specs, ranges, seed: int,
                        attempt: int) -> list[list[np.ndarray]]:
    """Replace the verification probes by new draws (a probe that chose a build never verifies it);
    returns the input model's outputs on them."""
    rng = np.random.default_rng([seed, attempt])
    probes.verification = random_probes(specs, len(probes.verification), rng, ranges)
    return _run_all(verify.input_session(model, ref_names), probes.verification, input_model=True)


def _run_all(sess, probes: list[dict], input_model: bool = False) -> list[list[np.ndarray]]:
    """Every probe's outputs, in one batch where the model allows it (see :func:`probe_runner`)."""
    try:
        run = probe_runner(sess, probes, {})
        return run.unedited if hasattr(run, "unedited") else run({})
    except Exception as err:
        if not input_model:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"onnxruntime cannot run the input model on probes of its input shapes ({first})") from None


def _verify(result_model: onnx.ModelProto, measured: list[str], owners: list[str], ref_names: list[str],
            reference: list[list[np.ndarray]], probes: list[dict], arrays: dict[str, np.ndarray] | None,
            report: Report) -> verify.Verification:
    """Deviation of the result from the input model on the verification probes. A measured tensor
    the rewrite no longer has is replaced by its graph output; a result onnxruntime cannot run
    deviates infinitely (a bug: it is never written)."""
    produced = {o for n in result_model.graph.node for o in n.output} | {i.name for i in result_model.graph.input}
    columns = list(dict.fromkeys((m, o) if m in produced else (o, o) for m, o in zip(measured, owners)))
    chosen = list(dict.fromkeys(c for c, _ in columns))
    try:
        outputs = _run_all(verify.session(result_model, chosen, arrays=arrays), probes)
    except Exception as err:
        report.notes.append(f"onnxruntime could not run the result ({str(err).splitlines()[0][:200]})")
        return verify.Verification(np.full((len(probes), 1), np.inf), [owners[0]], [owners[0]])
    index = [ref_names.index(c) for c, _ in columns]
    at = [chosen.index(c) for c, _ in columns]
    d = verify.sample_deviations([[sample[i] for i in index] for sample in reference],
                                 [[sample[i] for i in at] for sample in outputs])
    return verify.Verification(d, [c for c, _ in columns], [o for _, o in columns])


def _report_verification(report: Report, checked: verify.Verification, plan: list[verify.Measured],
                         allowed: float) -> None:
    """The deviation, per output and per measured tensor, and what the probes support."""
    report.output_deviation = checked.max
    report.deviation_per_output = checked.per_output()
    per_tensor = checked.per_tensor()
    report.measured = {m.output: {"label": m.label, "tensors": {
        t: {"what": w, "deviation": per_tensor.get(t)} for t, w in zip(m.tensors, m.what)}} for m in plan}
    for m in plan:
        if any(t not in per_tensor for t in m.tensors):  # renamed by the rewrite: the output itself stood in
            report.measured[m.output]["label"] += " (the output itself where the rewrite renamed a tensor)"
    report.verification = {"probes": checked.n, "max": checked.max, "p95": checked.percentile(95),
                           "promise": verify.promise(checked.n, max(allowed, checked.max))}


def _rounding(model: onnx.ModelProto) -> float:
    types = [o.type.tensor_type.elem_type for o in model.graph.output]
    return max((ROUNDING.get(t, 1e-5) for t in types), default=1e-5)


def _check_weights(model: onnx.ModelProto) -> None:
    """NaN in a layer's weights is bad input (infinite constants used as masks are legal)."""
    linear = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
              and len(n.input) > 1}
    for init in model.graph.initializer:
        if init.name in linear and init.data_type in ROUNDING:
            values = onnx.numpy_helper.to_array(init)
            if np.isnan(values).any():
                raise InputError(f"weight '{init.name}' contains NaN")


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
    return list(rows.values())
