"""red_onnx: data-free structured compression of ONNX models (RED / RED++), verified with onnxruntime."""

__version__ = "0.1.0"

from .errors import InputError, RedOnnxError, VerificationError  # noqa: E402
from .layers import analyze  # noqa: E402
from .passes import AVAILABLE as _AVAILABLE, PLANNED as _PLANNED  # noqa: E402
from .pipeline import compress  # noqa: E402
from .report import Report  # noqa: E402
from .verify import deviation  # noqa: E402

#: Names of the passes that exist, in pipeline order (canonicalization always runs besides them).
PASSES = tuple(p for p in _PLANNED if p in _AVAILABLE)

__all__ = ["compress", "analyze", "deviation", "Report", "PASSES", "InputError", "RedOnnxError",
           "VerificationError", "__version__"]
