"""The command line as a user runs it. Most runs call ``red_onnx.cli.main`` in this process (the
same arguments, exit codes and output); a few run ``python -m red_onnx`` or the ``red-onnx``
console script in a subprocess, where the process is the point (exit status, the installed script)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import red_onnx
from red_onnx.cli import main
from red_onnx.passes import AVAILABLE, PLANNED

from conftest import DIGITS_CNN, Builder, assert_preserved, assert_same_outputs, folder_entries, op_counts

LOG_LINE = re.compile(r"^\[\s*\d+(\.\d+)?s\] ")  # progress lines on stderr (not with -q)
REPORT_KEYS = {"params_before", "params_after", "macs_before", "macs_after", "bytes_before", "bytes_after",
               "output_deviation", "deviation_per_output", "seconds", "passes", "layers"}


@pytest.fixture(autouse=True)
def _restore_sigterm():
    """cli.main installs a SIGTERM handler; give pytest its own back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def cli(*args, cwd=None, lossless: bool = True, process: bool = False):
    """``red-onnx ARGS``: (returncode, stdout, stderr), in this process unless ``process``;
    ``--tolerance 0`` unless the test gives one or ``lossless=False`` (the default tolerance is
    lossy: test_default_tolerance covers it)."""
    args = list(map(str, args))
    if lossless and "--tolerance" not in args:
        args += ["--tolerance", "0"]
    if process:
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        return subprocess.run([sys.executable, "-m", "red_onnx", *args], capture_output=True, text=True,
                              timeout=120, cwd=cwd, env=env)
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            os.chdir(cwd or here)
            code = main(args)
        except SystemExit as exit_:  # argparse: usage errors, --version
            code = exit_.code
        finally:
            os.chdir(here)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_default_tolerance(dirs):
    """Without --tolerance the CLI spends the benchmark-chosen budget, and stays within it."""
    from red_onnx.cli import DEFAULT_TOLERANCE

    src, out = dirs
    proc = cli(DIGITS_CNN, out / "o.onnx", "--probe-range", "input:0,1", "--report", out / "r.json", lossless=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "r.json").read_text())
    assert report["tolerance"] == DEFAULT_TOLERANCE > 0
    assert report["verified"] is True and report["output_deviation"] <= DEFAULT_TOLERANCE


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not LOG_LINE.match(line)]


def assert_usage_error(proc, *fragments: str) -> str:
    """Exit 2, one error line on stderr (besides progress lines), no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("red-onnx: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tiny_model() -> onnx.ModelProto:
    b = Builder(seed=1)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.relu(b.bn(b.conv(x, 3, 8), 8))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    y = b.gemm(h, 8, 5)
    b.output(y, ["N", 5])
    return b.model()


def symbolic_model() -> onnx.ModelProto:
    b = Builder(seed=2)
    x = b.input("x", ["N", 3, "H", 8])
    b.output(b.bn(b.conv(x, 3, 4), 4), ["N", 4, "H", 8])
    return b.model()


def nan_model() -> onnx.ModelProto:
    b = Builder(seed=3)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.conv(x, 3, 4)
    b.output(y, ["N", 4, 6, 6])
    model = b.model()
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 1, 1] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    return model


def invalid_model() -> onnx.ModelProto:
    model = tiny_model()
    model.graph.node[1].input[0] = "no_such_tensor"
    with pytest.raises(Exception):
        onnx.checker.check_model(model)
    return model


def custom_op_model() -> onnx.ModelProto:
    b = Builder(seed=4)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.bn(b.conv(x, 3, 4), 4)
    b.output(b.node("MyOp", [h], domain="com.example"), ["N", 4, 6, 6])
    return b.model(extra_opsets=[("com.example", 1)])


def quantized_model() -> onnx.ModelProto:
    b = Builder(seed=5)
    x = b.input("x", ["N", 3, 6, 6])
    scale, zero = b.init(np.float32(0.05)), b.init(np.uint8(128), dtype=np.uint8)
    xq = b.node("QuantizeLinear", [x, scale, zero])
    xd = b.node("DequantizeLinear", [xq, scale, zero])
    wq = b.init(b.rng.integers(-100, 100, (4, 3, 3, 3)), dtype=np.int8)
    wd = b.node("DequantizeLinear", [wq, b.init(np.float32(0.01)), b.init(np.int8(0), dtype=np.int8)])
    y = b.node("Conv", [xd, wd, b.init(b.rng.standard_normal(4))], pads=[1, 1, 1, 1])
    b.output(b.relu(y), ["N", 4, 6, 6])
    return b.model()


@pytest.fixture
def dirs(tmp_path):
    """in/ with the model(s), out/ empty."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------------- #
# successful runs


def test_digits_cnn_with_report(dirs):
    src, out = dirs
    before = DIGITS_CNN.read_bytes()
    proc = cli(DIGITS_CNN, out / "small.onnx", "--report", out / "r.json", process=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in ("parameters", "MACs", "deviation"):
        assert word in proc.stdout
    assert DIGITS_CNN.read_bytes() == before
    assert folder_entries(out) == ["r.json", "small.onnx"]

    report = json.loads((out / "r.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["params_before"] == 24386 and report["params_after"] < report["params_before"]
    assert report["macs_before"] == report["macs_after"] > 0
    assert report["bytes_before"] == len(before)
    assert report["bytes_after"] == pytest.approx((out / "small.onnx").stat().st_size, abs=64)
    assert 0 <= report["output_deviation"] <= 1e-5
    assert set(report["deviation_per_output"]) == {"logits"}
    assert report["seconds"] > 0
    assert report["passes"] and report["passes"][0]["name"] == "fold"
    for p in report["passes"]:
        assert {"name", "seconds", "modified"} <= set(p)
    assert report["passes"][0]["modified"] is True and report["passes"][0]["affine_folded"] == 3
    assert {row["name"] for row in report["layers"]} >= {"/0/Conv", "/3/Conv", "/7/Conv"}

    original, result = onnx.load(str(DIGITS_CNN)), onnx.load(str(out / "small.onnx"))
    assert_preserved(original, result)
    assert "BatchNormalization" not in op_counts(result)
    assert_same_outputs(original, result)


def test_tiny_model(dirs):
    src, out = dirs
    model = tiny_model()
    path = save(model, src / "tiny.onnx")
    proc = cli(path, out / "tiny_small.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stdout and "MACs" in proc.stdout and "deviation" in proc.stdout
    assert folder_entries(out) == ["tiny_small.onnx"]
    result = onnx.load(str(out / "tiny_small.onnx"))
    assert_preserved(model, result)
    assert "BatchNormalization" not in op_counts(result)
    assert_same_outputs(model, result)


def test_dry_run_writes_nothing(dirs):
    src, out = dirs
    path = save(tiny_model(), src / "tiny.onnx")
    before = path.read_bytes()
    proc = cli(path, out / "o.onnx", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stdout and "dry run" in proc.stdout
    assert folder_entries(out) == []
    assert folder_entries(src) == ["tiny.onnx"] and path.read_bytes() == before


def test_quiet_prints_nothing(dirs):
    _, out = dirs
    proc = cli("-q", DIGITS_CNN, out / "o.onnx")
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""
    assert folder_entries(out) == ["o.onnx"]


def test_quiet_error_is_one_line(dirs):
    src, out = dirs
    proc = cli("-q", src / "missing.onnx", out / "o.onnx", process=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("red-onnx: error:")


def test_version():
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"red_onnx {red_onnx.__version__}"


SCRIPT = shutil.which("red-onnx", path=str(Path(sys.executable).parent)) or shutil.which("red-onnx")


@pytest.mark.skipif(SCRIPT is None, reason="the console script is not installed")
def test_console_script(dirs):
    _, out = dirs
    proc = subprocess.run([SCRIPT, "-q", str(DIGITS_CNN), str(out / "o.onnx"), "--tolerance", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == proc.stderr == "", proc.stderr
    assert folder_entries(out) == ["o.onnx"]


def test_input_shape_option(dirs):
    src, out = dirs
    model = symbolic_model()
    path = save(model, src / "sym.onnx")
    proc = cli(path, out / "o.onnx", "--input-shape", "x:1,3,10,8", "--report", out / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "r.json").read_text())
    assert report["macs_before"] == 4 * 10 * 8 * 3 * 9
    result = onnx.load(str(out / "o.onnx"))
    assert_preserved(model, result)
    assert result.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "H"
    assert_same_outputs(model, result, shapes={"x": (2, 3, 7, 8)})


def test_probe_range(dirs):
    src, out = dirs
    proc = cli(DIGITS_CNN, out / "o.onnx", "--probe-range", "input:0,1", "--report", out / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "r.json").read_text())
    assert report["verified"] is True and report["output_deviation"] <= 1e-5


def test_probe_inputs(dirs):
    src, out = dirs
    rng = np.random.default_rng(0)
    np.savez(src / "probes.npz", input=rng.uniform(0, 1, (6, 1, 8, 8)).astype(np.float32))
    proc = cli(DIGITS_CNN, out / "o.onnx", "--probe-inputs", src / "probes.npz", "--report", out / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "r.json").read_text())
    assert report["verified"] is True and report["output_deviation"] <= 1e-5
    assert folder_entries(out) == ["o.onnx", "r.json"]


def test_custom_domain_op_with_no_verify(dirs):
    src, out = dirs
    model = custom_op_model()
    path = save(model, src / "custom.onnx")
    proc = cli(path, out / "o.onnx", "--no-verify", "--report", out / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "com.example" in proc.stdout
    result = onnx.load(str(out / "o.onnx"))
    assert_preserved(model, result)
    assert op_counts(result) == {"Conv": 1, "MyOp": 1}
    report = json.loads((out / "r.json").read_text())
    assert report["output_deviation"] is None and report["verified"] is False


def test_quantized_model_passes_with_a_note(dirs):
    src, out = dirs
    model = quantized_model()
    path = save(model, src / "q.onnx")
    proc = cli(path, out / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "quantized" in proc.stdout
    result = onnx.load(str(out / "o.onnx"))
    assert_preserved(model, result)
    assert op_counts(result) == op_counts(model)
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# usage errors: exit 2, one line, nothing written


def test_pass_not_implemented_yet(dirs, monkeypatch):
    """A planned pass that does not exist yet is refused by name (here 'merge', made pending)."""
    from red_onnx import pipeline

    _, out = dirs
    monkeypatch.setattr(pipeline, "AVAILABLE", {k: v for k, v in AVAILABLE.items() if k != "merge"})
    proc = cli(DIGITS_CNN, out / "o.onnx", "--passes", "merge")
    line = assert_usage_error(proc, "merge")
    assert "not implemented" in line
    assert folder_entries(out) == []


def test_resolve_passes_in_process():
    from red_onnx.errors import InputError
    from red_onnx.pipeline import resolve_passes
    assert resolve_passes([]) == []
    assert resolve_passes("fold") == []
    assert resolve_passes(None) == [p for p in PLANNED if p in AVAILABLE]
    assert resolve_passes(list(reversed(list(AVAILABLE)))) == [p for p in PLANNED if p in AVAILABLE]
    with pytest.raises(InputError, match="unknown pass 'nope'"):
        resolve_passes("fold,nope")


def test_unknown_pass(dirs):
    _, out = dirs
    proc = cli(DIGITS_CNN, out / "o.onnx", "--passes", "fold,frobnicate")
    assert_usage_error(proc, "unknown pass", "frobnicate")
    assert folder_entries(out) == []


def _write_text(src: Path) -> Path:
    path = src / "notes.onnx"
    path.write_text("this is not a model\nat all\n")
    return path


def _write_random(src: Path) -> Path:
    path = src / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return path


def _write_truncated(src: Path) -> Path:
    path = src / "truncated.onnx"
    data = DIGITS_CNN.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_INPUTS = {
    # id: (make input in src, output path relative to (src, out), extra args, fragments of the message)
    "missing_file": (lambda s: s / "missing.onnx", None, [], ["missing.onnx"]),
    "directory": (lambda s: s, None, [], ["directory"]),
    "text_file": (_write_text, None, [], ["notes.onnx"]),
    "random_bytes": (_write_random, None, [], ["random.onnx"]),
    "truncated": (_write_truncated, None, [], ["truncated.onnx"]),
    "fails_checker": (lambda s: save(invalid_model(), s / "invalid.onnx"), None, [], ["invalid"]),
    "nan_weight": (lambda s: save(nan_model(), s / "nan.onnx"), None, [], ["NaN"]),
    "output_is_input": (lambda s: save(tiny_model(), s / "m.onnx"), lambda s, o: s / "m.onnx", [], ["input"]),
    "output_is_input_spelled_differently": (lambda s: save(tiny_model(), s / "m.onnx"),
                                            lambda s, o: s / ".." / "in" / "m.onnx", [], ["input"]),
    "output_folder_missing": (lambda s: save(tiny_model(), s / "m.onnx"), lambda s, o: o / "nope" / "o.onnx", [],
                              ["nope"]),
    "output_under_a_file": (lambda s: save(tiny_model(), s / "m.onnx"), lambda s, o: s / "m.onnx" / "o.onnx", [],
                            ["m.onnx"]),
    "unknown_option": (lambda s: save(tiny_model(), s / "m.onnx"), None, ["--frobnicate"], ["--frobnicate"]),
    "symbolic_dim": (lambda s: save(symbolic_model(), s / "sym.onnx"), None, [],
                     ["'x'", "dimension 2", "--input-shape x:1,3,N,8"]),
    "bad_input_shape": (lambda s: save(symbolic_model(), s / "sym.onnx"), None, ["--input-shape", "x:1,3,a,8"],
                        ["--input-shape"]),
    "input_shape_wrong_name": (lambda s: save(symbolic_model(), s / "sym.onnx"), None,
                               ["--input-shape", "x:1,3,8,8", "--input-shape", "y:1,3,8,8"], ["'y'"]),
    "negative_tolerance": (lambda s: save(tiny_model(), s / "m.onnx"), None, ["--tolerance", "-0.1"],
                           ["tolerance"]),
    "bad_probe_range": (lambda s: save(tiny_model(), s / "m.onnx"), None, ["--probe-range", "x:1,0"],
                        ["--probe-range"]),
    "missing_probe_file": (lambda s: save(tiny_model(), s / "m.onnx"), None, ["--probe-inputs", "nope.npz"],
                           ["--probe-inputs"]),
    "custom_domain_op": (lambda s: save(custom_op_model(), s / "custom.onnx"), None, [], ["onnxruntime"]),
    "report_folder_missing": (lambda s: save(tiny_model(), s / "m.onnx"), None, ["--report", "/nonexistent/r.json"],
                              ["r.json"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(dirs, case):
    src, out = dirs
    make_input, make_output, extra, fragments = BAD_INPUTS[case]
    path = make_input(src)
    output = make_output(src, out) if make_output else out / "o.onnx"
    snapshot = {p: p.read_bytes() for p in src.iterdir() if p.is_file()}
    src_entries = folder_entries(src)

    proc = cli(path, output, *extra)

    assert_usage_error(proc, *fragments)
    assert folder_entries(out) == []
    assert folder_entries(src) == src_entries
    for p, data in snapshot.items():
        assert p.read_bytes() == data, f"{p} changed"


def test_probe_inputs_missing_an_input(dirs):
    src, out = dirs
    np.savez(src / "probes.npz", wrong_name=np.zeros((4, 1, 8, 8), np.float32))
    proc = cli(DIGITS_CNN, out / "o.onnx", "--probe-inputs", src / "probes.npz")
    assert_usage_error(proc, "input")
    assert folder_entries(out) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions (see output_under_a_file)")
def test_output_folder_not_writable(dirs):
    src, out = dirs
    path = save(tiny_model(), src / "m.onnx")
    out.chmod(0o500)
    try:
        proc = cli(path, out / "o.onnx")
        assert_usage_error(proc, "writable")
    finally:
        out.chmod(0o700)
    assert folder_entries(out) == []


def test_help_and_version_need_no_heavy_imports():
    """--help and --version answer before numpy, onnx and onnxruntime load (and work without them)."""
    script = ("import sys\nfrom red_onnx.cli import main\nfor args in (['--help'], ['--version']):\n"
              "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0\n"
              "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'numba') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: red-onnx" in proc.stdout and proc.stdout.strip().endswith("[]")


def test_a_malformed_shape_or_range_is_told_before_the_libraries_load():
    """A typo in --input-shape or --probe-range is exit 2 at once (it waited 1.1-1.5 s for numpy,
    onnx and onnxruntime to load)."""
    script = ("import sys\nfrom red_onnx.cli import main\n"
              "codes = [main(['in.onnx', 'out.onnx', option, value]) for option, value in "
              "(('--probe-range', 'x=1'), ('--probe-range', 'x:2,1'), ('--input-shape', 'x:1,0'))]\n"
              "print(codes, sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'numba') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[2, 2, 2] []"
    assert proc.stderr.count("red-onnx: error: --") == 3


def test_the_command_loads_numba_without_its_blas_check_and_scipy_still_imports():
    """numba's first jitted call imports scipy.linalg to look for a BLAS (0.2 s; red_onnx's kernels
    use none): the command loads numba with it hidden (no BLAS), and scipy.linalg imports after."""
    code = ("import sys; from red_onnx import cli; cli._numba_without_blas(); import numba.np.arraymath as a; "
            "import scipy.linalg; print(a._HAVE_BLAS, scipy.linalg.det([[1.0, 2.0], [3.0, 4.0]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and float(out[1]) == pytest.approx(-2.0)


def test_a_ctrl_c_that_a_library_wrapped_is_an_interrupt(dirs, monkeypatch):
    """A KeyboardInterrupt that a library re-raised as another error (Python wraps one raised in a
    ``__set_name__`` during numba's import as a RuntimeError) exits 130 as an interrupt, not as an
    internal error."""
    from red_onnx import pipeline

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("Error calling __set_name__") from err

    monkeypatch.setattr(pipeline, "compress_each", interrupted)
    src, out = dirs
    proc = cli(DIGITS_CNN, out / "o.onnx")
    assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr
