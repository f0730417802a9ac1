import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while numpy, onnx and onnxruntime load: no traceback
    print("red-onnx: interrupted; nothing written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
