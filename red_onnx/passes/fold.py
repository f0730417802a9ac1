"""Canonicalization: put every linear layer in one form so the other passes see plain layers.

Exact rewrites only:

* ``Constant`` nodes become initializers; ``Identity`` and inference ``Dropout`` are removed.
* Gemm ``alpha``/``beta`` go into the constants: ``alpha·A·B + beta·C = A·(alpha·B) + (beta·C)``.
* An affine map on a layer's output channels folds into the layer, when the layer's output has no
  other consumer: ``y = s ⊙ (W x + b) + t  ⇒  W' = diag(s) W,  b' = s ⊙ b + t``. It covers
  ``BatchNormalization`` (``s = γ / sqrt(σ² + ε)``, ``t = β − μ s``) and ``Mul``/``Div``/``Add``/``Sub``
  by a per-channel or scalar constant (how Paddle exports an unfused BN).
* A linear layer's weight that is a copy of an embedding table, or of its transpose (a tied output
  layer the exporter stored twice), reads the table (through a ``Transpose``): stored once.
* A ``Transpose`` that keeps the batch axis first, flattened into features read only by linear
  layers (``Transpose → Flatten/Reshape(N, F) → Gemm/MatMul``: a Caffe or Keras export that flattens
  channels last), folds into those layers' input columns: with ``idx`` the transposed tensor's
  flat order of the untransposed one, ``x_T[k] = x[idx[k]]``, so ``W' [:, idx] = W``. The
  channels then reach the layers as blocks of features, which the channel passes can remove.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..context import Context, PassResult
from ..errors import InputError
from ..layers import LINEAR_OPS, Layer, find_layers, is_float, taken_names, unique_name

NAME = "fold"
#: A copy of an embedding table smaller than this many bytes is left as it is (a Transpose node
#: and its names cost about a hundred bytes).
TIED_MIN_BYTES = 4096


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn top-level ``Constant`` nodes and sparse initializers into (dense) initializers, in
    place; returns how many."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    keep, moved = [], 0
    for node in graph.node:
        tensor = constant_value(node, node.output[0]) if node.op_type == "Constant" and node.output[0] not in outputs \
            else None
        if tensor is None:
            keep.append(node)
            continue
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    for sparse in graph.sparse_initializer:  # dense, so that every pass sees one kind of weight
        graph.initializer.append(_dense(sparse))
        moved += 1
    del graph.sparse_initializer[:]
    return moved


def _dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    """The dense tensor of a sparse one (indices: flat positions [NNZ] or coordinates [NNZ, rank])."""
    values = numpy_helper.to_array(sparse.values)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64) if values.size else np.zeros(0, np.int64)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
    dense[indices] = values
    return numpy_helper.from_array(dense.reshape(tuple(sparse.dims)), sparse.values.name)


def constant_value(node: onnx.NodeProto, name: str) -> onnx.TensorProto | None:
    """A Constant node's value as a tensor named ``name``; None for sparse_value and strings."""
    for attr in node.attribute:
        if attr.name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(attr.t)
            t.name = name
            return t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = onnx.helper.get_attribute_value(attr)
            dtype = np.float32 if "float" in attr.name else np.int64
            return numpy_helper.from_array(np.array(value, dtype=dtype), name)
    return None  # sparse_value, value_string(s): left as they are


def run(ctx: Context) -> PassResult:
    start = time.perf_counter()
    graph = ctx.graph
    _name_nodes(graph)
    counts = {"identities_removed": _remove_identities(graph), "gemm_scalars_folded": _fold_gemm_scalars(graph),
              "table_copies_tied": _tie_table_copies(graph, ctx.exclude)}
    layers, _ = find_layers(graph, ctx.exclude)
    counts["affine_folded"] = 0
    counts["transposes_folded"] = _fold_transposes_into_features(graph, ctx.shapes, layers)
    rows = []
    for layer in layers:
        folded = []
        while (step := _fold_next(graph, layer, ctx.shapes)) is not None:
            folded.append(step)
            counts["affine_folded"] += 1
            rows.append({"name": layer.name, "folded": step[0]})
        scaled = [s for _, s in folded if np.any(s != 1)]
        if len(scaled) == 1:  # W' = W · s exactly in W's type: a codebook of W with scales s reproduces it
            ctx.fold_scales[layer.weight.name] = scaled[0]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result = PassResult(NAME, any(counts.values()), counts, rows)
    for node in graph.nodes:
        if node.op == "BatchNormalization":
            result.leave(node.name, _why_not_folded(node, graph))
    result.seconds = time.perf_counter() - start
    return result


def _why_not_folded(node: gs.Node, graph: gs.Graph) -> str:
    """Why a BatchNormalization stays (one line)."""
    x = node.inputs[0]
    producer = x.inputs[0] if x.inputs else None
    if producer is None or producer.op not in (*LINEAR_OPS, "Add"):
        return "follows no linear layer to fold into"
    if len(x.outputs) > 1 or any(t.name == x.name for t in graph.outputs):
        return f"the output of '{producer.name}' is also used elsewhere"
    if node.attrs.get("training_mode", 0) or not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
        return "training mode or non-constant statistics"
    return f"'{producer.name}' is left alone, or the statistics do not fit its channels"


def _name_nodes(graph: gs.Graph) -> None:
    """Give unnamed nodes a unique name (``Conv_3``): reports and --exclude refer to nodes by name."""
    from ..layers import unique_name

    taken = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            node.name = unique_name(f"{node.op}_{i}", taken)


def _remove_identities(graph: gs.Graph) -> int:
    """Bypass Identity and inference-mode Dropout nodes whose output is not a graph output."""
    outputs = {t.name for t in graph.outputs}
    removed = 0
    for node in graph.nodes:
        if node.op not in ("Identity", "Dropout") or not node.inputs or node.outputs[0].name in outputs:
            continue
        if node.op == "Dropout" and (_training(node) or any(o.outputs or o.name in outputs for o in node.outputs[1:])):
            continue
        x, y = node.inputs[0], node.outputs[0]
        for consumer in list(y.outputs):
            consumer.inputs = [x if t is y else t for t in consumer.inputs]
        node.outputs = []
        removed += 1
    return removed


def _training(node: gs.Node) -> bool:
    if len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2].name == "":
        return False
    mode = node.inputs[2]
    return not (isinstance(mode, gs.Constant) and not bool(np.asarray(mode.values).any()))


def _tie_table_copies(graph: gs.Graph, exclude) -> int:
    """A linear node's weight that equals an embedding table (a Gather's data, by computed
    indices) or its transpose bit for bit, as exporters store a tied output layer a second time,
    reads the table instead, through a Transpose where transposed (onnxruntime folds it at session
    creation): the file holds the table once, and hashing rounds it once for both uses. Returns
    how many copies were dropped."""
    tables = {}
    for node in graph.nodes:
        data = node.inputs[0] if node.op == "Gather" and len(node.inputs) == 2 else None
        if isinstance(data, gs.Constant) and not isinstance(node.inputs[1], gs.Constant) and data.values.ndim == 2 \
                and is_float(data.values) and data.values.nbytes >= TIED_MIN_BYTES:
            tables.setdefault(id(data), data)
    tied: dict[int, gs.Tensor] = {}  # id(copy) → what its readers read now
    transposed: dict[int, gs.Variable] = {}
    taken = taken_names(graph)
    for node in list(graph.nodes):
        w = node.inputs[1] if node.op in LINEAR_OPS and len(node.inputs) > 1 else None
        if not isinstance(w, gs.Constant) or id(w) in tables or w.values.ndim != 2 \
                or exclude is not None and exclude.search(node.name or ""):
            continue
        if id(w) not in tied:
            for table in tables.values():
                t = table.values
                if w.values.dtype != t.dtype or w.values.size != t.size:
                    continue
                if w.values.shape == t.shape and _same_bits(w.values, t):
                    tied[id(w)] = table
                elif w.values.shape == t.shape[::-1] and _same_bits(w.values, t.T):
                    if id(table) not in transposed:
                        out = gs.Variable(unique_name(f"{table.name}_transposed", taken), dtype=t.dtype)
                        graph.nodes.append(gs.Node("Transpose", unique_name(f"{table.name}_transpose", taken),
                                                   {"perm": [1, 0]}, [table], [out]))
                        transposed[id(table)] = out
                    tied[id(w)] = transposed[id(table)]
                else:
                    continue
                break
        if id(w) in tied:
            node.inputs[1] = tied[id(w)]
    return len(tied)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (-0.0 and 0.0 differ; so do NaNs of other payloads), a few values first."""
    unsigned = np.dtype(f"u{a.dtype.itemsize}")
    if not np.array_equal(a.flat[:16].view(unsigned), b.flat[:16].view(unsigned)):  # copies, in C order
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).view(unsigned), np.ascontiguousarray(b).view(unsigned)))


def _fold_gemm_scalars(graph: gs.Graph) -> int:
    folded = 0
    for node in graph.nodes:
        if node.op != "Gemm" or len(node.inputs) < 2:
            continue
        b = node.inputs[1]
        alpha = float(node.attrs.get("alpha", 1.0))
        if alpha != 1.0 and isinstance(b, gs.Constant) and len(b.outputs) == 1:
            b.values = (b.values * alpha).astype(b.values.dtype)
            node.attrs["alpha"] = 1.0
            folded += 1
        beta = float(node.attrs.get("beta", 1.0))
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if beta != 1.0 and isinstance(c, gs.Constant) and len(c.outputs) == 1:
            c.values = (c.values * beta).astype(c.values.dtype)
            node.attrs["beta"] = 1.0
            folded += 1
    return folded


def _fold_transposes_into_features(graph: gs.Graph, shapes: dict[str, tuple[int, ...]], found: list[Layer]) -> int:
    """Fold each Transpose flattened into features for linear layers (of ``found``) into their
    weight columns (see the module docstring); returns how many."""
    layers = {id(layer.node): layer for layer in found}
    outputs = {t.name for t in graph.outputs}
    folded = 0
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs or not node.outputs:
            continue
        x, y = node.inputs[0], node.outputs[0]
        shape = shapes.get(x.name)
        if shape is None or len(shape) < 3:
            continue
        perm = [int(a) for a in node.attrs.get("perm", range(len(shape) - 1, -1, -1))]
        flatten = [n for n in y.outputs if n.op in ("Flatten", "Reshape") and n.inputs[0] is y]
        batch_reads = [n for n in y.outputs if n.op == "Shape" and _reads_batch_only(n)]
        if perm[0] != 0 or y.name in outputs or len(flatten) != 1 or len(flatten) + len(batch_reads) != len(y.outputs):
            continue
        flat = flatten[0]
        z = flat.outputs[0]
        features = int(np.prod(shape[1:]))
        if z.name in outputs or shapes.get(z.name) != (shape[0], features) or not z.outputs \
                or flat.op == "Flatten" and flat.attrs.get("axis", 1) != 1:
            continue
        readers = [layers.get(id(n)) for n in z.outputs]
        if any(r is None or r.node.inputs[0] is not z or r.op not in ("Gemm", "MatMul") or r.group != 1
               or r.node.attrs.get("transA", 0) or len(r.weight.outputs) != 1 or r.get_weight().shape[1] != features
               for r in readers):
            continue
        # idx[k]: the position in x's flat order (axes 1..) of the k-th feature of the transposed tensor
        idx = np.arange(features).reshape(shape[1:]).transpose([a - 1 for a in perm[1:]]).ravel()
        for layer in readers:
            w = layer.get_weight()
            moved = np.empty_like(w)
            moved[:, idx] = w
            layer.set_weight(moved)
        flat.inputs[0] = x
        for reader in batch_reads:  # the batch size is the same before the Transpose
            reader.inputs[0] = x
        node.outputs = []
        folded += 1
    return folded


def _reads_batch_only(shape_node: gs.Node) -> bool:
    """A Shape node whose value is only read at index 0 (by Gathers of a constant 0 on axis 0)."""
    if shape_node.attrs.get("start", 0) != 0 or "end" in shape_node.attrs and shape_node.attrs["end"] != 1:
        return False
    if "end" in shape_node.attrs:
        return True
    out = shape_node.outputs[0]
    return bool(out.outputs) and all(
        g.op == "Gather" and g.inputs[0] is out and g.attrs.get("axis", 0) == 0 and isinstance(g.inputs[1], gs.Constant)
        and np.all(np.asarray(g.inputs[1].values) == 0) for g in out.outputs)


def _fold_next(graph: gs.Graph, layer: Layer, shapes: dict[str, tuple[int, ...]]
               ) -> tuple[str, np.ndarray] | None:
    """Fold the single consumer of the layer's output into the layer, if it is a channel affine map."""
    out = layer.output
    if any(t.name == out.name for t in graph.outputs) or len(out.outputs) != 1:
        return None
    consumer = out.outputs[0]
    rank = _output_rank(layer, shapes)
    if rank is None:
        return None
    channels = layer.out_channels
    axis = rank - 1 if layer.op == "MatMul" else 1
    if layer.op in ("Gemm", "MatMul") and rank != 2 and consumer.op == "BatchNormalization":
        return None  # BN normalizes axis 1, the features are the last axis
    affine = _channel_affine(consumer, out, channels, rank, axis, layer.weight.values.dtype)
    if affine is None:
        return None
    scale, shift = affine
    w = layer.get_weight()
    scale_w = scale.astype(w.dtype)  # multiply in the weight's type: reproducible by a Mul node
    with np.errstate(over="ignore", invalid="ignore"):
        folded = w * scale_w.reshape((-1,) + (1,) * (w.ndim - 1))
        bias = layer.get_bias() * scale + shift
    if not (np.isfinite(folded).all() and np.isfinite(bias.astype(w.dtype)).all()):
        raise InputError(f"folding {consumer.op} '{consumer.name}' into '{layer.name}' overflows "
                         f"'{layer.weight.name}' ({w.dtype} values up to {float(np.abs(w).max()):.3g})")
    layer.set_weight(folded)
    layer.set_bias(bias, graph)
    result = consumer.outputs[0]
    consumer.outputs = []
    consumer.inputs = []
    (layer.bias_node or layer.node).outputs = [result]
    return consumer.op, scale_w


def _output_rank(layer: Layer, shapes: dict[str, tuple[int, ...]]) -> int | None:
    if layer.op in ("Conv", "ConvTranspose"):
        return layer.weight.values.ndim
    if layer.op == "Gemm":
        return 2
    shape = shapes.get(layer.node.inputs[0].name) or layer.node.inputs[0].shape
    return len(shape) if shape is not None else None


def _channel_affine(node: gs.Node, x: gs.Tensor, channels: int, rank: int, axis: int, dtype: np.dtype
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel if ``node(x) = scale ⊙ x + shift`` along ``axis``, else None."""
    if node.op == "BatchNormalization":
        if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            return None
        if node.attrs.get("training_mode", 0) or not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
            return None
        gamma, beta, mean, var = (t.values.astype(np.float64) for t in node.inputs[1:5])
        if gamma.shape != (channels,):
            return None
        with np.errstate(all="ignore"):
            scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
            shift = beta - mean * scale
        return (scale, shift) if np.all(np.isfinite(scale)) and np.all(np.isfinite(shift)) else None
    if node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2:
        return None
    const = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    if not isinstance(const, gs.Constant) or const.values.dtype != dtype or node.inputs[0] is node.inputs[1]:
        return None
    if not np.isfinite(const.values).all():
        return None  # a mask (-inf where masked) stays as it is
    vector = _per_channel(const.values, channels, rank, axis)
    if vector is None:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == "Mul":
        return vector, zeros
    if node.op == "Add":
        return ones, vector
    if node.inputs[1] is not const:
        return None  # c - x and c / x are not affine maps of this form
    if node.op == "Sub":
        return ones, -vector
    return (None if np.any(vector == 0) else (1.0 / vector, zeros))


def _per_channel(values: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """The constant as a (channels,) vector if it varies along ``axis`` only and keeps x's shape."""
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1).astype(np.float64), (channels,)).copy()
