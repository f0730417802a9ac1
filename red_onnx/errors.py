"""The errors red_onnx raises on purpose; anything else is an internal error."""


class RedOnnxError(Exception):
    """Base class of the errors red_onnx reports to the user in one line."""


class InputError(RedOnnxError):
    """Bad input or usage: unreadable or invalid model, bad option, unwritable output (exit 2)."""


class VerificationError(RedOnnxError):
    """The result does not match the input model within the allowed deviation (exit 1)."""
