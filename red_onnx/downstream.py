"""Downstream evaluation: run only the part of a model that an edit can change.

An edit of initializers E changes only the nodes that read E and the nodes they feed, D. With the
tensors D reads from outside it (the cut) cached from one run of the unedited model, D alone
computes every measured tensor the edit can change; the others keep their cached values. The
profile measures candidates alone this way where D is a small part of the model. Where D is most
of it (an edit near the inputs), the graph has nodes with subgraphs (whose bodies read outer
tensors without naming them as inputs), or the cut would not fit
:data:`CACHE_BYTES`, the whole model runs instead (:meth:`Downstream.runner` returns None).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

#: D may hold at most this share of the model's nodes (else the whole model runs: little saved,
#: and a second session costs its creation).
MAX_SHARE = 0.6
#: The cached cut tensors, over all probes, may take at most this many bytes.
CACHE_BYTES = 2**28

Runner = Callable[[dict[str, np.ndarray]], list[list[np.ndarray]]]


class Downstream:
    """Sub-models of ``model`` (the budget's session model: editable weights are graph inputs) fed
    with cached tensors, one per set of edited tensors; ``outputs`` are the measured tensors in
    the order the budget compares them, ``probes`` the probes they run on."""

    def __init__(self, model: onnx.ModelProto, arrays: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                 outputs: list[str], probes: list[dict[str, np.ndarray]]):
        """``arrays``: the light model's initializers (:func:`red_onnx.verify.session`);
        ``weights``: the unedited values of the weights that are graph inputs."""
        self.model, self.arrays, self.weights, self.outputs, self.probes = model, arrays, weights, outputs, probes
        self.nodes = list(model.graph.node)
        self.readers: dict[str, list[int]] = {}
        for k, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(k)
        self.initializers = {t.name for t in model.graph.initializer}
        # a subgraph (If, Loop, Scan) may read any outer tensor without naming it as an input:
        # then what an edit reaches is not read off the node inputs, and the whole model runs
        self.nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                          for node in self.nodes for a in node.attribute)
        self.inputs = {i.name: i for i in model.graph.input}
        self.weight_inputs = [n for n in self.inputs if n in weights]
        self.plans: dict[frozenset[str], tuple[list[int], list[str]] | None] = {}
        self.cache: list[dict[str, np.ndarray]] | None = None
        self.pending: list[frozenset[str]] | None = None  # the edited sets whose cut the cache will hold
        self.runners: dict[frozenset[str], Runner | None] = {}
        self.used = self.fallbacks = 0

    def plan(self, edited: frozenset[str]) -> tuple[list[int], list[str]] | None:
        """(D's node indices in graph order, its cut), or None where the whole model must run."""
        if edited in self.plans:
            return self.plans[edited]
        down, stack = set(), [k for name in edited for k in self.readers.get(name, [])]
        while stack:
            k = stack.pop()
            if k not in down:
                down.add(k)
                stack += [j for out in self.nodes[k].output for j in self.readers.get(out, [])]
        result = None
        if down and not self.nested and len(down) <= MAX_SHARE * len(self.nodes):
            produced = {o for k in down for o in self.nodes[k].output}
            cut = list(dict.fromkeys(name for k in sorted(down) for name in self.nodes[k].input
                                     if name and name not in produced and name not in self.initializers
                                     and name not in self.weights))
            result = (sorted(down), cut)
        self.plans[edited] = result
        return result

    def prepare(self, edited_sets: list[frozenset[str]]) -> None:
        """Plan the sub-models of ``edited_sets``; the cache of their cut tensors is filled when
        the first one is built (:meth:`_fill`)."""
        for e in edited_sets:
            self.plan(e)
        self.pending = list(edited_sets)

    def _fill(self) -> None:
        """Run the unedited model once per probe, keeping every cut tensor the plans need (plans
        whose cut would exceed CACHE_BYTES run the whole model)."""
        from . import verify

        plans = {e: self.plans[e] for e in self.pending}
        cut = list(dict.fromkeys(n for p in plans.values() if p for n in p[1] if n not in self.inputs))
        wanted = list(dict.fromkeys(self.outputs + cut))
        arrays = {n: v for n, v in self.arrays.items() if n in self.initializers}
        sess = verify.session(self.model, wanted, arrays=arrays)
        self.cache = []
        total = 0
        for probe in self.probes:
            values = dict(zip(wanted, sess.run(None, {**probe, **self.weights})))
            values.update(probe)
            self.cache.append(values)
            total += sum(values[n].nbytes for n in cut)
        if total > CACHE_BYTES:
            self.plans = {e: None for e in self.plans}
            self.cache = [{n: c[n] for n in self.outputs} for c in self.cache]

    def runner(self, edited: frozenset[str]) -> Runner | None:
        """A function of the edited weights' values (and any other weights) returning each probe's
        measured tensors, running D only; None where the whole model must run."""
        if edited in self.runners:
            return self.runners[edited]
        if self.cache is None and self.pending is not None and self.plans.get(edited) is not None:
            self._fill()
        plan = self.plans.get(edited) if self.cache is not None else None
        run = None
        if plan is not None:
            run = self._build(*plan)
        self.runners[edited] = run
        return run

    def _build(self, down: list[int], cut: list[str]) -> Runner:
        from . import verify

        nodes = [self.nodes[k] for k in down]
        produced = {o for n in nodes for o in n.output}
        read = {name for n in nodes for name in n.input if name}
        first = self.cache[0]
        inputs = [onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(first[n].dtype), list(first[n].shape)) for n in cut]
        weights = [self.inputs[n] for n in self.weight_inputs if n in read]
        changed = [o for o in self.outputs if o in produced]
        graph = onnx.helper.make_graph(nodes, "downstream", inputs + weights, [],
                                       [t for t in self.model.graph.initializer if t.name in read])
        sub = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        sub.functions.extend(self.model.functions)
        sess = verify.session(sub, changed, arrays={n: v for n, v in self.arrays.items() if n in read})
        names = [w.name for w in weights]

        def run(feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
            given = {n: feeds[n] for n in names}
            results = []
            for cached in self.cache:
                values = dict(zip(changed, sess.run(None, {**{n: cached[n] for n in cut}, **given})))
                results.append([values[o] if o in values else cached[o] for o in self.outputs])
            return results

        return run
