"""Hostile inputs, second round: each class of what an adversarial afternoon broke gets exit 2 with
one clear line (never exit 3, a hang, or a written model onnxruntime cannot load), and nothing on
disk that was not asked for. Runs in-process (``test_cli.cli``) but where a hang is the failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import red_onnx
from conftest import DIGITS_CNN, REPO, Builder, folder_entries
from test_cli import _restore_sigterm, assert_usage_error, cli  # noqa: F401 (the fixture is autouse)


def conv_model(seed: int = 1, bn: bool = False) -> onnx.ModelProto:
    b = Builder(seed=seed)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.conv(x, 3, 8, name="conv1")
    h = b.relu(b.bn(h, 8, name="bn1") if bn else h)
    b.output(b.conv(h, 8, 4, name="conv2"), ["N", 4, 6, 6])
    return b.model()


def with_value(model: onnx.ModelProto, name: str, index, value) -> onnx.ModelProto:
    """A copy with ``value`` at ``index`` of initializer ``name``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name == name:
            array = numpy_helper.to_array(t).copy()
            array[index] = value
            t.CopyFrom(numpy_helper.from_array(array, name))
    return copy


def weight_of(model: onnx.ModelProto, node: str, k: int = 1) -> str:
    return next(n.input[k] for n in model.graph.node if n.name == node)


@pytest.fixture
def io(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


def run_on(model, io, *args):
    src, out = io
    path = src / "m.onnx"
    onnx.save(model, str(path))
    return cli(path, out / "o.onnx", *args), out


# --------------------------------------------------------------------------------------------- #
# 1. non-finite weights, also after folding


def test_an_infinite_conv_weight_is_refused_quickly(io):
    """It used to hang in numpy's SVD (the separation pass), SIGINT or not; --no-verify too."""
    model = conv_model()
    src, out = io
    path = src / "m.onnx"
    onnx.save(with_value(model, weight_of(model, "conv1"), (0, 0, 1, 1), np.inf), str(path))
    proc = subprocess.run([sys.executable, "-m", "red_onnx", str(path), str(out / "o.onnx"), "--no-verify"],
                          capture_output=True, text=True, timeout=60)
    assert_usage_error(proc, weight_of(model, "conv1"), "infinite")
    assert_usage_error(cli(path, out / "o.onnx"), weight_of(model, "conv1"), "infinite")
    assert folder_entries(out) == []


NON_FINITE = {
    "minus_inf_in_a_resnet_weight": lambda m: with_value(
        m, next(n.input[1] for n in m.graph.node if n.op_type == "Conv"), (0, 0, 0, 0), -np.inf),
    "nan_in_a_bias": lambda m: with_value(m, weight_of(m, "conv2", 2), (1,), np.nan),
    "inf_in_a_batchnorm_variance": lambda m: with_value(m, weight_of(m, "bn1", 4), (2,), np.inf),
    "nan_in_a_batchnorm_mean": lambda m: with_value(m, weight_of(m, "bn1", 3), (0,), np.nan),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_constants_a_pass_reads_are_refused(io, case):
    model = onnx.load(str(REPO / "models" / "digits_resnet.onnx")) if "resnet" in case else conv_model(bn=True)
    proc, out = run_on(NON_FINITE[case](model), io, "--tolerance", "0.01")
    line = assert_usage_error(proc)
    assert "NaN" in line or "infinite" in line
    assert folder_entries(out) == []


def test_nan_in_a_constant_left_hand_matmul_operand_is_refused(io):
    b = Builder(seed=2)
    x = b.input("x", [4, 6])
    left = b.init(b.weight((3, 4)), name="left")
    b.output(b.gemm(b.node("MatMul", [left, x], name="mm"), 6, 5), [3, 5])
    proc, out = run_on(with_value(b.model(), "left", (1, 2), np.nan), io)
    assert_usage_error(proc, "'left'", "NaN")


def test_a_weight_that_overflows_when_a_batchnorm_is_folded_is_refused(io):
    model = conv_model(bn=True)
    model = with_value(model, weight_of(model, "conv1"), (0, 0, 0, 0), 3e38)
    model = with_value(model, weight_of(model, "bn1", 1), (0,), 50.0)  # gamma: the folded weight is 1.5e40
    model = with_value(model, weight_of(model, "bn1", 4), (0,), 1.0)
    proc, out = run_on(model, io, "--probe-range", "x:-0.001,0.001")  # the input model itself stays finite
    assert_usage_error(proc, "overflows", weight_of(model, "conv1"))
    assert folder_entries(out) == []


def test_infinite_constants_outside_layers_stay_legal(io):
    """A mask added to a layer's output (-inf where masked) is not a weight."""
    b = Builder(seed=4)
    x = b.input("x", ["N", 6])
    mask = b.init(np.array([0.0, -np.inf, 0.0, 0.0, -np.inf]), name="mask")
    b.output(b.node("Softmax", [b.node("Add", [b.gemm(x, 6, 5), mask])], axis=1), ["N", 5])
    proc, out = run_on(b.model(), io)
    assert proc.returncode == 0, proc.stderr
    assert folder_entries(out) == ["o.onnx"]


# --------------------------------------------------------------------------------------------- #
# 2. valid models that ended in exit 3


@pytest.mark.parametrize("ir, opset", [(3, 7), (8, 17)])
def test_initializers_listed_as_graph_inputs(io, ir, opset):
    model = conv_model()
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    model.ir_version = ir
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    proc, out = run_on(model, io, "--tolerance", "0.05")
    assert proc.returncode == 0, proc.stderr
    written = onnx.load(str(out / "o.onnx"))
    assert [i.name for i in written.graph.input] == [i.name for i in model.graph.input]


def test_a_float16_conversion_with_its_casts_written_last(io):
    """onnxruntime's float16 converter (keep_io_types) appends the input and output Casts after the
    nodes that read them: onnxruntime runs that, onnx.checker refuses it. The nodes are sorted, the
    report says so, and the result is checked and verified like any other."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(conv_model(bn=True), keep_io_types=True)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    proc, out = run_on(model, io, "--tolerance", "0.05", "--report", str(io[1] / "r.json"))
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(str(out / "o.onnx")), full_check=True)
    report = json.loads((out / "r.json").read_text())
    assert any("topological order" in n for n in report["notes"]) and report["output_deviation"] <= 0.05


@pytest.mark.parametrize("level", ["extended", "all"])
def test_onnxruntime_s_saved_optimized_model_keeps_its_custom_ops(tmp_path, level):
    """A model as onnxruntime saves it optimized: its Conv + Relu pairs become com.microsoft
    FusedConv nodes, and at the highest level com.microsoft.nchwc Convs, whose weights are blocked
    by 8 channels, named Conv (before, the passes took them for standard Convs: hashing rounded
    their weights, which the note said were left alone). Nodes of another domain are never
    layers: they and their weights come back as they were; the standard Gemm is still hashed."""
    import onnxruntime as ort

    b = Builder(seed=5)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.relu(b.conv(b.relu(b.conv(x, 3, 16, name="conv1")), 16, 16, name="conv2"))
    features = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    b.output(b.gemm(features, 16, 128, name="fc"), ["N", 128])
    onnx.save(b.model(), str(tmp_path / "m.onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.optimized_model_filepath = str(tmp_path / "saved.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    saved = onnx.load(str(tmp_path / "saved.onnx"))
    custom = [n for n in saved.graph.node if n.domain not in ("", "ai.onnx")]
    if level == "all" and not any(n.domain == "com.microsoft.nchwc" for n in custom):
        pytest.skip("onnxruntime has no NCHWc kernels on this CPU")
    assert [n.op_type for n in custom if n.op_type != "ReorderInput" and n.op_type != "ReorderOutput"][:2] == \
        (["FusedConv", "FusedConv"] if level == "extended" else ["Conv", "Conv"])
    result, report = red_onnx.compress(saved, tolerance=0.3)
    assert report.verified and any("ops of domains other than ai.onnx" in n for n in report.notes)
    kept = [n for n in result.graph.node if n.domain not in ("", "ai.onnx")]
    assert [n.SerializeToString() for n in kept] == [n.SerializeToString() for n in custom]
    weights = {t.name: t.SerializeToString() for t in result.graph.initializer}
    assert all(weights.get(t.name) == t.SerializeToString() for t in saved.graph.initializer
               if any(t.name in n.input for n in custom))
    assert any(p["modified"] for p in report.passes if p["name"] == "hash")  # the Gemm


@pytest.mark.parametrize("coordinates", [False, True])
def test_a_sparse_initializer_is_read_as_its_dense_values(io, coordinates):
    """It used to reach the passes as float64 and fail verification as 'a bug' (exit 1)."""
    b = Builder(seed=6)
    x = b.input("x", ["N", 6])
    b.output(b.gemm(b.relu(b.gemm(x, 6, 8, name="fc1")), 8, 5, name="fc2"), ["N", 5])
    model = b.model()
    w = next(t for t in model.graph.initializer if t.name == weight_of(model, "fc1"))
    dense = numpy_helper.to_array(w).copy()
    dense[np.abs(dense) < 0.3] = 0
    nz = np.flatnonzero(dense)
    index = np.stack(np.unravel_index(nz, dense.shape), axis=1) if coordinates else nz
    model.graph.initializer.remove(w)
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[nz], w.name), numpy_helper.from_array(index.astype(np.int64), "i"),
        list(dense.shape)))
    proc, out = run_on(model, io, "--tolerance", "0.01")
    assert proc.returncode == 0, proc.stderr
    written = onnx.load(str(out / "o.onnx"))
    onnx.checker.check_model(written, full_check=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)}
    import onnxruntime as ort

    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    res = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(res - ref) <= 0.01 * np.linalg.norm(ref) * 3


@pytest.mark.parametrize("kind", ["optional", "sequence"])
def test_non_tensor_graph_inputs_are_refused(io, kind):
    model = conv_model()
    tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, [1])
    make = helper.make_optional_type_proto if kind == "optional" else helper.make_sequence_type_proto
    model.graph.input.append(helper.make_value_info("extra", make(tensor)))
    proc, _ = run_on(model, io)
    assert_usage_error(proc, "'extra'", kind)


@pytest.mark.parametrize("dims", [["N", 3, 2**40, 6], [2**20, 3, 2**20, 6]])
def test_inputs_too_large_to_probe_are_refused(io, dims):
    b = Builder(seed=5)
    x = b.input("x", dims)
    b.output(b.relu(x), dims)
    proc, _ = run_on(b.model(), io)
    assert_usage_error(proc, "probes", "GiB")


# --------------------------------------------------------------------------------------------- #
# 3. user and environment errors


@pytest.mark.parametrize("args, fragment", [
    (["--seed", "-1"], "--seed"),
    (["--probe-range", "input:0,inf"], "finite"),
    (["--probe-range", "inptu:0,1"], "no input named 'inptu'"),
    (["--check", "100000000000"], "--check"),
])
def test_bad_options_are_refused_before_any_work(io, args, fragment):
    _, out = io
    proc = cli(DIGITS_CNN, out / "o.onnx", *args)
    assert_usage_error(proc, fragment)
    assert folder_entries(out) == []


@pytest.mark.parametrize("name", ["x" * 250 + ".onnx", ""])
def test_output_names_that_cannot_be_written(io, name):
    _, out = io
    proc = cli(DIGITS_CNN, str(out / name) if name else "")
    assert_usage_error(proc)
    assert folder_entries(out) == []


def test_a_folder_where_the_external_data_goes(io):
    _, out = io
    (out / "o.onnx.data").mkdir()
    assert_usage_error(cli(DIGITS_CNN, out / "o.onnx", "--external-data"), "o.onnx.data", "directory")
    assert folder_entries(out) == ["o.onnx.data"]


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes read-only files")
def test_a_read_only_report_is_refused_before_the_output_is_written(io):
    _, out = io
    report = out / "r.json"
    report.write_text("{}")
    report.chmod(0o444)
    assert_usage_error(cli(DIGITS_CNN, out / "o.onnx", "--report", report), "not writable")
    assert folder_entries(out) == ["r.json"]


@pytest.mark.parametrize("fails", ["model", "report"])
def test_disk_full_is_a_clear_error_that_says_what_is_on_disk(io, monkeypatch, fails):
    from red_onnx import model_io

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "save" if fails == "model" else "write_text", full)
    _, out = io
    proc = cli(DIGITS_CNN, out / "o.onnx", "--report", out / "r.json")
    line = assert_usage_error(proc, "No space left on device")
    assert line.endswith("nothing written") if fails == "model" else line.endswith(f"{out / 'o.onnx'} written")


# --------------------------------------------------------------------------------------------- #
# 4. outputs that are not what they claim


def test_a_report_over_the_external_data_is_refused(io):
    _, out = io
    proc = cli(DIGITS_CNN, out / "o.onnx", "--external-data", "--report", out / "o.onnx.data")
    assert_usage_error(proc, "o.onnx.data")
    assert folder_entries(out) == []


def test_an_output_path_ending_in_a_slash_is_refused(io):
    _, out = io
    assert_usage_error(cli(DIGITS_CNN, str(out / "missing") + "/"), "names no file")
    assert folder_entries(out) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_output_is_not_replaced(io):
    _, out = io
    os.mkfifo(out / "o.onnx")
    assert_usage_error(cli(DIGITS_CNN, out / "o.onnx"), "not a regular file")
    assert (out / "o.onnx").is_fifo()


# --------------------------------------------------------------------------------------------- #
# 7. checks that check nothing


def test_probes_the_model_overflows_on_are_refused(io):
    """Probes in [0, 1e38] make the digits CNN's logits infinite: no deviation could be measured."""
    _, out = io
    proc = cli(DIGITS_CNN, out / "o.onnx", "--probe-range", "input:0,1e38", "--tolerance", "0.01")
    assert_usage_error(proc, "no finite value", "--probe-range")
    assert folder_entries(out) == []


def test_nan_samples_in_probe_inputs_are_refused(io):
    src, out = io
    x = np.random.default_rng(0).uniform(0, 1, (6, 1, 1, 8, 8)).astype(np.float32)
    x[3, 0, 0, 2, 2] = np.nan
    np.savez(src / "p.npz", input=x)
    assert_usage_error(cli(DIGITS_CNN, out / "o.onnx", "--probe-inputs", src / "p.npz"), "sample 3", "NaN")
    assert folder_entries(out) == []


def test_a_written_report_is_complete_json(io):
    _, out = io
    proc = cli(DIGITS_CNN, out / "o.onnx", "--report", out / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "r.json").read_text())["verification"]["probes"] == 64
    assert folder_entries(out) == ["o.onnx", "r.json"]


# --------------------------------------------------------------------------------------------- #
# 5, 6. interrupts at start-up, inputs that would hang or fill the memory


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_device_as_the_input_is_refused(io):
    src, out = io
    os.mkfifo(src / "m.onnx")
    for path in (src / "m.onnx", "/dev/zero"):
        assert_usage_error(cli(path, out / "o.onnx"), "not a regular file")
    assert folder_entries(out) == []


def test_probe_inputs_decompress_only_the_model_inputs(io, monkeypatch):
    src, out = io
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 1, 8, 8)).astype(np.float32)
    np.savez_compressed(src / "p.npz", input=x, unused=np.zeros((16, 1024, 1024), np.float32))  # 64 MiB unpacked
    read = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: read.append(key) or real(self, key))
    proc = cli(DIGITS_CNN, out / "o.onnx", "--probe-inputs", src / "p.npz")
    assert proc.returncode == 0, proc.stderr
    assert read == ["input"]


def test_an_interrupt_while_the_libraries_load_prints_no_traceback(tmp_path):
    """SIGINT as soon as the process starts (numpy, onnx and onnxruntime take a second to import)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "red_onnx", str(DIGITS_CNN), str(tmp_path / "o.onnx")],
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                               signal.SIG_DFL))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode in (130, 0), err  # 0: it finished before the signal
    assert folder_entries(tmp_path) in ([], ["o.onnx"])


# --------------------------------------------------------------------------------------------- #
# 4. the model and its external data appear together or not at all


def _pair_loads_and_matches(folder, model) -> None:
    written = onnx.load(str(folder / "o.onnx"))
    onnx.checker.check_model(str(folder / "o.onnx"), full_check=True)
    from conftest import assert_same_outputs

    assert_same_outputs(model, written)


def test_a_failure_between_the_two_renames_leaves_the_earlier_pair_whole(io, monkeypatch):
    from red_onnx import model_io

    _, out = io
    model = onnx.load(str(REPO / "models" / "digits_resnet.onnx"))
    model_io.save(model, out / "o.onnx", external_data=True)
    assert folder_entries(out) == ["o.onnx", "o.onnx.data"]
    before = {name: (out / name).read_bytes() for name in folder_entries(out)}

    real, calls = os.replace, []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the data file is in place, the model is not
            raise OSError(28, "No space left on device")
        return real(src, dst)

    other = onnx.ModelProto()  # another result: different weights
    other.CopyFrom(model)
    big = max(other.graph.initializer, key=lambda t: len(t.raw_data))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * np.float32(2), big.name))
    monkeypatch.setattr(model_io.os, "replace", replace_then_fail)
    with pytest.raises(OSError):
        model_io.save(other, out / "o.onnx", external_data=True)
    monkeypatch.setattr(model_io.os, "replace", real)
    assert {name: (out / name).read_bytes() for name in folder_entries(out)} == before  # nothing else left
    _pair_loads_and_matches(out, model)

    model_io.save(model, out / "o.onnx", external_data=True)  # a later write replaces the pair whole
    entries = folder_entries(out)
    assert len(entries) == 2 and "o.onnx" in entries and "o.onnx.data" not in entries, entries
    _pair_loads_and_matches(out, model)
    model_io.save(model, out / "o.onnx", external_data=True)
    assert folder_entries(out) == ["o.onnx", "o.onnx.data"]
    _pair_loads_and_matches(out, model)


def test_two_writers_to_a_fresh_output_never_pair_one_model_with_the_others_data(io, monkeypatch):
    """Writer 1 starts on a fresh output; writer 2 saves the same path completely meanwhile. Each
    model on disk must always load with its own weights: where both took ``o.onnx.data``, writer
    1's data replaced writer 2's while writer 2's model was still the one on disk."""
    from red_onnx import model_io

    _, out = io
    first = onnx.load(str(REPO / "models" / "digits_resnet.onnx"))
    second = onnx.ModelProto()
    second.CopyFrom(first)
    big = max(second.graph.initializer, key=lambda t: len(t.raw_data))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * np.float32(2), big.name))

    real_save, real_replace, nested = model_io._save_external, os.replace, []

    def save_with_a_second_writer(*args, **kwargs):
        if not nested:
            nested.append(1)
            model_io.save(second, out / "o.onnx", external_data=True)  # the other writer, start to end
            _pair_loads_and_matches(out, second)
        return real_save(*args, **kwargs)

    def replace_checking(src, dst):
        if Path(dst).name == "o.onnx" and nested and (out / "o.onnx").exists():
            _pair_loads_and_matches(out, second)  # writer 2's model still loads with its own data
        return real_replace(src, dst)

    monkeypatch.setattr(model_io, "_save_external", save_with_a_second_writer)
    monkeypatch.setattr(model_io.os, "replace", replace_checking)
    model_io.save(first, out / "o.onnx", external_data=True)
    monkeypatch.setattr(model_io.os, "replace", real_replace)
    _pair_loads_and_matches(out, first)
    assert folder_entries(out) == ["o.onnx", "o.onnx.data"]  # writer 2's data went with its model


# --------------------------------------------------------------------------------------------- #
# 5. an interrupt during a save waits for it: nothing temporary stays, the message says what is on disk


def _interrupt_during(monkeypatch, module, name):
    """Send SIGINT to this process from inside ``module.name`` (a step of a save)."""
    import signal

    real = getattr(module, name)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.parametrize("external", [False, True])
def test_an_interrupt_during_a_save_takes_effect_after_it(tmp_path, monkeypatch, external):
    from red_onnx import model_io

    model = conv_model()
    _interrupt_during(monkeypatch, model_io, "_save_external" if external else "write_model")
    with pytest.raises(KeyboardInterrupt):
        model_io.save(model, tmp_path / "o.onnx", external_data=external)
    assert folder_entries(tmp_path) == (["o.onnx", "o.onnx.data"] if external else ["o.onnx"])
    loaded = onnx.load(str(tmp_path / "o.onnx"))
    assert [t.name for t in loaded.graph.initializer] == [t.name for t in model.graph.initializer]


def test_an_interrupt_while_writing_says_the_output_is_written(io, monkeypatch):
    from red_onnx import model_io

    src, out = io
    _interrupt_during(monkeypatch, model_io, "write_model")
    proc = cli(DIGITS_CNN, out / "o.onnx", "--report", out / "r.json")
    assert proc.returncode == 130
    assert "o.onnx written" in proc.stderr, proc.stderr
    assert folder_entries(out) == ["o.onnx"]  # the report was not started: no temporary file either
    onnx.checker.check_model(str(out / "o.onnx"))


def test_a_constant_of_shape_of_2_to_the_40_neither_hangs_nor_fills_the_memory(tmp_path):
    """Shape inference with data propagation must not materialize it (run under a 4 GiB address
    space limit): exit 0 with --no-verify, and with verification too (onnxruntime's optimizer
    folds Shape(ConstantOfShape) in the sessions that verify)."""
    import resource

    shape = numpy_helper.from_array(np.array([2**40], np.int64), "shp")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Shape", ["big"], ["s"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [1])], [shape, w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    for args in (["--no-verify"], []):
        out = tmp_path / f"o{len(args)}.onnx"
        proc = subprocess.run([sys.executable, "-m", "red_onnx", str(tmp_path / "m.onnx"), str(out), *args],
                              capture_output=True, text=True, timeout=60, preexec_fn=limited)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and out.exists()
    assert "deviation" in proc.stdout  # verified


# --------------------------------------------------------------------------------------------- #
# 8. scale: a session on large weights takes no copy of them


def test_a_session_on_large_weights_takes_no_copy_of_them(monkeypatch):
    """onnxruntime copied external initializers at session creation (1 GiB more on a 1 GiB MLP);
    weights fed as inputs it reads in place (models over IN_PLACE_BYTES: here all)."""
    from red_onnx import model_io, verify

    monkeypatch.setattr(verify, "IN_PLACE_BYTES", 0)
    def rss() -> int:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    b = Builder(seed=0)
    x = b.input("x", ["N", 4096])
    b.output(b.gemm(x, 4096, 2048, name="big"), ["N", 2048])  # 32 MiB of weights
    light, arrays = model_io.to_light_model(model_io.to_graph(b.model()), b.model())
    assert sum(a.nbytes for a in arrays.values()) >= 32 * 2**20
    before = rss()
    sess = verify.session(light, arrays=arrays)
    grown = rss() - before
    y = sess.run(None, {"x": np.ones((1, 4096), np.float32)})[0]
    assert y.shape == (1, 2048)
    assert grown < 16 * 2**20, f"the session took {grown / 2**20:.1f} MiB"
