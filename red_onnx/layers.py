"""One view of every linear layer, whatever the op, and the model's parameters and MACs.

A layer's weight is seen as ``(out, in, *kernel)`` (``in`` per group), its bias as ``(out,)``:

==============  ==========================  ===============================================
op              stored as                   view
==============  ==========================  ===============================================
Conv            (O, I/g, *k)                unchanged
ConvTranspose   (I, O/g, *k)                per group, axes 0 and 1 swapped
Gemm transB=1   (N, K)                      unchanged (bias: input C)
Gemm transB=0   (K, N)                      transposed
MatMul X·B      (K, N)                      transposed (bias: a following Add of a constant)
==============  ==========================  ===============================================

Passes read and write weights through this view only, never the op-specific layouts.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputError

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSoftmax", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "QGemm", "MatMulNBits",
})
FLOAT_TYPES = (np.float16, np.float32, np.float64)


def is_float(array: np.ndarray) -> bool:
    return array.dtype in FLOAT_TYPES or array.dtype.name == "bfloat16"


@dataclass
class Layer:
    """A linear node with constant weights, plus its bias (own input or a following Add)."""

    node: gs.Node
    weight: gs.Constant
    bias: gs.Constant | None = None
    bias_node: gs.Node | None = None  # the Add carrying a MatMul's bias

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def group(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.op in ("Conv", "ConvTranspose") else 1

    @property
    def output(self) -> gs.Variable:
        """The tensor carrying the layer's result, bias included."""
        return (self.bias_node or self.node).outputs[0]

    def get_weight(self) -> np.ndarray:
        return self.viewed(self.weight.values)

    def viewed(self, w: np.ndarray) -> np.ndarray:
        """A weight given in the op's own layout, in the view layout (out, in, *kernel)."""
        if self.op == "ConvTranspose":
            g = self.group
            i, o_g = w.shape[:2]
            k = w.shape[2:]
            return w.reshape(g, i // g, o_g, *k).swapaxes(1, 2).reshape(g * o_g, i // g, *k)
        if self.op == "MatMul" or (self.op == "Gemm" and not self.node.attrs.get("transB", 0)):
            return w.T
        return w

    def set_weight(self, view: np.ndarray) -> None:
        """Store a weight given in the view layout (its shape may differ from the current one)."""
        self.weight.values = self.stored(view)

    def stored(self, view: np.ndarray) -> np.ndarray:
        """A weight given in the view layout, in the op's own layout and dtype."""
        view = np.ascontiguousarray(view, dtype=self.weight.values.dtype)
        if self.op == "ConvTranspose":
            g = self.group
            o, i_g = view.shape[:2]
            k = view.shape[2:]
            stored = view.reshape(g, o // g, i_g, *k).swapaxes(1, 2).reshape(g * i_g, o // g, *k)
        elif self.op == "MatMul" or (self.op == "Gemm" and not self.node.attrs.get("transB", 0)):
            stored = view.T
        else:
            stored = view
        return np.ascontiguousarray(stored)

    @property
    def out_channels(self) -> int:
        return self.get_weight().shape[0]

    def get_bias(self) -> np.ndarray:
        """The bias as ``(out,)``; zeros when the layer has none."""
        out = self.out_channels
        if self.bias is None:
            return np.zeros(out, dtype=self.weight.values.dtype)
        return np.broadcast_to(self.bias.values.reshape(-1), (out,)).astype(self.weight.values.dtype)

    def set_bias(self, bias: np.ndarray, graph: gs.Graph) -> None:
        """Store a ``(out,)`` bias, adding a bias input (a MatMul: an Add node) where it had none."""
        bias = np.ascontiguousarray(bias, dtype=self.weight.values.dtype)
        if self.bias is not None:
            old = self.bias.values
            shape = (1,) * (old.ndim - 1) + (-1,) if old.ndim > 1 else (-1,)
            self.bias.values = bias.reshape(shape)
            return
        taken = taken_names(graph)
        base = self.name or self.weight.name
        self.bias = gs.Constant(unique_name(f"{base}_bias", taken), bias)
        if self.op == "MatMul":
            result = self.node.outputs[0]
            pre = gs.Variable(unique_name(f"{base}_nobias", taken), dtype=result.dtype)
            self.node.outputs = [pre]
            self.bias_node = gs.Node("Add", unique_name(f"{base}_add_bias", taken), inputs=[pre, self.bias],
                                     outputs=[result])
            graph.nodes.append(self.bias_node)
            return
        if self.op == "Gemm":
            self.node.attrs["beta"] = 1.0
        self.node.inputs = self.node.inputs[:2] + [self.bias]

    def add_to_bias(self, stored: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The bias ``stored`` (its stored layout) plus ``delta`` (``(out,)``)."""
        return (stored + delta.reshape(stored.shape)).astype(stored.dtype)

    def remove_bias(self, graph: gs.Graph) -> None:
        """Drop the bias (a MatMul's Add node too)."""
        if self.bias_node is not None:  # MatMul + Add: the MatMul writes the Add's output again
            self.node.outputs = self.bias_node.outputs
            self.bias_node.outputs = []
            graph.nodes.remove(self.bias_node)
            self.bias_node = None
        else:
            self.node.inputs = self.node.inputs[:2]
        self.bias = None


def taken_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name of ``graph`` (for :func:`unique_name`)."""
    return set(graph.tensors()) | {n.name for n in graph.nodes}


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, … : the first not in ``taken`` (which it joins)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


@dataclass
class Skipped:
    """A node that looks like a layer but is left alone, and why."""

    name: str
    op: str
    reason: str


def users(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def find_layers(graph: gs.Graph, exclude: re.Pattern | None = None) -> tuple[list[Layer], list[Skipped]]:
    """Every linear node whose weights the passes may rewrite, and every one left alone with why."""
    layers, skipped = [], []
    graph_outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op in QUANTIZED_OPS:
            skipped.append(Skipped(node.name, node.op, "already quantized"))
            continue
        if node.op not in LINEAR_OPS or len(node.inputs) < 2:
            continue
        reason = _why_not_layer(node, exclude)
        if reason:
            skipped.append(Skipped(node.name, node.op, reason))
            continue
        weight = node.inputs[1]
        bias, bias_node = None, None
        if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = node.inputs[2]
            n = _out_size(node, weight)
            per_output = b.values.size == 1 or (b.values.shape[-1] == n and b.values.size == n) \
                if isinstance(b, gs.Constant) and b.values.ndim else isinstance(b, gs.Constant)
            if isinstance(b, gs.Constant) and per_output and len(b.outputs) == 1:
                bias = b
            elif not (isinstance(b, gs.Variable) and b.name == ""):
                skipped.append(Skipped(node.name, node.op, "bias is not a private per-output constant"))
                continue
        if node.op == "MatMul":
            out = node.outputs[0]
            consumers = users(out)
            if len(consumers) == 1 and out.name not in graph_outputs and consumers[0].op == "Add":
                add = consumers[0]
                other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                n = weight.values.shape[1]
                if (isinstance(other, gs.Constant) and len(other.outputs) == 1 and other.values.size == n
                        and other.values.shape[-1] == n and other.values.dtype == weight.values.dtype):
                    bias, bias_node = other, add
        layers.append(Layer(node, weight, bias, bias_node))
    return layers, skipped


RECURRENT_OPS = ("LSTM", "GRU", "RNN")


@dataclass
class RecurrentWeight(Layer):
    """A recurrent node's input (W) or recurrent (R) weight, (directions, gates·H, I or H), viewed
    as rows ``(directions·gates·H, I or H)``: what the hash and codebook passes read and store.
    Not a layer the channel passes rewrite (:func:`find_layers` does not return it)."""

    which: str = "W"

    @property
    def name(self) -> str:
        return f"{self.node.name}:{self.which}"

    def viewed(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(-1, w.shape[-1])

    def stored(self, view: np.ndarray) -> np.ndarray:
        shape = self.weight.values.shape
        return np.ascontiguousarray(np.asarray(view, dtype=self.weight.values.dtype).reshape(shape))


@dataclass
class RecurrentInput(RecurrentWeight):
    """A recurrent node's input weight W as a layer that reads its input X (seq, batch, I): its
    columns, X's features, may follow a channel space (x·Wᵀ + Wb is linear in x at every step, in
    every gate); its rows, directions·gates·H, stay. Its bias is B's first half per direction (Wb;
    Rb, the recurrent half, stays)."""

    def stored(self, view: np.ndarray) -> np.ndarray:
        directions, rows = self.weight.values.shape[:2]
        return np.ascontiguousarray(np.asarray(view, dtype=self.weight.values.dtype).reshape(directions, rows, -1))

    def get_bias(self) -> np.ndarray:
        directions, rows = self.weight.values.shape[:2]
        if self.bias is None:
            return np.zeros(directions * rows, dtype=self.weight.values.dtype)
        return self.bias.values[:, :rows].reshape(-1).astype(self.weight.values.dtype)

    def set_bias(self, bias: np.ndarray, graph: gs.Graph) -> None:
        directions, rows = self.weight.values.shape[:2]
        if self.bias is None:  # B = [Wb, Rb] per direction, zeros; X, W, R, B are inputs 0 to 3
            taken = taken_names(graph)
            self.bias = gs.Constant(unique_name(f"{self.node.name}_B", taken),
                                    np.zeros((directions, 2 * rows), self.weight.values.dtype))
            inputs = list(self.node.inputs) + [gs.Variable.empty() for _ in range(4 - len(self.node.inputs))]
            inputs[3] = self.bias
            self.node.inputs = inputs
        values = self.bias.values.copy()
        values[:, :rows] = np.asarray(bias, values.dtype).reshape(directions, rows)
        self.bias.values = values

    def add_to_bias(self, stored: np.ndarray, delta: np.ndarray) -> np.ndarray:
        directions, rows = self.weight.values.shape[:2]
        out = np.array(stored, copy=True)
        out[:, :rows] += delta.reshape(directions, rows).astype(out.dtype)
        return out

    def remove_bias(self, graph: gs.Graph) -> None:
        inputs = list(self.node.inputs)
        inputs[3] = gs.Variable.empty()
        while len(inputs) > 3 and not inputs[-1].name:
            inputs.pop()
        self.node.inputs = inputs
        self.bias = None


@dataclass
class SharedLinear(Layer):
    """One weight that several Gemm or Conv nodes of the same attributes read (an unrolled RNN's
    cell, applied at every step), with its bias, if any, read by the same nodes: a layer the channel
    passes may rewrite as one where every reader reads the same channels (the coupling checks).
    ``node`` is the first reader; ``readers`` all of them."""

    readers: list[gs.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.weight.name

    def set_bias(self, bias: np.ndarray, graph: gs.Graph) -> None:
        if self.bias is not None:
            super().set_bias(bias, graph)
            return
        taken = taken_names(graph)
        self.bias = gs.Constant(unique_name(f"{self.weight.name}_bias", taken),
                                np.ascontiguousarray(bias, dtype=self.weight.values.dtype))
        for node in self.readers:
            if node.op == "Gemm":
                node.attrs["beta"] = 1.0
            node.inputs = node.inputs[:2] + [self.bias]

    def remove_bias(self, graph: gs.Graph) -> None:
        for node in self.readers:
            node.inputs = node.inputs[:2]
        self.bias = None


def shared_linears(graph: gs.Graph, exclude: re.Pattern | None = None) -> dict[int, SharedLinear]:
    """id(reader) → its :class:`SharedLinear`, for every float weight read as the weight of two or
    more Gemm (transA 0, alpha 1) or Conv nodes with equal attributes and no other reader, whose
    bias, if any, is a constant the same nodes read as their bias, and no one else; none excluded."""
    found = {}
    for tensor in graph.tensors().values():
        readers = list(tensor.outputs) if isinstance(tensor, gs.Constant) else []
        if len(readers) < 2 or not is_float(tensor.values) \
                or any(n.op not in ("Gemm", "Conv") or len(n.inputs) < 2 or n.inputs[1] is not tensor
                       or n.inputs[0] is tensor or n.attrs != readers[0].attrs or n.op != readers[0].op
                       or n.attrs.get("transA", 0) or n.attrs.get("alpha", 1.0) != 1.0 for n in readers) \
                or exclude is not None and any(exclude.search(n.name or "") for n in readers):
            continue
        biases = {id(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None for n in readers}
        bias = readers[0].inputs[2] if len(biases) == 1 and None not in biases else None
        if len(biases) != 1 or bias is not None and (
                not isinstance(bias, gs.Constant) or len(bias.outputs) != len(readers)
                or bias.values.size != _out_size(readers[0], tensor)):
            continue
        layer = SharedLinear(readers[0], tensor, bias, readers=readers)
        found.update({id(n): layer for n in readers})
    return found


def recurrent_inputs(graph: gs.Graph, exclude: re.Pattern | None = None) -> list[RecurrentInput]:
    """The recurrent nodes whose W is a private float constant and B, if any, a private constant:
    the ones whose input features the channel passes may rewrite."""
    found = []
    for r in recurrent_weights(graph, exclude):
        b = r.node.inputs[3] if len(r.node.inputs) > 3 and r.node.inputs[3].name else None
        if r.which == "W" and (b is None or isinstance(b, gs.Constant) and len(b.outputs) == 1
                               and b.values.shape == (r.weight.values.shape[0], 2 * r.weight.values.shape[1])):
            found.append(RecurrentInput(r.node, r.weight, b, which="W"))
    return found


def recurrent_weights(graph: gs.Graph, exclude: re.Pattern | None = None) -> list[RecurrentWeight]:
    """The W and R weights of every LSTM, GRU and RNN node: private float constants of rank 3."""
    found = []
    for node in graph.nodes:
        if node.op not in RECURRENT_OPS or (exclude is not None and exclude.search(node.name or "")):
            continue
        for which, tensor in zip("WR", node.inputs[1:3]):
            if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1 and tensor.values.ndim == 3 \
                    and is_float(tensor.values):
                found.append(RecurrentWeight(node, tensor, which=which))
    return found


@dataclass
class SharedWeight(Layer):
    """A float weight that no layer owns but whose values hashing may round: an embedding table (a
    Gather's data), a weight that several linear nodes read (tied weights, an unrolled RNN's
    cells) or that reaches them through a Transpose. Viewed as rows along its first axis (a
    table's rows, a Conv's or a transposed Gemm's output channels); ``node`` is its first reader.
    Not a layer the channel passes rewrite (:class:`SharedLinear` is, where they may)."""

    @property
    def name(self) -> str:
        return self.weight.name

    def viewed(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(w.shape[0], -1)

    def stored(self, view: np.ndarray) -> np.ndarray:
        shape = self.weight.values.shape
        return np.ascontiguousarray(np.asarray(view, dtype=self.weight.values.dtype).reshape(shape))


def shared_weights(graph: gs.Graph, exclude: re.Pattern | None = None) -> list[SharedWeight]:
    """Float constants of rank 2 or more read only as weights, by no excluded node, that
    :func:`find_layers` cannot own: the data of Gathers by computed indices (embedding tables),
    the weights of several linear nodes, and weights a Transpose feeds to linear nodes (a tied
    output layer as torch's dynamo exporter writes it: ``MatMul(x, Transpose(table))``)."""

    def linear_weight(node: gs.Node, tensor: gs.Tensor) -> bool:
        return node.op in LINEAR_OPS and len(node.inputs) > 1 and node.inputs[1] is tensor \
            and node.inputs[0] is not tensor

    def as_weight(node: gs.Node, tensor: gs.Constant) -> bool:
        if node.op == "Gather":
            return node.inputs[0] is tensor and not isinstance(node.inputs[1], gs.Constant)
        if node.op == "Transpose":
            out = node.outputs[0]
            return out.name not in outputs and bool(out.outputs) and all(linear_weight(n, out) for n in out.outputs)
        return linear_weight(node, tensor)

    outputs = {t.name for t in graph.outputs}
    found = []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or tensor.values.ndim < 2 or not is_float(tensor.values):
            continue
        readers = list(tensor.outputs)
        if not readers or not all(as_weight(n, tensor) for n in readers) \
                or (len(readers) == 1 and readers[0].op in LINEAR_OPS):
            continue  # one linear reader: a layer, or left alone for its own reason
        users = readers + [n for r in readers if r.op == "Transpose" for n in r.outputs[0].outputs]
        if exclude is not None and any(exclude.search(n.name or "") for n in users):
            continue
        found.append(SharedWeight(readers[0], tensor))
    return found


def hashable_weights(graph: gs.Graph, exclude: re.Pattern | None = None) -> list[Layer]:
    """Every weight whose values the hash and codebook passes may round or store: the layers', the
    recurrent nodes' W and R, and the :func:`shared_weights`."""
    return find_layers(graph, exclude)[0] + recurrent_weights(graph, exclude) + shared_weights(graph, exclude)


def _out_size(node: gs.Node, weight: gs.Constant) -> int:
    w = weight.values
    if node.op == "Conv":
        return w.shape[0]
    if node.op == "ConvTranspose":
        return w.shape[1] * int(node.attrs.get("group", 1))
    return w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]


def _is_codebook(tensor: gs.Tensor) -> bool:
    """Whether a tensor is decoded from a codebook (Gather of a constant, maybe times a scale)."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Mul":
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    return node is not None and node.op == "Gather" and isinstance(node.inputs[0], gs.Constant)


def _why_not_layer(node: gs.Node, exclude: re.Pattern | None) -> str | None:
    weight = node.inputs[1]
    if len(weight.outputs) > 1:
        return f"weights shared with {len(weight.outputs) - 1} other node(s)"
    if not isinstance(weight, gs.Constant) and node.op == "MatMul" and not _is_codebook(weight):
        return "multiplies two activations"
    if not isinstance(weight, gs.Constant):
        return "weights are computed by a node (e.g. a codebook)" if weight.inputs else \
            "weights are a graph input, not a constant"
    if not is_float(weight.values):
        return f"weights are {weight.values.dtype}, not floating point"
    if isinstance(node.inputs[0], gs.Constant):
        return "input is a constant"
    if node.op == "MatMul" and weight.values.ndim != 2:
        return f"weight has rank {weight.values.ndim}, only 2-D MatMul weights are layers"
    if node.op == "Gemm" and node.attrs.get("alpha", 1.0) != 1.0:
        return "Gemm with alpha != 1"
    if exclude is not None and exclude.search(node.name or ""):
        return "excluded by --exclude"
    return None


# ---------------------------------------------------------------------------------------------
# Parameters and MACs


@dataclass
class Analysis:
    """Per-sample cost of a model (batch 1)."""

    params: int
    macs: int
    op_counts: Counter
    macs_per_node: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)  # linear nodes whose MACs the shapes cannot tell


def input_specs(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None
                ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Concrete shape and dtype of each graph input: leading symbolic dim → 1, others from overrides.

    Raises InputError naming the input and the dimension when a non-batch dimension is unknown.
    """
    overrides = overrides or {}
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if not inp.type.HasField("tensor_type") or not inp.type.tensor_type.elem_type:
            kind = (inp.type.WhichOneof("value") or "untyped").replace("_type", "")
            raise InputError(f"input '{inp.name}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a tensor: "
                             "red_onnx handles models whose inputs are tensors only")
        ttype = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        dims = list(ttype.shape.dim)
        if inp.name in overrides:
            shape = tuple(overrides[inp.name])
            if ttype.HasField("shape") and len(shape) != len(dims):
                raise InputError(f"--input-shape {inp.name}: rank {len(shape)} given, the input has rank {len(dims)}")
            specs[inp.name] = (shape, dtype)
            continue
        shape = []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif axis == 0:
                shape.append(1)
            else:
                label = d.dim_param or "?"
                example = ",".join(str(x.dim_value) if x.dim_value > 0 else ("1" if i == 0 else "N")
                                   for i, x in enumerate(dims))
                raise InputError(f"input '{inp.name}' has symbolic dimension {axis} ('{label}'): give its size, "
                                 f"e.g. --input-shape {inp.name}:{example} with N replaced by a number")
        specs[inp.name] = (tuple(shape), dtype)
    for name in overrides:
        if name not in specs:
            raise InputError(f"--input-shape {name}: the model has no input named '{name}' "
                             f"(inputs: {', '.join(specs)})")
    return specs


def tensor_shapes(model: onnx.ModelProto, specs: dict[str, tuple[tuple[int, ...], np.dtype]]
                  ) -> dict[str, tuple[int, ...]]:
    """Static shapes of the model's tensors at the given input shapes (onnx shape inference, on a
    copy whose large initializers keep their type and dims but not their data)."""
    fixed = weightless(model)
    for inp in fixed.graph.input:
        if inp.name in specs:
            shape = specs[inp.name][0]
            tshape = inp.type.tensor_type.shape
            del tshape.dim[:]
            for d in shape:
                tshape.dim.add().dim_value = d
    shapes: dict[str, tuple[int, ...]] = {}
    for _ in range(SHAPE_ROUNDS):
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
        except Exception:
            inferred = fixed
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
        if not _fold_shape_inputs(fixed, shapes):
            break
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


#: rounds of shape inference, each after :func:`_fold_shape_inputs` gave it more constants
SHAPE_ROUNDS = 4
#: the ops :func:`_fold_shape_inputs` evaluates on small integer tensors
_SHAPE_MATH = {
    "Identity": lambda v, a: v[0], "Cast": lambda v, a: v[0].astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"])),
    "Add": lambda v, a: v[0] + v[1], "Sub": lambda v, a: v[0] - v[1], "Mul": lambda v, a: v[0] * v[1],
    "Concat": lambda v, a: np.concatenate(v, axis=a["axis"]),
    "Gather": lambda v, a: np.take(v[0], v[1], axis=a.get("axis", 0)),
    "Unsqueeze": lambda v, a: np.expand_dims(v[0], tuple(a["axes"] if "axes" in a else v[1].tolist())),
    "Squeeze": lambda v, a: np.squeeze(v[0], tuple(a["axes"] if "axes" in a else v[1].tolist())),
    "Slice": lambda v, a: _slice(v, a),
    "Reshape": lambda v, a: v[0].reshape([d if d != 0 else v[0].shape[i] for i, d in enumerate(v[1].tolist())]),
}
#: ops whose output shape depends on the values of these inputs (indices): the inputs folded
_SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Resize": (2, 3),
                 "Slice": (1, 2, 3, 4)}


def _slice(v: list[np.ndarray], a: dict) -> np.ndarray:
    starts, ends = (v[1], v[2]) if len(v) > 2 else (np.array(a["starts"]), np.array(a["ends"]))
    axes = v[3] if len(v) > 3 else np.array(a.get("axes", range(len(starts))))
    steps = v[4] if len(v) > 4 else np.ones(len(starts), np.int64)
    index = [slice(None)] * v[0].ndim
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        index[axis] = slice(start, end, step)
    return v[0][tuple(index)]


def _fold_shape_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Where shape inference stopped at an op whose output shape follows a computed input (a
    Reshape to Concat(Shape(x)[:2], [-1]) in an opset-11 export: onnx's data propagation does not
    read that Slice), evaluate that input from the static shapes (Shape, Slice, Concat, Gather,
    arithmetic on small integer tensors) and feed it to the op as a constant, in ``model``, a copy
    used for inference only. Returns whether anything was folded."""
    integers = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_type in integers and len(t.dims) <= 1 and int(np.prod(t.dims)) <= 64}
    initializers = {t.name for t in model.graph.initializer}
    folded = False
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs and attrs["value"].data_type in integers:
            values[node.output[0]] = onnx.numpy_helper.to_array(attrs["value"])
        elif node.op_type == "Shape" and node.input[0] in shapes:
            values[node.output[0]] = np.array(shapes[node.input[0]][attrs.get("start", 0):attrs.get("end")], np.int64)
        elif node.op_type in _SHAPE_MATH and all(not name or name in values for name in node.input):
            try:
                values[node.output[0]] = np.asarray(_SHAPE_MATH[node.op_type]([values[n] for n in node.input if n],
                                                                              attrs))
            except (KeyError, ValueError, IndexError, TypeError):
                pass
        if node.output[0] in shapes:
            continue
        for k in _SHAPE_INPUTS.get(node.op_type, ()):
            if k < len(node.input) and node.input[k] in values and node.input[k] not in initializers:
                name = node.input[k] + "_folded_for_inference"
                if name not in initializers:
                    model.graph.initializer.append(onnx.numpy_helper.from_array(values[node.input[k]], name))
                    initializers.add(name)
                node.input[k] = name
                folded = True
    return folded


def refresh_shapes(graph: gs.Graph, template: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Update ``shapes`` to the graph's current tensor shapes (channel counts change as channels are
    removed); only Concat offsets need them, so a graph without a Concat is left as it is."""
    from .model_io import snapshot

    if not any(node.op == "Concat" for node in graph.nodes):
        return
    specs = {t.name: (shapes[t.name], t.dtype) for t in graph.inputs if t.name in shapes}
    shapes.update(tensor_shapes(snapshot(graph, template)[0], specs))


def weightless(model: onnx.ModelProto, keep: int = 1024) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over ``keep`` elements have dims and type but no data
    (enough for shape inference; small ones such as shape vectors keep their values)."""
    from .model_io import without_initializers

    out = without_initializers(model)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= keep:
            out.graph.initializer.add().CopyFrom(init)
        else:
            out.graph.initializer.add(name=init.name, dims=init.dims, data_type=init.data_type)
    return out


def _np_dtype(data_type: int):
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except (KeyError, ValueError):
        return None


#: quantized ops that multiply as a float op does: (that op, the input indices of its two factors)
QUANTIZED_AS = {"ConvInteger": ("Conv", 0, 1), "QLinearConv": ("Conv", 0, 3),
                "MatMulInteger": ("MatMul", 0, 1), "QLinearMatMul": ("MatMul", 0, 3)}


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Multiply-accumulates of one node per sample; None where a needed shape is unknown."""
    get = shapes.get
    if node.op_type in QUANTIZED_AS:
        op, a, b = QUANTIZED_AS[node.op_type]
        if len(node.input) <= b:
            return None
        node = onnx.helper.make_node(op, [node.input[a], node.input[b]], list(node.output))
    if node.op_type == "Conv":
        w, y = get(node.input[1]), get(node.output[0])
        return None if w is None or y is None else int(np.prod(y)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        w, x = get(node.input[1]), get(node.input[0])
        return None if w is None or x is None else int(np.prod(x)) * int(np.prod(w[1:]))
    if node.op_type == "Gemm":
        a, b = get(node.input[0]), get(node.input[1])
        if a is None or b is None:
            return None
        attrs = {a_.name: onnx.helper.get_attribute_value(a_) for a_ in node.attribute}
        if len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * k * n
    if node.op_type == "MatMul":
        a, b = get(node.input[0]), get(node.input[1])
        if a is None or b is None:
            return None
        a2 = a if len(a) > 1 else (1,) + tuple(a)
        b2 = b if len(b) > 1 else tuple(b) + (1,)
        batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
        return int(np.prod(batch)) * a2[-2] * a2[-1] * b2[-1]
    if node.op_type in ("LSTM", "GRU", "RNN"):  # per step and direction: gates·H × (I + H)
        x, w, r = (get(name) for name in node.input[:3])
        if x is None or w is None or r is None or len(x) != 3:
            return None
        return x[0] * x[1] * w[0] * w[1] * (w[2] + r[2])  # (T·N or N·T) · directions · gates·H · (I + H)
    return 0


def analyze(model: onnx.ModelProto, specs: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None) -> Analysis:
    """Parameters and MACs per sample (batch 1) of a model. Parameters: the elements of float
    initializers and of 8- and 16-bit integer ones (codebook indices count as the weights they
    expand to, quantized weights as theirs); MACs: of linear layers, quantized ones included."""
    specs = specs if specs is not None else input_specs(model)
    shapes = tensor_shapes(model, specs)
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    params = sum(int(np.prod(t.dims)) for t in tensors
                 if _np_dtype(t.data_type) in FLOAT_TYPES + (np.uint8, np.uint16, np.int8))
    macs, per_node, unknown = 0, {}, []
    for i, node in enumerate(model.graph.node):
        m = node_macs(node, shapes)
        if m is None:
            unknown.append(node.name or f"{node.op_type}_{i}")
        elif m:
            per_node[node.name or f"{node.op_type}_{i}"] = m
            macs += m
    return Analysis(params, macs, Counter(n.op_type for n in model.graph.node), per_node, unknown)
