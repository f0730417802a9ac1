"""What the CLI and the library share and ``red-onnx --help`` shows: no heavy imports here, so
that ``--help`` and ``--version`` work at once (and before numpy, onnx or onnxruntime load)."""

#: The error budget when none is given: the largest of the benchmark grid at which every benchmark
#: model kept its task metric within 1 point (README: "The default tolerance").
DEFAULT_TOLERANCE = 0.003
#: Fresh verification probes, run as one batch where the model allows: with none of N above the
#: tolerance, the share of inputs above it is below 3/N at 95 % confidence (the rule of three).
DEFAULT_CHECK = 64
#: The metric mode (``--metric``): the metric may fall this much below the input's (absolute), in at
#: most this many scored candidates.
DEFAULT_MAX_DROP = 0.01
DEFAULT_MAX_EVALS = 8
#: The passes ``--passes`` selects, in schedule order (``red_onnx.passes.PLANNED``, derived from the
#: schedule, equals it: tests/test_pipeline.py checks).
PASS_NAMES = ("merge", "prune", "separate", "hash")
