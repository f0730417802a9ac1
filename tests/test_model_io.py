"""Loading, exporting and saving models (red_onnx.model_io)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from red_onnx import model_io
from red_onnx.errors import InputError

from conftest import DIGITS_CNN, Builder, assert_identical_outputs, assert_preserved, folder_entries


def small_model(seed: int = 0, big: bool = False) -> onnx.ModelProto:
    """A Conv model; ``big``: a weight of 64 KiB, well over onnx's 1 KiB external-data threshold."""
    b = Builder(seed=seed)
    x = b.input("x", ["N", 16 if big else 3, 8, 8])
    c_in = 16 if big else 3
    c_out = 64 if big else 4
    y = b.relu(b.conv(x, c_in, c_out, k=4 if big else 3, pad=0))
    b.output(y, ["N", c_out, 5 if big else 6, 5 if big else 6])
    return b.model()


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --------------------------------------------------------------------------------------------- #
# load


def test_load_path_and_model_proto(tmp_path):
    model = small_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    loaded = model_io.load(path)
    assert loaded.SerializeToString() == model.SerializeToString()
    assert model_io.load(str(path)).SerializeToString() == model.SerializeToString()
    assert model_io.load(model) is model


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        model_io.load(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="directory"):
        model_io.load(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="garbage.onnx"):
        model_io.load(garbage)
    truncated = tmp_path / "truncated.onnx"
    data = DIGITS_CNN.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.onnx"):
        model_io.load(truncated)
    with pytest.raises(InputError, match="empty graph"):
        model_io.load(onnx.ModelProto())


def test_load_runs_the_checker():
    model = small_model()
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(InputError, match="invalid ONNX model"):
        model_io.load(model)


def unsorted_model() -> onnx.ModelProto:
    """A Conv → Relu model written with its Relu first, as a converter that appends nodes does."""
    model = small_model()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_load_sorts_nodes_out_of_order(tmp_path):
    """onnxruntime runs a graph whose nodes are out of order, onnx.checker refuses it: load sorts
    it (a copy of a given model) and says so; a cycle is still refused."""
    model = unsorted_model()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    given = model.SerializeToString()
    notes: list[str] = []
    loaded = model_io.load(model, notes)
    assert model.SerializeToString() == given  # the caller's model is left as it was
    assert [n.op_type for n in loaded.graph.node] == ["Conv", "Relu"] and "topological order" in notes[0]
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, str(path))
    assert [n.op_type for n in model_io.load(path).graph.node] == ["Conv", "Relu"]
    assert_identical_outputs(small_model(), loaded)
    cycle = unsorted_model()
    cycle.graph.node[1].input[0] = cycle.graph.node[0].output[0]  # the Conv reads the Relu
    with pytest.raises(InputError, match="invalid ONNX model"):
        model_io.load(cycle)


# --------------------------------------------------------------------------------------------- #
# graph round trip


def test_to_graph_to_model_round_trip_preserves_everything():
    model = small_model()
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(model.graph.node[0].output[0],
                                                                     onnx.TensorProto.FLOAT, ["N", 4, 6, 6]))
    model.graph.node[0].doc_string = "the stem"  # onnx-graphsurgeon drops it; to_model restores it
    result = model_io.to_model(model_io.to_graph(model), model)
    assert_preserved(model, result)
    assert result.graph.node[0].doc_string == "the stem"
    assert len(result.graph.value_info) == 0
    assert result.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert result.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert_identical_outputs(model, result)


def test_a_custom_domain_op_is_not_the_standard_op_of_its_name():
    """In the graph the passes see, a node of another domain has the op ``domain::op`` (a
    com.microsoft.nchwc Conv is no Conv); the export writes its op type and domain back."""
    model = small_model()
    model.graph.node.append(onnx.helper.make_node("Relu", [model.graph.output[0].name], ["z"],
                                                  domain="org.custom", name="custom"))
    model.graph.output[0].name = "z"
    model.opset_import.append(onnx.helper.make_opsetid("org.custom", 1))
    graph = model_io.to_graph(model)
    assert [n.op for n in graph.nodes][-2:] == ["Relu", "org.custom::Relu"]
    result = model_io.to_model(graph, model)
    assert [(n.op_type, n.domain) for n in result.graph.node] == [(n.op_type, n.domain) for n in model.graph.node]


@pytest.mark.parametrize("case", ["tidy", "dangling node", "unsorted"])
def test_snapshot_leaves_the_graph_as_it_is_and_exports_its_function(case):
    """A snapshot of a tidy graph is exported as it is (node order kept); of a graph with a node
    feeding no output, or out of order, from a cleaned and sorted copy. The graph never changes."""
    import onnx_graphsurgeon as gs

    model = small_model(big=True)
    graph = model_io.to_graph(model)
    if case == "dangling node":
        graph.nodes.append(gs.Node("Relu", inputs=[graph.nodes[0].outputs[0]], outputs=[gs.Variable("unused")]))
    elif case == "unsorted":
        graph.nodes.reverse()
    before = [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]
    assert model_io._tidy(graph) == (case == "tidy")
    light, weights = model_io.snapshot(graph, model)
    assert [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes] == before
    assert [n.op_type for n in light.graph.node] == ["Conv", "Relu"]
    assert weights and all((a is graph.tensors()[name].values) == (case == "tidy") for name, a in weights.items())
    full = onnx.ModelProto()
    full.CopyFrom(light)
    for init in full.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    assert_identical_outputs(model, full)


def test_model_bytes_counts_external_data(tmp_path):
    model = small_model(big=True)
    assert model_io.model_bytes(model) == model.ByteSize()
    model_io.save(model, tmp_path / "m.onnx", external_data=True)
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    weight_bytes = 64 * 16 * 4 * 4 * 4
    assert model_io.model_bytes(lazy) >= lazy.ByteSize() + weight_bytes
    assert abs(model_io.model_bytes(lazy) - model.ByteSize()) < 1024


# --------------------------------------------------------------------------------------------- #
# save: atomic, external data


def test_save_writes_only_the_output(tmp_path):
    model = small_model()
    out = tmp_path / "out.onnx"
    model_io.save(model, out)
    assert folder_entries(tmp_path) == ["out.onnx"]
    assert onnx.load(str(out)).SerializeToString() == model.SerializeToString()
    model_io.save(small_model(seed=1), out)  # overwriting
    assert folder_entries(tmp_path) == ["out.onnx"]
    assert onnx.load(str(out)).SerializeToString() == small_model(seed=1).SerializeToString()


@pytest.mark.parametrize("external", [False, True])
def test_save_failing_midway_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch, external):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous contents")
    real_save = onnx.save_model

    def failing_save(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)  # something was written ...
        with open(path, "ab") as f:
            f.write(b"partial")
        raise OSError("disk full")  # ... then it fails

    monkeypatch.setattr(onnx, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model_io.save(small_model(big=True), out, external_data=external)
    assert folder_entries(tmp_path) == ["out.onnx"]
    assert out.read_bytes() == b"previous contents"


def test_save_failing_before_writing_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(onnx, "save_model", failing_save)
    with pytest.raises(RuntimeError):
        model_io.save(small_model(), tmp_path / "out.onnx")
    assert folder_entries(tmp_path) == []


def test_external_data_round_trip(tmp_path):
    model = small_model(big=True)
    out = tmp_path / "big.onnx"
    model_io.save(model, out, external_data=True)
    assert folder_entries(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < 4096  # the weights are in the data file
    assert (tmp_path / "big.onnx.data").stat().st_size >= 64 * 16 * 4 * 4 * 4
    lazy = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in lazy.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}  # relative to the model: the folder can move
    loaded = model_io.load(out)
    assert loaded.graph.node == model.graph.node
    before, after = arrays(model), arrays(loaded)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert_identical_outputs(model, loaded)
    # the in-memory model is not changed by saving it with external data
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)


def test_external_data_chosen_automatically_over_the_threshold(tmp_path, monkeypatch):
    model = small_model(big=True)
    out = tmp_path / "auto.onnx"
    model_io.save(model, out)  # default threshold: a small model stays in one file
    assert folder_entries(tmp_path) == ["auto.onnx"]
    os.remove(out)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model_io.save(model, out)
    assert folder_entries(tmp_path) == ["auto.onnx", "auto.onnx.data"]
    loaded = model_io.load(out)
    for name, value in arrays(model).items():
        np.testing.assert_array_equal(arrays(loaded)[name], value)


def test_save_relative_path_in_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_io.save(small_model(), "here.onnx")
    assert folder_entries(tmp_path) == ["here.onnx"]


# --------------------------------------------------------------------------------------------- #
# output path checks


def test_check_output_path(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(small_model(), str(src))
    assert model_io.check_output_path(tmp_path / "out.onnx", [src]) == tmp_path / "out.onnx"
    with pytest.raises(InputError, match="overwrite the input"):
        model_io.check_output_path(src, [src])
    with pytest.raises(InputError, match="overwrite the input"):
        model_io.check_output_path(tmp_path / "." / "in.onnx", [src])
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    with pytest.raises(InputError, match="overwrite the input"):
        model_io.check_output_path(link, [src])
    with pytest.raises(InputError, match="does not exist"):
        model_io.check_output_path(tmp_path / "missing" / "out.onnx", [src])
    with pytest.raises(InputError):
        model_io.check_output_path(src / "out.onnx", [src])  # a path under a regular file
    (tmp_path / "adir").mkdir()
    with pytest.raises(InputError, match="directory"):
        model_io.check_output_path(tmp_path / "adir", [src])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_check_output_path_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            model_io.check_output_path(locked / "out.onnx", [tmp_path / "in.onnx"])
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("name", ["digits_resnet", "digits_cnn", "built"])
def test_write_model_tensor_by_tensor_is_byte_for_byte_onnx_save(tmp_path, name):
    """The streamed writer (for models over 256 MiB) writes the bytes onnx.save_model writes."""
    from conftest import REPO, Builder

    if name == "built":  # metadata, doc strings, several opsets: fields on both sides of the graph
        b = Builder(seed=3)
        x = b.input("x", ["N", 3, 6, 6])
        b.output(b.relu(b.conv(x, 3, 4)), ["N", 4, 6, 6])
        model = b.model(extra_opsets=[("com.example", 1)])
    else:
        model = onnx.load(str(REPO / "models" / f"{name}.onnx"))
    model_io.write_model(model, tmp_path / "streamed.onnx", stream_bytes=0)
    onnx.save_model(model, str(tmp_path / "saved.onnx"))
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "saved.onnx").read_bytes()
