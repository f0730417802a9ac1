"""A worked example of adding a pass: remove pairs of Transposes that undo each other.

A real pass would live in ``red_onnx/passes/transpose_pairs.py`` with this module's ``NAME`` and
``run``, its test in ``tests/``, and one line in ``red_onnx.passes.SCHEDULE``::

    Step("transpose_pairs", transpose_pairs),          # always runs (exact), after "fold"

Here this file is both the pass (``NAME``, ``run``) and its test, and the test puts the step in
the schedule with monkeypatch. What a pass must do: rewrite ``ctx.graph`` in place, return a
PassResult with what it changed, and ``result.leave(name, reason)`` for what it did not touch.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

import red_onnx
from red_onnx import passes
from red_onnx.context import Context, PassResult

from conftest import Builder, assert_same_outputs, op_counts

NAME = "transpose_pairs"


def run(ctx: Context) -> PassResult:
    """Transpose(p) then Transpose(q) with q∘p the identity is the identity: both are bypassed."""
    start = time.perf_counter()
    result = PassResult(NAME)
    outputs = {t.name for t in ctx.graph.outputs}
    for first in ctx.graph.nodes:
        if first.op != "Transpose" or not first.outputs:
            continue
        y = first.outputs[0]
        consumers = list(y.outputs)
        if len(consumers) != 1 or consumers[0].op != "Transpose" or y.name in outputs:
            result.leave(first.name, "its output is not read by one Transpose alone")
            continue
        second = consumers[0]
        p, q = first.attrs.get("perm"), second.attrs.get("perm")
        if p is None or q is None or [p[i] for i in q] != list(range(len(p))):
            result.leave(first.name, f"'{second.name}' does not undo it")
            continue
        if second.outputs[0].name in outputs:
            result.leave(first.name, "the pair ends in a graph output")
            continue
        x, z = first.inputs[0], second.outputs[0]
        for user in list(z.outputs):
            user.inputs = [x if t is z else t for t in user.inputs]
        first.outputs, second.outputs = [], []
        result.rewritten.append(first.name)
    ctx.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result.modified = bool(result.rewritten)
    result.counts = {"pairs_removed": len(result.rewritten)}
    result.seconds = time.perf_counter() - start
    return result


@pytest.fixture
def scheduled(monkeypatch):
    """The schedule with this pass right after canonicalization."""
    step = passes.Step(NAME, sys.modules[__name__])
    monkeypatch.setattr("red_onnx.pipeline.SCHEDULE", (passes.SCHEDULE[0], step, *passes.SCHEDULE[1:]))


def transposed(undo: bool):
    b = Builder(seed=3)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.node("Transpose", [b.conv(x, 3, 4)], perm=[0, 2, 3, 1], name="to_nhwc")
    h = b.node("Transpose", [h], perm=[0, 3, 1, 2] if undo else [0, 3, 2, 1], name="back")
    b.output(b.relu(b.conv(h, 4, 2, k=1)), ["N", 2, 5, 5])
    return b.model()


def test_a_transpose_pair_is_removed(scheduled):
    model = transposed(undo=True)
    result, report = red_onnx.compress(model, tolerance=0, passes=[])
    assert "Transpose" not in op_counts(result)
    assert next(p for p in report.passes if p["name"] == NAME)["pairs_removed"] == 1
    assert_same_outputs(model, result)


def test_a_pair_that_does_not_undo_is_left_alone_with_the_reason(scheduled):
    model = transposed(undo=False)
    result, report = red_onnx.compress(model, tolerance=0, passes=[])
    assert op_counts(result)["Transpose"] == 2
    assert {"name": "to_nhwc", "pass": NAME, "reason": "'back' does not undo it"} in report.left_alone
    rows = {r["name"]: r for r in report.layers}
    assert rows["to_nhwc"][NAME]["left_alone"] == "'back' does not undo it"
    assert np.isfinite(report.output_deviation)
