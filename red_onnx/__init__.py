"""red_onnx: data-free structured compression of ONNX models (RED / RED++), verified with onnxruntime.

The public names load on first use (PEP 562), so that ``python -m red_onnx`` can catch a Ctrl-C
while numpy, onnx and onnxruntime load.
"""

import importlib

__version__ = "0.1.0"

from .errors import InputError, RedOnnxError, VerificationError  # noqa: E402

_LAZY = {"compress": "pipeline", "compress_each": "pipeline", "analyze": "layers", "Report": "report", "deviation": "verify"}

__all__ = ["compress", "compress_each", "analyze", "deviation", "Report", "PASSES", "InputError", "RedOnnxError",
           "VerificationError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name == "PASSES":  # names of the passes that exist, in pipeline order (canonicalization always runs)
        from .passes import AVAILABLE, PLANNED

        value = tuple(p for p in PLANNED if p in AVAILABLE)
    else:
        raise AttributeError(f"module 'red_onnx' has no attribute '{name}'")
    globals()[name] = value
    return value
