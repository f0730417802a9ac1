"""Reference digits models for red_onnx (see README.md). Not part of the installed package."""
