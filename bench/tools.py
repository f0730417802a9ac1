"""The compression tools under comparison, as functions run in a child process (see measure.ToolRunner):
each reads a model file, writes the compressed model to `out_path` and returns a small JSON-able dict."""

from __future__ import annotations

import inspect

import onnx


def red_onnx_info() -> dict:
    """Whether red_onnx.compress exists, its version and its pass names (red_onnx.PASSES)."""
    try:
        import red_onnx
    except Exception as exc:  # the package is developed in parallel: the bench must run without it
        return {"available": False, "why": f"import failed: {type(exc).__name__}: {exc}", "passes": ()}
    if not callable(getattr(red_onnx, "compress", None)):
        return {"available": False, "why": "red_onnx.compress does not exist yet", "passes": ()}
    return {"available": True, "version": getattr(red_onnx, "__version__", "?"),
            "passes": tuple(getattr(red_onnx, "PASSES", ()))}


def red_onnx_compress(src: str, out_path: str, tolerance: float, passes, probe_range: dict,
                      input_shapes: dict, codebook: str | None = None) -> dict:
    """The one call into red_onnx (a stub that copies the model while red_onnx.compress does not exist).

    `passes` None means all passes; `codebook` None keeps red_onnx's default. Keyword names follow the installed signature (the API is young):
    the probe ranges and the concrete input shapes are passed when compress() accepts them; no data is."""
    if not red_onnx_info()["available"]:
        onnx.save(onnx.load(src), out_path)
        return {"stub": True}
    import red_onnx

    accepted = inspect.signature(red_onnx.compress).parameters
    kwargs = {"tolerance": tolerance, "passes": passes, "seed": 0}
    for key in ("probe_ranges", "probe_range"):
        if key in accepted:
            kwargs[key] = probe_range
            break
    if "input_shapes" in accepted:
        kwargs["input_shapes"] = input_shapes
    if codebook is not None:
        kwargs["codebook"] = codebook
    for key in ("verify_result", "verify"):
        if key in accepted:
            kwargs[key] = True
            break
    try:
        model, report = red_onnx.compress(src, **kwargs)
    except red_onnx.VerificationError as exc:
        return {"verification_failed": str(exc)}
    onnx.save(model, out_path)
    return {"report": report.to_dict()}


def onnxsim_prune(src: str, out_path: str, sparsity: float, simplified_path: str) -> dict:
    """onnxsim 0.8.1: `simplify` (its exact graph cleanup: folds BatchNormalization and per-channel Mul/Add
    into the convs, without which most chains are not matched), then its data-free structured pruning: per
    matched producer -> consumer chain, drop the `sparsity` fraction of the producer's output channels with
    the smallest L2 weight norm. The simplified model is saved too, as the base of the zeroed-channel check."""
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise RuntimeError("onnxsim.simplify could not validate its result")
    onnx.save(simplified, simplified_path)
    model = onnxsim.apply_structured_pruning(simplified, sparsity=sparsity, importance_norm="l2")
    onnx.save(model, out_path)
    return {"onnxsim_version": getattr(onnxsim, "__version__", "?")}
