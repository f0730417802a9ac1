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


def ort_int8(src: str, out_path: str, per_channel: bool, op_types: list[str] | None = None) -> dict:
    """onnxruntime's data-free int8 quantization, `quantize_dynamic`: int8 weights (one scale per tensor
    or per output channel), activations quantized at run time (DynamicQuantizeLinear → ConvInteger /
    MatMulInteger); ``op_types`` limits it to those ops (None: its default set). After onnxruntime's
    `quant_pre_process` where it succeeds, as its warning asks."""
    import contextlib
    import os
    import tempfile

    import onnxruntime
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        try:  # the pre-processing onnxruntime asks for (shape inference, graph optimization)
            with contextlib.chdir(tmp):  # it writes temporary files into the working directory
                quant_pre_process(os.path.abspath(src), f"{tmp}/pre.onnx")
            src, preprocessed = f"{tmp}/pre.onnx", True
        except Exception:
            preprocessed = False
        quantize_dynamic(src, out_path, weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=op_types)
    return {"onnxruntime_version": onnxruntime.__version__, "preprocessed": preprocessed}


def ort_fp16(src: str, out_path: str) -> dict:
    """float16 weights and compute, float32 inputs and outputs (onnxruntime's own converter,
    `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`)."""
    import onnxruntime
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(src), keep_io_types=True), out_path)
    return {"onnxruntime_version": onnxruntime.__version__}
