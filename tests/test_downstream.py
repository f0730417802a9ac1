"""Downstream evaluation: a sub-model fed with cached activations gives what the whole model gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import red_onnx
from red_onnx import budget as budget_module
from red_onnx import downstream
from red_onnx.downstream import Downstream

from conftest import Builder, session

WIDTH = 8


def chain(layers: int = 6, seed: int = 0, branch: bool = False) -> onnx.ModelProto:
    """x → (Gemm → Relu) × layers → y; with ``branch``, the input also feeds a second output
    through its own Gemm (a measured tensor that no late edit changes)."""
    b = Builder(seed=seed)
    x = b.input("x", ["N", WIDTH])
    h = x
    for k in range(layers):
        h = b.relu(b.gemm(h, WIDTH, WIDTH, name=f"fc{k}"))
    b.output(h, ["N", WIDTH])
    if branch:
        b.output(b.gemm(x, WIDTH, 3, name="side"), ["N", 3])
    return b.model()


def as_inputs(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with the initializers ``names`` as graph inputs (as the budget's session has them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    values = {}
    for init in list(copy.graph.initializer):
        if init.name in names:
            values[init.name] = onnx.numpy_helper.to_array(init)
            copy.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            copy.graph.initializer.remove(init)
    return copy, values


def weight_of(model: onnx.ModelProto, node: str) -> str:
    return next(n.input[1] for n in model.graph.node if n.name == node)


def probes(count: int = 3, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, WIDTH)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("edited_layer", [4, 5])
def test_sub_model_equals_the_whole_model(edited_layer):
    model = chain(branch=True)
    names = [weight_of(model, f"fc{k}") for k in range(6)]
    light, weights = as_inputs(model, names)
    outputs = [o.name for o in model.graph.output]
    feeds = probes()
    down = Downstream(light, {}, weights, outputs, feeds)
    edited = frozenset([names[edited_layer]])
    down.prepare([edited])
    run = down.runner(edited)
    assert run is not None
    changed = {**weights, names[edited_layer]: weights[names[edited_layer]] * 1.5}
    full = session(light)
    expected = [full.run(None, {**p, **changed}) for p in feeds]
    got = run(changed)
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the sub-model holds only the layers after the edit
    assert down.plan(edited)[0] and len(down.plan(edited)[0]) < len(light.graph.node) / 2


def test_edit_near_the_input_runs_the_whole_model():
    model = chain()
    names = [weight_of(model, "fc0")]
    light, weights = as_inputs(model, names)
    down = Downstream(light, {}, weights, [model.graph.output[0].name], probes())
    down.prepare([frozenset(names)])
    assert down.plan(frozenset(names)) is None and down.runner(frozenset(names)) is None


def test_subgraph_ops_downstream_run_the_whole_model():
    """A node with a subgraph (If) after the edit: its body may read outer tensors the cut
    does not see, so the whole model runs."""
    b = Builder(seed=2)
    x = b.input("x", ["N", WIDTH])
    h = x
    for k in range(5):
        h = b.relu(b.gemm(h, WIDTH, WIDTH, name=f"fc{k}"))
    cond = b.init(np.array(True), dtype=np.bool_)
    then = onnx.helper.make_graph([onnx.helper.make_node("Identity", [h], ["t"])], "then", [],
                                  [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    other = onnx.helper.make_graph([onnx.helper.make_node("Neg", [h], ["e"])], "else", [],
                                   [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    y = b.node("If", [cond], name="branch", then_branch=then, else_branch=other)
    b.output(y, ["N", WIDTH])
    model = b.model()
    name = weight_of(model, "fc4")
    light, weights = as_inputs(model, [name])
    down = Downstream(light, {}, weights, [y], probes())
    down.prepare([frozenset([name])])
    assert down.runner(frozenset([name])) is None


def test_cut_over_the_cache_limit_runs_the_whole_model(monkeypatch):
    monkeypatch.setattr(downstream, "CACHE_BYTES", 16)
    model = chain()
    name = weight_of(model, "fc5")
    light, weights = as_inputs(model, [name])
    down = Downstream(light, {}, weights, [model.graph.output[0].name], probes())
    down.prepare([frozenset([name])])
    assert down.runner(frozenset([name])) is None


def test_budget_measures_the_same_through_sub_models(monkeypatch):
    """The profile measured on sub-models equals the one measured on the whole model, and so
    does the result."""
    model = chain(layers=8, seed=4)
    _, whole = red_onnx.compress(model, 0.05, passes=["hash", "merge"])
    monkeypatch.setattr(budget_module, "DOWNSTREAM_SECONDS", 0.0)
    used = []
    real = Downstream.runner

    def spy(self, edited):
        run = real(self, edited)
        used.append(run is not None)
        return run

    monkeypatch.setattr(Downstream, "runner", spy)
    _, sub = red_onnx.compress(model, 0.05, passes=["hash", "merge"])
    assert any(used) and not all(used)  # late layers on sub-models, early ones whole
    assert sub.profile["entries"] == whole.profile["entries"]
    assert sub.params_after == whole.params_after and sub.bytes_after == whole.bytes_after
    assert sub.output_deviation == pytest.approx(whole.output_deviation, rel=1e-4)
