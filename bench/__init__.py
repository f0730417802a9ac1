"""Benchmark of red_onnx on real trained models (see bench/README.md). Not part of the installed package."""
