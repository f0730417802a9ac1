"""Channel coupling: which layers must change together when a channel is merged or removed.

A **channel space** is a set of tensors that carry the same C channels: a linear layer's output
and everything reached from it through channel-wise ops (activations, BatchNormalization, per-channel
constants, pooling, depthwise convs, residual Adds). It is found by a flood fill over tensors, in
both directions, through the ops the handler registry knows:

* its **producers** are the linear layers writing one of its tensors (a residual Add makes two
  producers share a space: a merge must hold in every producer);
* its **consumers** are the linear layers reading one of its tensors; a Flatten or Reshape to
  features maps channel c to the block of features [c·B, (c+1)·B); past a Transpose to
  (seq, batch, C), an LSTM, GRU or RNN reads the channels as the input features of its W (a CRNN's
  or a speech model's conv front end);
* its **path ops** sit in between; their per-channel parameters (BN statistics, PRelu slopes,
  depthwise kernels) join each channel's identity.

The channel axis is axis 1 (N, C, *spatial), or the last axis where the producers are MatMuls on
inputs of rank 3 or more ((N, T, C): a transformer's feed-forward block, a channels-last MLP);
ops that treat axis 1 apart (pooling, BatchNormalization, Conv, Flatten) freeze such a space.

* a **Concat** on the channel axis places the space at an offset of its output, a **Split** or a
  **Slice** on it cuts the space into segments (merges stay inside one; sizes and bounds follow), a **Transpose**
  moves the channel axis (to the last axis for a MatMul, say), a **Reshape** that merges the channel
  axis with the axes after it makes each channel a block of features; past them the space may go
  through parameter-free elementwise ops, Squeeze/Unsqueeze and Gathers or Slices of other axes
  only, to its consumers.
* a **Reshape into attention heads** (..., C) → (..., h, C/h) of a value projection goes on through
  Transposes and the MatMul softmax(scores)·v to the Reshape that joins the heads again, and the
  output projection that reads it: each head keeps as many channels, merges stay inside one
  (a query's or key's channels, contracted in the scores, freeze).

Each op the flood follows is one :class:`Handler` in the registry (``HANDLERS``, filled by
:func:`register`): how a space passes through it (``through``), how it passes past a Concat,
Split, Slice or Transpose (``tail``: only parameter-free elementwise ops there), and, by hooks on the
space, how the op's attributes or constants change when channels are removed (Split sizes, Slice
bounds, Reshape targets, depthwise group counts). :func:`remove_channels` is the one write side
that every pass removing channels calls. Supporting a new op is one handler and its test.
Anything the registry does not know (graph outputs, grouped convs, …) freezes the space, with the
reason. Merging j into i with scale s is exact when every producer has
row_j = s·row_i, every path op has equal parameters for i and j, and either s = 1 or every path op is
positively homogeneous (f(s·x) = s·f(x) for s > 0).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .layers import (LINEAR_OPS, Layer, RecurrentInput, SharedLinear, find_layers, recurrent_inputs,
                     shared_linears, taken_names, unique_name)

# unary op → (positively homogeneous, maps 0 to 0)
UNARY = {
    "Relu": (True, True), "LeakyRelu": (True, True), "PRelu": (True, True), "Identity": (True, True),
    "Dropout": (True, True), "Clip": (False, None), "Sigmoid": (False, False), "HardSigmoid": (False, False),
    "HardSwish": (False, True), "Tanh": (False, True), "Elu": (False, True), "Selu": (False, True),
    "Softplus": (False, False), "Gelu": (False, True), "Erf": (False, True), "Mish": (False, True),
    "Abs": (False, True), "Neg": (False, True), "Sqrt": (False, True), "Exp": (False, False),
    "MaxPool": (True, True), "AveragePool": (True, True), "GlobalAveragePool": (True, True),
    "GlobalMaxPool": (True, True), "LpPool": (True, True), "Resize": (True, True), "Upsample": (True, True),
}
SPATIAL_REDUCE = ("ReduceMean", "ReduceMax", "ReduceSum")


@dataclass
class Consumer:
    """A linear layer reading space channels [lo, hi) as its input channels [lo + shift, hi + shift)
    of ``total`` (Concat: shift = offset; Split: the segment's own range)."""

    layer: Layer
    block: int  # input features per channel (1 for a conv; H·W after a Flatten)
    lo: int = 0
    hi: int | None = None  # None: the space's channel count
    shift: int = 0
    total: int | None = None  # None: the space's channel count
    axis: int = 1  # channel axis of the tensor it reads

    def span(self, channels: int) -> tuple[int, int, int, int]:
        """(lo, hi, shift, total) with the defaults resolved for a space of ``channels``."""
        hi = channels if self.hi is None else self.hi
        return self.lo, hi, self.shift, channels if self.total is None else self.total

    def columns(self, channels: int) -> np.ndarray:
        """(O, total, B) float64 view of the consumer's input weights, B = block × kernel."""
        return self.dense(self.layer.get_weight().astype(np.float64), self.span(channels)[3])

    def dense(self, w: np.ndarray, total: int) -> np.ndarray:
        """A weight in the view layout as (O, total, B): a grouped conv's (O, I/g, *k) is spread
        block-diagonally, output o of group G reading inputs [G·I/g, (G+1)·I/g)."""
        g = self.layer.group
        if g == 1:
            return w.reshape(w.shape[0], total, -1)
        o, per = w.shape[0], w.shape[1]
        out = np.zeros((o, total, int(np.prod(w.shape[2:]))), w.dtype)
        for group in range(g):
            rows = slice(group * (o // g), (group + 1) * (o // g))
            out[rows, group * per:(group + 1) * per] = w[rows].reshape(o // g, per, -1)
        return out

    def compact(self, w3: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
        """The inverse of :meth:`dense` for (O, C, B) whose blocks hold C/g columns each: the view
        layout (O, C/g, *kernel) (or (O, C·B/kernel, *kernel) ungrouped)."""
        g = self.layer.group
        if g == 1:
            return w3.reshape((w3.shape[0], -1) + kernel)
        o, per = w3.shape[0], w3.shape[1] // g
        return np.concatenate([w3[group * (o // g):(group + 1) * (o // g), group * per:(group + 1) * per]
                               for group in range(g)]).reshape((o, per) + kernel)


@dataclass
class ChannelParam:
    """A per-channel tensor on the path (BN statistics, PRelu slope, depthwise kernel, constant);
    past a Concat or Split, the space's channels [lo, hi) are its entries [lo + shift, hi + shift)."""

    tensor: gs.Constant
    axis: int  # its channel axis
    lo: int = 0
    hi: int | None = None  # None: the space's channel count
    shift: int = 0

    def rows(self, channels: int) -> np.ndarray:
        """(channels, D) float64: each channel's entries; a channel outside [lo, hi) gets zeros and
        a flag, so that it never takes the parameters of one inside."""
        v = np.moveaxis(self.tensor.values, self.axis, 0)
        hi = channels if self.hi is None else self.hi
        if (self.lo, hi, self.shift) == (0, channels, 0) and v.shape[0] == channels:
            return v.reshape(channels, -1).astype(np.float64)
        part = v[self.lo + self.shift:hi + self.shift].reshape(hi - self.lo, -1).astype(np.float64)
        out = np.zeros((channels, part.shape[1] + 1))
        out[self.lo:hi, :-1] = part
        out[self.lo:hi, -1] = 1.0
        return out

    def keep(self, keep: np.ndarray, channels: int) -> None:
        """Keep the entries of the kept channels ``keep`` (and every entry outside the span)."""
        hi = channels if self.hi is None else self.hi
        values = self.tensor.values
        inside = keep[(keep >= self.lo) & (keep < hi)] + self.shift
        index = np.concatenate([np.arange(self.lo + self.shift), inside,
                                np.arange(hi + self.shift, values.shape[self.axis])]).astype(int)
        self.tensor.values = np.take(values, index, axis=self.axis)


#: Called by :func:`remove_channels` with (kept channel indices, channels before): an op's
#: attributes or constants follow the new channel count.
Resize = Callable[[np.ndarray, int], None]


@dataclass
class Space:
    """One channel space (see the module docstring)."""

    channels: int
    producers: list[Layer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    params: list[ChannelParam] = field(default_factory=list)
    depthwise: list[gs.Node] = field(default_factory=list)  # depthwise convs on the path
    resizes: list[Resize] = field(default_factory=list)  # registered by the handlers
    segments: np.ndarray | None = None  # Split / Slice: segment of each channel (merges stay inside one)
    tensors: set[str] = field(default_factory=set)  # names of the tensors that carry it (before any Concat, …)
    concats: list[tuple[gs.Node, str]] = field(default_factory=list)  # (Concat, the input it entered by)
    homogeneous: bool = True
    zero_preserving: bool = True
    frozen: str | None = None
    last: bool = False  # channels on the last axis (MatMul producers on inputs of rank 3 or more)
    #: read or written by grouped convs of this many groups: channel c is in block c // (C / groups),
    #: merges stay inside a block, and every removal takes as many channels from each block
    groups: int = 1
    #: per shared weight among the consumers (id of its SharedLinear), the readers met reading the space
    reads: dict[int, set[int]] = field(default_factory=dict)

    def set_groups(self, groups: int, where: str, heads: bool = False) -> None:
        """Grouped convs (or an equal Split, or attention ``heads``) of ``groups`` blocks read or
        write the space; another block count, a Split into segments or (but for heads) channels on
        the last axis freeze it."""
        if groups == 1 or groups == self.groups:
            return
        if self.groups != 1 or self.channels % groups or self.segments is not None or self.last and not heads:
            self.freeze(f"{where}: groups that do not match the space's")
        self.groups = groups

    def blocks(self) -> np.ndarray:
        """Each channel's block (see :attr:`groups`)."""
        return np.arange(self.channels) // (self.channels // self.groups)

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.producers)

    def freeze(self, reason: str) -> None:
        if self.frozen is None:
            self.frozen = reason

    def axis(self, rank: int | None) -> int | None:
        """The channel axis of a tensor of the space of rank ``rank``."""
        return None if rank is None else rank - 1 if self.last else 1

    def producer_rows(self) -> np.ndarray:
        """(C, D) float64: every producer's [weight row, bias] side by side."""
        parts = []
        for p in self.producers:
            w = p.get_weight().astype(np.float64)
            parts += [w.reshape(w.shape[0], -1), p.get_bias().astype(np.float64)[:, None]]
        return np.concatenate(parts, axis=1)

    def producer_weights(self) -> np.ndarray:
        """(C, D) in the weights' dtype: every producer's weight row side by side, without biases."""
        return np.concatenate([p.get_weight().reshape(self.channels, -1) for p in self.producers], axis=1)

    def path_rows(self) -> np.ndarray:
        """(C, D) float64: the per-channel parameters on the path (must be equal to merge)."""
        parts = [p.rows(self.channels) for p in self.params]
        if self.segments is not None:
            parts.append(self.segments[:, None].astype(np.float64))
        if self.groups > 1:
            parts.append(self.blocks()[:, None].astype(np.float64))
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.channels, 0))

    def consumer_norms(self) -> np.ndarray:
        """(C,) the L2 norm of each channel's input weights over all consumers."""
        total = np.zeros(self.channels)
        for c in self.consumers:
            lo, hi, shift, width = c.span(self.channels)
            w3 = c.dense(c.layer.get_weight(), width)[:, lo + shift:hi + shift]  # in its own dtype: no float64 copy
            total[lo:hi] += np.einsum("otb,otb->t", w3, w3, dtype=np.float64)
        return np.sqrt(total)

    def pass_unary(self, op: str, node: gs.Node) -> None:
        """The space goes through a unary op: it stays homogeneous / zero-preserving only if the op is."""
        homogeneous, zero = UNARY[op]
        if op == "Clip":
            lo, hi = _clip_bounds(node)
            zero = lo <= 0 <= hi
        self.homogeneous &= homogeneous
        self.zero_preserving &= bool(zero)

    def pass_constant(self, op: str, node: gs.Node, const: gs.Constant) -> None:
        """The space goes through ``op`` with a constant: an offset or a division by the space breaks
        homogeneity, a non-zero offset breaks zero preservation."""
        if op in ("Add", "Sub") or (op == "Div" and node.inputs[1] is not const):
            self.homogeneous &= not np.any(const.values) and op != "Div"
            self.zero_preserving &= not np.any(const.values)


def remove_channels(space: Space, keep: np.ndarray, mixing: np.ndarray) -> None:
    """Remove every channel of ``space`` but ``keep`` (sorted indices), everywhere at once.

    Each consumer's input columns become ``W[:, kept] = Σ_c W[:, c] · mixing[c, kept]`` (a
    removed channel's contribution moved onto the kept ones: mixing row c holds how channel c is
    carried by them; a zero row drops it); producers keep their rows ``keep``, per-channel path
    parameters their entries ``keep``, and every op on the path follows the new count (the
    handlers' resize hooks)."""
    c = space.channels
    for consumer in space.consumers:
        lo, hi, shift, total = consumer.span(c)
        w = consumer.layer.get_weight()
        w3 = consumer.columns(c)
        cols = np.flatnonzero((keep >= lo) & (keep < hi))  # kept channels of this range (merges stay in it)
        merged = np.einsum("ocb,ck->okb", w3[:, lo + shift:hi + shift], mixing[lo:hi, cols], optimize=True)
        w3 = np.concatenate([w3[:, :lo + shift], merged, w3[:, hi + shift:]], axis=1)
        if consumer.layer.group > 1:  # balanced removals keep the blocks equal and diagonal
            consumer.layer.set_weight(consumer.compact(w3, w.shape[2:]))
        else:
            consumer.layer.set_weight(w3.reshape((w.shape[0], w3.shape[1] * consumer.block) + w.shape[2:]))
    for producer in space.producers:
        producer.set_weight(producer.get_weight()[keep])
        if producer.bias is not None and producer.bias.values.size == c:
            producer.bias.values = np.take(producer.bias.values, keep, axis=producer.bias.values.ndim - 1)
    for param in space.params:
        param.keep(keep, c)
    for resize in space.resizes:
        resize(keep, c)
    space.channels = len(keep)


def channel_spaces(graph: gs.Graph, shapes: dict[str, tuple[int, ...]],
                   exclude: re.Pattern | None = None) -> list[Space]:
    """Every channel space produced by a linear layer, frozen ones included (with the reason)."""
    all_layers, skipped = find_layers(graph, exclude)
    layers = [layer for layer in all_layers if not _is_depthwise(layer)]  # depthwise convs are path ops
    by_output = {layer.output.name: layer for layer in layers}
    walk = Walk({id(layer.node): layer for layer in all_layers}, {s.name: s.reason for s in skipped}, shapes,
                {t.name for t in graph.outputs}, {t.name for t in graph.inputs},
                {id(r.node): r for r in recurrent_inputs(graph, exclude)}, shared_linears(graph, exclude), graph)
    seen: set[str] = set()
    spaces = []
    for layer in layers:
        if layer.output.name in seen:
            continue
        space = Space(layer.out_channels, last=_channels_last(layer, walk))
        if layer.op == "MatMul" and walk.rank(layer.output) is None:
            space.freeze(f"MatMul '{layer.name}' output of unknown shape (which axis holds its channels?)")
        _flood(layer.output, space, seen, by_output, walk)
        for node, entered in space.concats:  # a second input of the space would be missed: not supported
            if any(t.name in space.tensors and t.name != entered for t in node.inputs):
                space.freeze(f"Concat '{node.name}' joins the space with itself")
        for consumer in space.consumers:  # a shared weight is rewritten for all its readers: all must read the space
            layer = consumer.layer
            if isinstance(layer, SharedLinear) and len(space.reads[id(layer)]) != len(layer.readers):
                space.freeze(f"{layer.op} weight '{layer.name}' shared with nodes that read other tensors")
        spaces.append(space)
    return spaces


@dataclass
class Walk:
    """What the handlers may read about the graph during one analysis."""

    by_node: dict[int, Layer]  # id(node) → its layer, depthwise convs included
    skipped: dict[str, str]  # node name → why find_layers left it alone
    shapes: dict[str, tuple[int, ...]]
    graph_outputs: set[str]
    graph_inputs: set[str]
    recurrent: dict[int, RecurrentInput]  # id(node) → its input weight, for the recurrent nodes whose X may change
    shared: dict[int, SharedLinear]  # id(node) → the weight it shares with other Gemm or Conv nodes
    graph: gs.Graph | None = None  # (for a hook that adds a node)

    def rank(self, tensor: gs.Tensor) -> int | None:
        return _rank(tensor, self.shapes)


def _flood(start: gs.Variable, space: Space, seen: set[str], by_output: dict, walk: Walk) -> None:
    stack = [start]
    visited_nodes: set[int] = set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        space.tensors.add(tensor.name)
        if tensor.name in walk.graph_outputs:
            space.freeze(f"reaches graph output '{tensor.name}'")
        if tensor.name in walk.graph_inputs:
            space.freeze(f"joins graph input '{tensor.name}'")
        layer = by_output.get(tensor.name)
        if layer is not None:
            if all(p is not layer for p in space.producers):
                space.producers.append(layer)
                if layer.out_channels != space.channels:
                    space.freeze("producers of different widths")
                space.set_groups(layer.group, f"produced by grouped {layer.op} '{layer.name}'")
                if _channels_last(layer, walk) != space.last and walk.rank(layer.output) != 2:
                    space.freeze("producers with their channels on different axes")
        elif tensor.inputs:
            node = tensor.inputs[0]
            if id(node) not in visited_nodes:
                visited_nodes.add(id(node))
                if node.op in LINEAR_OPS and id(node) not in walk.by_node:
                    space.freeze(f"produced by {node.op} '{node.name}', left alone: {walk.skipped.get(node.name, '')}")
                else:
                    stack.extend(_through(node, tensor, space, walk, backward=True))
        for node in tensor.outputs:
            if id(node) in visited_nodes:
                continue
            visited_nodes.add(id(node))
            stack.extend(_through(node, tensor, space, walk, backward=False))


def _through(node: gs.Node, tensor: gs.Tensor, space: Space, walk: Walk, backward: bool) -> list[gs.Tensor]:
    """Register ``node`` met on ``tensor`` and return the tensors it couples into the space."""
    layer = walk.by_node.get(id(node))
    if layer is not None and _is_depthwise(layer):
        return _depthwise(layer, space)
    if node.op in LINEAR_OPS and not backward:
        return _consumer(node, layer or walk.shared.get(id(node)), tensor, space, walk)
    handler = HANDLERS.get(node.op)
    if handler is None:
        space.freeze(f"passes through {node.op} '{node.name}'")
        return []
    return handler.through(node, tensor, space, walk, backward)


def _depthwise(layer: Layer, space: Space) -> list[gs.Tensor]:
    """A depthwise conv is a path op: its kernels and bias are per-channel parameters."""
    node = layer.node
    if layer.out_channels != space.channels or space.last:
        space.freeze(f"depthwise Conv '{node.name}' of another width or on channels last")
        return []
    space.depthwise.append(node)
    space.resizes.append(lambda keep, c: node.attrs.__setitem__("group", len(keep)))
    space.params.append(ChannelParam(layer.weight, 0))
    if layer.bias is not None:
        space.params.append(ChannelParam(layer.bias, 0))
        space.homogeneous &= not np.any(layer.bias.values)
        space.zero_preserving &= not np.any(layer.bias.values)
    return [layer.output, node.inputs[0]]


def _add_consumer(space: Space, consumer: Consumer, node: gs.Node) -> None:
    """Register ``consumer``, met at ``node``; a shared weight once, each of its readers reading
    the same channels in the same layout (else the space freezes)."""
    layer = consumer.layer
    if not isinstance(layer, SharedLinear):
        space.consumers.append(consumer)
        return
    first = next((c for c in space.consumers if c.layer is layer), None)
    if first is None:
        space.consumers.append(consumer)
    elif first != consumer:
        space.freeze(f"{layer.op} weight '{layer.name}' read by nodes that see the channels differently")
    space.reads.setdefault(id(layer), set()).add(id(node))


def _consumer(node: gs.Node, layer: Layer | None, tensor: gs.Tensor, space: Space, walk: Walk) -> list[gs.Tensor]:
    """A linear layer reading the space: its input columns follow the space's channels."""
    op, c = node.op, space.channels
    if layer is None:
        space.freeze(f"feeds {op} '{node.name}' which is left alone: {walk.skipped.get(node.name, 'not a layer')}")
        return []
    if node.inputs[0] is not tensor:
        space.freeze(f"feeds {op} '{node.name}' in a non-data input")
        return []
    w = layer.get_weight()
    rank = walk.rank(tensor)
    if layer.group != 1:
        if op not in ("Conv", "ConvTranspose") or w.shape[1] * layer.group != c or space.last:
            space.freeze(f"feeds grouped {op} '{node.name}'")
            return []
        space.set_groups(layer.group, f"feeds grouped {op} '{node.name}'")
        _add_consumer(space, Consumer(layer, 1), node)
        return []
    if op in ("Conv", "ConvTranspose") and w.shape[1] == c and not space.last:
        _add_consumer(space, Consumer(layer, 1), node)
        return []
    if op == "MatMul" and space.last and w.shape[1] == c and rank is not None:
        _add_consumer(space, Consumer(layer, 1, axis=rank - 1), node)
        return []
    if op in ("Gemm", "MatMul") and w.shape[1] % c == 0 and _features_axis_ok(layer, tensor, walk.shapes, c):
        _add_consumer(space, Consumer(layer, w.shape[1] // c), node)
        return []
    space.freeze(f"feeds {op} '{node.name}' with {w.shape[1]} inputs for {c} channels")
    return []


# ---------------------------------------------------------------------------------------------
# the handler registry


class Handler:
    """How a channel space passes through one kind of op. The defaults freeze the space."""

    def through(self, node: gs.Node, tensor: gs.Tensor, space: Space, walk: Walk, backward: bool) -> list[gs.Tensor]:
        """Register ``node`` met on ``tensor`` (coming from its output if ``backward``); return the
        tensors it couples into the space, or freeze the space with the reason."""
        space.freeze(f"passes through {node.op} '{node.name}'")
        return []

    def tail(self, node: gs.Node, tensor: gs.Tensor, span: _Span, space: Space, walk: Walk
             ) -> list[tuple] | None:
        """Past a Concat, Split, Slice or Transpose (the space's channels [span.lo, span.hi) on
        axis ``span.axis`` of ``tensor``, at offset ``span.shift`` of ``span.total``, ``span.block``
        features each): the (tensor, channel axis[, features per channel]) the space continues on,
        or None where it cannot go on."""
        return None


#: op type → its handler
HANDLERS: dict[str, Handler] = {}


def register(*ops: str):
    """Class decorator: an instance of the handler handles ``ops``."""

    def add(cls):
        for op in ops:
            HANDLERS[op] = cls()
        return cls

    return add


@register(*UNARY)
class _Unary(Handler):
    """Activations and pooling: channel-wise, so the space goes through unchanged."""

    def through(self, node, tensor, space, walk, backward):
        if space.last and node.op in ELEMENTWISE_ONLY:
            space.freeze(f"{node.op} '{node.name}' on a tensor with its channels last")
            return []
        if node.op in ("Resize", "Upsample") and not _resize_keeps_channels(node):
            space.freeze(f"{node.op} '{node.name}' that may resize the channel axis")
            return []
        if node.op == "PRelu":
            slope = node.inputs[1]
            if not isinstance(slope, gs.Constant):
                space.freeze(f"PRelu '{node.name}' with a non-constant slope")
                return []
            if not _add_param(space, slope, tensor, walk.shapes, f"PRelu '{node.name}'"):
                return []
        space.pass_unary(node.op, node)
        return [node.outputs[0], node.inputs[0]]

    def tail(self, node, tensor, span, space, walk):
        op, axis = node.op, span.axis
        if (axis != 1 and op in ELEMENTWISE_ONLY) or (op in ("Resize", "Upsample") and not _resize_keeps_channels(node)) \
                or (op == "PRelu" and not (isinstance(node.inputs[1], gs.Constant)
                                           and _add_tail_param(space, node.inputs[1], tensor, span, walk))):
            return None  # pooling moves values across the (now spatial) channel axis; a computed slope
        space.pass_unary(op, node)
        return [(node.outputs[0], axis)]


@register("Pad")
class _Pad(Handler):
    def through(self, node, tensor, space, walk, backward):
        if not _zero_pad(node) or _pads_channels(node) or space.last:
            space.freeze(f"Pad '{node.name}' that is not a spatial zero pad")
            return []
        return [node.outputs[0], node.inputs[0]]


@register("BatchNormalization")
class _BatchNorm(Handler):
    """Its four statistics are per-channel parameters (equal for channels that merge)."""

    def through(self, node, tensor, space, walk, backward):
        if not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]) or space.last:
            space.freeze(f"BatchNormalization '{node.name}' with non-constant parameters or on channels last")
            return []
        if any(len(t.outputs) > 1 for t in node.inputs[1:5]) or len({id(t) for t in node.inputs[1:5]}) < 4:
            space.freeze(f"BatchNormalization '{node.name}' with parameters shared with other nodes")
            return []
        space.params.extend(ChannelParam(t, 0) for t in node.inputs[1:5])
        space.homogeneous = False
        space.zero_preserving = False
        return [node.outputs[0], node.inputs[0]]

    def tail(self, node, tensor, span, space, walk):
        """After a Concat (a DenseNet layer's or a CSP block's norm) or a Split: the space's
        channels are entries [lo + shift, hi + shift) of its statistics."""
        params = node.inputs[1:5]
        if span.axis != 1 or span.block != 1 or node.inputs[0] is not tensor \
                or not all(isinstance(t, gs.Constant) for t in params) \
                or any(len(t.outputs) > 1 for t in params) or len({id(t) for t in params}) < 4 \
                or any(t.values.shape != (span.total,) for t in params):
            return None
        space.params.extend(ChannelParam(t, 0, span.lo, span.hi, span.shift) for t in params)
        space.homogeneous = False
        space.zero_preserving = False
        return [(node.outputs[0], span.axis)]


@register("InstanceNormalization")
class _InstanceNorm(Handler):
    """Each channel normalized over its own positions, then its scale and bias: per-channel
    parameters (equal for channels that merge); the normalization divides a multiple's factor away
    only up to its epsilon, so only equal channels merge exactly (not homogeneous)."""

    def through(self, node, tensor, space, walk, backward):
        params = node.inputs[1:3]
        if not all(isinstance(t, gs.Constant) for t in params) or space.last:
            space.freeze(f"InstanceNormalization '{node.name}' with non-constant parameters or on channels last")
            return []
        if any(len(t.outputs) > 1 for t in params) or params[0] is params[1]:
            space.freeze(f"InstanceNormalization '{node.name}' with parameters shared with other nodes")
            return []
        space.params.extend(ChannelParam(t, 0) for t in params)
        space.homogeneous = False
        space.zero_preserving = False
        return [node.outputs[0], node.inputs[0]]


@register("Mul", "Add", "Sub", "Div")
class _Arithmetic(Handler):
    """With a per-channel or scalar constant: a path parameter. Between two tensors of the space
    (a residual Add): both are coupled."""

    def through(self, node, tensor, space, walk, backward):
        op = node.op
        if len(node.inputs) != 2:
            return super().through(node, tensor, space, walk, backward)
        const = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if const:
            if not _add_param(space, const[0], tensor, walk.shapes, f"{op} '{node.name}'"):
                return []
            space.pass_constant(op, node, const[0])
            return [node.outputs[0], node.inputs[0] if node.inputs[1] is const[0] else node.inputs[1]]
        if op in ("Mul", "Div"):
            space.homogeneous = False
        return [node.outputs[0], *node.inputs]

    def tail(self, node, tensor, span, space, walk):
        const = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if len(node.inputs) != 2 or tensor not in node.inputs or not const \
                or not _add_tail_param(space, const[0], tensor, span, walk):
            return None
        space.pass_constant(node.op, node, const[0])
        return [(node.outputs[0], span.axis)]



@register(*SPATIAL_REDUCE)
class _SpatialReduce(Handler):
    def through(self, node, tensor, space, walk, backward):
        rank = walk.rank(tensor)
        if rank is None or not _reduces_none_of(node, rank, {0, space.axis(rank)}):
            return super().through(node, tensor, space, walk, backward)
        return [node.outputs[0], node.inputs[0]]

    def tail(self, node, tensor, span, space, walk):
        rank = walk.rank(tensor)
        if rank is None or node.inputs[0] is not tensor or not _reduces_none_of(node, rank, {0, span.axis}):
            return None
        gone = 0 if node.attrs.get("keepdims", 1) else sum(a % rank < span.axis for a in _listed_axes(node))
        return [(node.outputs[0], span.axis - gone)]


@register("Flatten", "Reshape")
class _ToFeatures(Handler):
    """(N, C, *spatial) → (N, C·B) feeding linear layers: channel c becomes the block of features
    [c·B, (c+1)·B); a constant Reshape target follows the new count. A Reshape to rank 3 or more
    that keeps the axes before the channels and the channels an axis of their own keeps the space
    ((N, C, H, W) → (N, C, H·W)); one that merges the channel axis with the axes after it,
    (N, C, H, W) → (N, C·H, W) say, or past a Transpose (W, N, C, H) → (W, N, C·H) (a CRNN's
    features per step), continues the space in blocks of features, to its consumers (:func:`_tail`)."""

    def through(self, node, tensor, space, walk, backward):
        if not backward and space.last and node.op == "Reshape" and _split_heads(node, tensor, space, walk):
            return []
        if backward or space.last:
            return super().through(node, tensor, space, walk, backward)
        out = walk.shapes.get(node.outputs[0].name)
        if node.op == "Reshape" and out is not None and len(out) > 2:
            span = _Span(1, 0, space.channels, 0, space.channels)
            nxt = self.tail(node, tensor, span, space, walk)
            if nxt is None:
                space.freeze(f"Reshape '{node.name}' that mixes the channels with other axes")
                return []
            (out_tensor, axis, block), = nxt
            if (axis, block) == (1, 1):  # the channels stay on axis 1: the space goes on as before
                return [out_tensor]
            _tail(out_tensor, dataclasses.replace(span, axis=axis, block=block), space, walk)
            return []
        return _to_features(node, tensor, space, walk.shapes)

    def tail(self, node, tensor, span, space, walk):
        if node.op != "Reshape" or node.inputs[0] is not tensor:
            return None
        shape_in, shape_out = walk.shapes.get(tensor.name), walk.shapes.get(node.outputs[0].name)
        a = span.axis
        if shape_in is None or shape_out is None or len(shape_out) <= a \
                or tuple(shape_out[:a]) != tuple(shape_in[:a]):
            return None
        merged = next((m for m in range(1, len(shape_in) - a + 1)  # the channels and the next m - 1 axes
                       if shape_out[a] == int(np.prod(shape_in[a:a + m]))
                       and int(np.prod(shape_out[a + 1:])) == int(np.prod(shape_in[a + m:]))), None)
        if merged is None:
            return None
        block = int(np.prod(shape_in[a + 1:a + merged]))
        features = span.total * span.block * block
        target = node.inputs[1]
        if isinstance(target, gs.Constant):
            values = np.atleast_1d(target.values)  # 0 copies the input's size there: the channels', unmerged
            if len(target.outputs) > 1 or values.size != len(shape_out) \
                    or values[a] not in (features, -1) + ((0,) if merged == 1 else ()):
                return None
            if values[a] == features:
                def resize(keep, c, target=target, per=span.block * block, total=span.total):
                    new = np.atleast_1d(target.values).copy()
                    new[a] = (total - (c - len(keep))) * per
                    target.values = new.reshape(target.values.shape)
                space.resizes.append(resize)
        elif not _from_shapes(target, space.tensors | {tensor.name}):
            return None
        return [(node.outputs[0], a, span.block * block)]


@register("Shape")
class _Shape(Handler):
    """Reads the shape only."""

    def through(self, node, tensor, space, walk, backward):
        return []

    def tail(self, node, tensor, span, space, walk):
        return []


@dataclass
class _Span:
    axis: int
    lo: int
    hi: int
    shift: int
    total: int
    block: int = 1  # features per channel on ``axis`` (a Reshape merged the channel axis with later ones)
    #: attention heads: the axis of the head, ``axis`` holding the channels within a head (see
    #: :func:`_split_heads`); None where the channels are one axis
    heads: int | None = None


class _Entry(Handler):
    """An op after which the space continues at an offset, in segments or on another axis: only
    parameter-free elementwise ops and linear consumers are followed there (:func:`_tail`)."""

    def through(self, node, tensor, space, walk, backward):
        if backward:
            return super().through(node, tensor, space, walk, backward)
        for out, span in self.entry(node, tensor, space, walk):
            _tail(out, span, space, walk)
        return []

    def entry(self, node, tensor, space, walk) -> list[tuple[gs.Tensor, _Span]]:
        raise NotImplementedError


@register("Concat")
class _Concat(_Entry):
    def entry(self, node, tensor, space, walk):
        axis = space.axis(walk.rank(tensor))
        if axis is None or _axis(node, tensor, walk, 1) != axis:
            space.freeze(f"Concat '{node.name}' not on the channel axis")
            return []
        widths = [walk.shapes.get(t.name) for t in node.inputs]
        out_shape = walk.shapes.get(node.outputs[0].name)
        if any(w is None for w in widths) or out_shape is None:
            space.freeze(f"Concat '{node.name}' with unknown input widths")
            return []
        offsets = np.cumsum([0] + [w[axis] for w in widths])
        space.concats.append((node, tensor.name))
        return [(node.outputs[0], _Span(axis, 0, space.channels, int(offsets[k]), int(out_shape[axis])))
                for k, t in enumerate(node.inputs) if t is tensor]


@register("Split")
class _Split(_Entry):
    def entry(self, node, tensor, space, walk):
        axis = space.axis(walk.rank(tensor))
        if axis is None or _axis(node, tensor, walk, 0) != axis:
            space.freeze(f"Split '{node.name}' not on the channel axis")
            return []
        sizes = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
        if sizes is not None:
            if not isinstance(sizes, gs.Constant) or len(sizes.outputs) > 1:
                space.freeze(f"Split '{node.name}' with computed or shared sizes")
                return []
            values = sizes.values.reshape(-1).tolist()
        elif "split" in node.attrs:
            values = list(node.attrs["split"])
        else:  # equal parts (a chunk): each keeps as many channels, as a grouped conv's blocks do
            n = len(node.outputs)
            if space.channels % n or space.segments is not None or space.groups not in (1, n):
                space.freeze(f"Split '{node.name}' into equal parts of another width, or a second Split")
                return []
            space.set_groups(n, f"Split '{node.name}'")
            values = [space.channels // n] * n
        equal = sizes is None and "split" not in node.attrs
        if space.segments is not None or space.groups > 1 and not equal or sum(values) != space.channels \
                or len(values) != len(node.outputs):
            space.freeze(f"Split '{node.name}' of another width, or a second Split")
            return []
        bounds = np.cumsum([0] + values)
        ranges = [(int(bounds[k]), int(bounds[k + 1])) for k in range(len(values))]
        space.segments = np.repeat(np.arange(len(values)), values)

        def resize(keep, c):
            counts = [int(np.sum((keep >= lo) & (keep < hi))) for lo, hi in ranges]
            if sizes is not None:
                sizes.values = np.asarray(counts, dtype=sizes.values.dtype).reshape(sizes.values.shape)
            else:
                node.attrs["split"] = counts

        if not equal:  # equal parts stay equal: the node needs no sizes
            space.resizes.append(resize)
        return [(out, _Span(axis, lo, hi, -lo, hi - lo)) for out, (lo, hi) in zip(node.outputs, ranges)]


@register("Transpose")
class _Transpose(_Entry):
    def entry(self, node, tensor, space, walk):
        rank = walk.rank(tensor)
        if rank is None:
            space.freeze(f"Transpose '{node.name}' of unknown rank")
            return []
        return [(node.outputs[0], _Span(_moved(node, rank, space.axis(rank)), 0, space.channels, 0, space.channels))]

    def tail(self, node, tensor, span, space, walk):
        rank = walk.rank(tensor)
        return None if rank is None else [(node.outputs[0], _moved(node, rank, span.axis))]


@register("Slice")
class _Slice(_Entry):
    def through(self, node, tensor, space, walk, backward):
        axes = _slice_axes(node, tensor, walk)
        if not backward and axes is not None and space.axis(walk.rank(tensor)) not in axes:
            return [node.outputs[0]]  # a spatial crop keeps the channels
        return super().through(node, tensor, space, walk, backward)

    def tail(self, node, tensor, span, space, walk):
        axes = _slice_axes(node, tensor, walk)  # another axis cut (a sequence reversed, cropped)
        if axes is None or span.axis in axes or node.inputs[0] is not tensor:
            return None
        return [(node.outputs[0], span.axis)]

    def entry(self, node, tensor, space, walk):
        axes = _slice_axes(node, tensor, walk)
        if axes is None:
            space.freeze(f"Slice '{node.name}' with computed bounds")
            return []
        axis = space.axis(walk.rank(tensor))
        k = axes.index(axis)
        starts, ends = node.inputs[1], node.inputs[2]
        steps = node.inputs[4] if len(node.inputs) > 4 and node.inputs[4].name else None
        if (steps is not None and int(np.atleast_1d(steps.values)[k]) != 1) or len(starts.outputs) > 1 \
                or len(ends.outputs) > 1 or space.segments is not None:
            space.freeze(f"Slice '{node.name}' with a step, shared bounds, or a second cut")
            return []
        c = space.channels
        lo, hi = (int(np.clip(v + c if v < 0 else v, 0, c)) for v in
                  (int(np.atleast_1d(starts.values)[k]), int(np.atleast_1d(ends.values)[k])))
        if hi <= lo:
            space.freeze(f"Slice '{node.name}' selects no channel")
            return []
        space.segments = ((np.arange(c) >= lo) & (np.arange(c) < hi)).astype(int)

        def resize(keep, channels):
            first = int(np.sum(keep < lo))
            for const, value in ((starts, first), (ends, first + int(np.sum((keep >= lo) & (keep < hi))))):
                values = np.atleast_1d(const.values).copy()
                values[k] = value
                const.values = values.reshape(const.values.shape).astype(const.values.dtype)

        space.resizes.append(resize)
        return [(node.outputs[0], _Span(axis, lo, hi, -lo, hi - lo))]


@register("Gather")
class _Gather(Handler):
    """Constant indices on an axis other than the batch's and the channels' (one step of a
    sequence, x[:, :, -1]): the channels stay, on the axis that a scalar index may have moved."""

    def through(self, node, tensor, space, walk, backward):
        rank, rank_out = walk.rank(tensor), walk.rank(node.outputs[0])
        axis = None if backward or rank is None else _gathered_axis(node, tensor, rank, space.axis(rank))
        if axis is None or axis != space.axis(rank_out) or int(node.attrs.get("axis", 0)) % rank == 0:
            return super().through(node, tensor, space, walk, backward)
        return [node.outputs[0]]

    def tail(self, node, tensor, span, space, walk):
        rank = walk.rank(tensor)
        axis = None if rank is None else _gathered_axis(node, tensor, rank, span.axis)
        return None if axis is None else [(node.outputs[0], axis)]


def _gathered_axis(node: gs.Node, tensor: gs.Tensor, rank: int, axis: int) -> int | None:
    """Where a Gather of ``tensor`` by constant indices on another axis puts ``axis``; None if it
    gathers on ``axis`` itself, reads ``tensor`` as indices, or the indices are computed."""
    indices = node.inputs[1]
    g = int(node.attrs.get("axis", 0)) % rank
    if node.inputs[0] is not tensor or not isinstance(indices, gs.Constant) or g == axis:
        return None
    return axis if g > axis else axis - 1 + np.ndim(indices.values)


@register("Squeeze", "Unsqueeze")
class _Squeeze(Handler):
    """Axes of size 1 removed or added, neither the batch's nor the channels': the channels stay
    (on axis 1, or last), as after a global pooling squeezed to (N, C)."""

    def through(self, node, tensor, space, walk, backward):
        rank_in, rank_out = walk.rank(node.inputs[0]), walk.rank(node.outputs[0])
        axis = None if rank_in is None else _squeezed_axis(node, rank_in, space.axis(rank_in))
        if axis is None or axis != space.axis(rank_out) or 0 in _squeeze_axes(node, rank_in):
            return super().through(node, tensor, space, walk, backward)
        return [node.outputs[0], node.inputs[0]]

    def tail(self, node, tensor, span, space, walk):
        rank = walk.rank(tensor)
        axis = None if rank is None else _squeezed_axis(node, rank, span.axis)
        return None if axis is None else [(node.outputs[0], axis)]


def _squeeze_axes(node: gs.Node, rank_in: int) -> list[int] | None:
    """A Squeeze's axes (of its input) or an Unsqueeze's (of its output), non-negative; None where
    computed, or a Squeeze without axes (every axis of size 1, maybe the channels')."""
    axes = _listed_axes(node)
    if axes is None:
        return None
    rank = rank_in if node.op == "Squeeze" else rank_in + len(axes)
    return sorted(a % rank for a in axes)


def _squeezed_axis(node: gs.Node, rank_in: int, axis: int) -> int | None:
    """Where a Squeeze or Unsqueeze of a rank-``rank_in`` tensor puts ``axis``; None where it
    squeezes that axis or its axes are unknown."""
    axes = _squeeze_axes(node, rank_in)
    if axes is None or node.op == "Squeeze" and axis in axes:
        return None
    if node.op == "Squeeze":
        return axis - sum(a < axis for a in axes)
    for a in axes:  # output positions, ascending: each one at or before the channels moves them on
        axis += a <= axis
    return axis


def _from_shapes(target: gs.Tensor, carriers: set[str], depth: int = 12) -> bool:
    """A computed Reshape shape that reads its sizes off the shapes of tensors that carry the space
    (``carriers``: Shape → Gather → Mul → Unsqueeze → Concat, with -1 as the only literal size): it
    follows a new channel count."""
    node = target.inputs[0] if target.inputs else None
    if node is None or depth == 0:
        return False
    if node.op == "Shape":
        return node.inputs[0].name in carriers
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Gather", "Slice"):  # their other inputs: indices, axes
        return _from_shapes(node.inputs[0], carriers, depth - 1)
    if node.op in ("Mul", "Concat"):
        return all(_from_shapes(t, carriers, depth - 1) if not isinstance(t, gs.Constant)
                   else node.op == "Concat" and np.all(t.values == -1) for t in node.inputs)
    return False


def _moved(node: gs.Node, rank: int, axis: int) -> int:
    """Where a Transpose puts ``axis``."""
    return list(node.attrs.get("perm", range(rank - 1, -1, -1))).index(axis)


def _axis(node: gs.Node, tensor: gs.Tensor, walk: Walk, default: int) -> int | None:
    rank = walk.rank(tensor)
    axis = node.attrs.get("axis", default)
    return None if rank is None else axis % rank


def _slice_axes(node, tensor, walk: Walk) -> list[int] | None:
    """The axes a Slice (opset 10+, constant inputs) cuts, or None."""
    rank = walk.rank(tensor)
    inputs = [t for t in node.inputs[1:]]
    if rank is None or len(inputs) < 2 or not all(isinstance(t, gs.Constant) for t in inputs if t.name):
        return None
    axes = inputs[2].values if len(inputs) > 2 and inputs[2].name else np.arange(inputs[0].values.size)
    return [int(a) % rank for a in np.atleast_1d(axes)]


ELEMENTWISE_ONLY = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample"}


def _tail(start: gs.Variable, span: _Span, space: Space, walk: Walk) -> None:
    """Follow a space past a Concat/Split/Slice/Transpose: the handlers' ``tail`` rules (parameter-free
    elementwise ops, Transposes), and the linear layers that consume it; anything else freezes."""
    stack = [(start, span.axis, span.block, span.heads)]
    while stack and space.frozen is None:
        tensor, axis, block, heads = stack.pop()
        span = dataclasses.replace(span, axis=axis, block=block, heads=heads)
        if tensor.name in walk.graph_outputs:
            space.freeze(f"reaches graph output '{tensor.name}'")
            return
        rank = walk.rank(tensor)
        for node in tensor.outputs:
            if heads is not None:  # the channels span two axes: only the attention ops follow them
                nxt = _heads_tail(node, tensor, span, space, walk)
                if nxt is None:
                    space.freeze(f"split into attention heads, reaches {node.op} '{node.name}' (only the value "
                                 "path, through a softmax's MatMul, is followed)")
                    return
                stack.extend(nxt)
                continue
            # a layer; an LSTM, GRU or RNN reading X (seq, batch, features); a Gemm or Conv sharing its weight
            layer = walk.by_node.get(id(node)) or walk.recurrent.get(id(node)) or walk.shared.get(id(node))
            if node.op in ("Conv", "Gemm", "MatMul", "LSTM", "GRU", "RNN") and layer is not None \
                    and node.inputs[0] is tensor and layer.group == 1 and rank is not None \
                    and layer.get_weight().shape[1] == span.total * span.block \
                    and axis == (1 if node.op == "Conv" else rank - 1) and not layer.node.attrs.get("transA", 0) \
                    and not _is_depthwise(layer):
                _add_consumer(space, Consumer(layer, span.block, span.lo, span.hi, span.shift, span.total, axis), node)
                continue
            handler = HANDLERS.get(node.op)
            nxt = handler.tail(node, tensor, span, space, walk) if handler is not None else None
            if nxt is None:
                why = f": {walk.skipped[node.name]}" if node.name in walk.skipped else ""
                space.freeze(f"past a Concat/Split/Transpose, reaches {node.op} '{node.name}'{why}")
                return
            stack.extend((*entry, None) if len(entry) == 3 else (*entry, block, None) for entry in nxt)


def _split_heads(node: gs.Node, tensor: gs.Tensor, space: Space, walk: Walk) -> bool:
    """A Reshape of a channels-last space (..., C) into attention heads (..., h, C/h) whose target
    holds h and C/h (one of them may be -1) as entries :func:`_target_entry` reads: the channels
    go on in h blocks of C/h (each head keeps as many, merges stay inside one: :attr:`Space.groups`),
    on two axes, to the attention's value MatMul and back (:func:`_heads_tail`). The per-head size
    follows a new count."""
    shape_in, shape_out = walk.shapes.get(tensor.name), walk.shapes.get(node.outputs[0].name)
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) + 1 or node.inputs[0] is not tensor \
            or tuple(shape_out[:-2]) != tuple(shape_in[:-1]) or shape_out[-2] * shape_out[-1] != space.channels:
        return False
    rank = len(shape_out)
    (h, _), (d, set_d) = _target_entry(node, rank - 2, walk), _target_entry(node, rank - 1, walk)
    if h not in (shape_out[-2], -1) or d not in (shape_out[-1], -1) or h == d == -1:
        return False
    heads = int(shape_out[-2])
    space.set_groups(heads, f"Reshape '{node.name}' into {heads} attention heads", heads=True)
    if d != -1:
        space.resizes.append(lambda keep, c: set_d(len(keep) // heads))
    _tail(node.outputs[0], _Span(len(shape_out) - 1, 0, space.channels, 0, space.channels, heads=len(shape_out) - 2),
          space, walk)
    return True


def _heads_tail(node: gs.Node, tensor: gs.Tensor, span: _Span, space: Space, walk: Walk) -> list[tuple] | None:
    """Where the channels split into heads (:func:`_split_heads`) go next: a Transpose moves both
    axes; the value MatMul softmax(scores) · v keeps them, per head (an output channel is a convex
    combination of that channel of v: a constant channel stays that constant, a merge holds); a
    Reshape that joins the head axis with the channels within it, (..., h, d) → (..., h·d), ends
    the split. Anything else: None."""
    if node.op == "Shape":  # reads the shape only (the batch and length for a target: its literals are checked)
        return []
    rank = walk.rank(tensor)
    if rank is None:
        return None
    if node.op == "Transpose":
        return [(node.outputs[0], _moved(node, rank, span.axis), 1, _moved(node, rank, span.heads))]
    if node.op == "MatMul" and node.inputs[1] is tensor and node.inputs[0] is not tensor \
            and span.axis == rank - 1 and span.heads < rank - 2 and walk.rank(node.outputs[0]) == rank \
            and _softmax_rows(node.inputs[0], walk):
        return [(node.outputs[0], span.axis, 1, span.heads)]
    if node.op == "Reshape" and node.inputs[0] is tensor and span.heads == span.axis - 1:
        shape_in, shape_out = walk.shapes.get(tensor.name), walk.shapes.get(node.outputs[0].name)
        h = span.heads
        joined = None if shape_in is None else tuple(shape_in[:h]) + (shape_in[h] * shape_in[h + 1],) + tuple(
            shape_in[h + 2:])
        if shape_out is None or tuple(shape_out) != joined:
            return None
        size, set_size = _target_entry(node, h, walk)
        if size not in (joined[h], -1):
            return None
        if size != -1:
            space.resizes.append(lambda keep, c: set_size(len(keep)))
        return [(node.outputs[0], h, 1, None)]
    return None


def _softmax_rows(scores: gs.Tensor, walk: Walk) -> bool:
    """Whether ``scores`` is a Softmax over its last axis (rows that sum to 1; before opset 13 the
    axis defaults to 1 and the axes from it are normalized together)."""
    node = scores.inputs[0] if scores.inputs else None
    rank = walk.rank(scores)
    default = -1 if walk.graph is None or (walk.graph.opset or 13) >= 13 else 1
    return node is not None and node.op == "Softmax" and rank is not None \
        and int(node.attrs.get("axis", default)) % rank == rank - 1


def _target_entry(node: gs.Node, position: int, walk: Walk) -> tuple[int | None, Callable[[int], None] | None]:
    """Entry ``position`` of a Reshape's target, and a function that sets it to a literal: in a
    constant target, or in a Concat of 1-D pieces (as torch exports ``x.view(n, t, h, d)`` with dynamic
    n and t), a constant piece or a computed one of one entry (``x.size(2)``: its value is the
    Reshape's output size there; the entries this is used for are fixed by the weights, so a
    literal holds on every input). Set on copies: the target, or the Concat, may be read by other
    Reshapes (the query's and key's). (None, None) where the target is unknown."""
    target, shape_out = node.inputs[1], walk.shapes.get(node.outputs[0].name)
    if walk.graph is None or shape_out is None:
        return None, None
    rank = len(shape_out)

    if isinstance(target, gs.Constant):
        values = np.atleast_1d(target.values)
        if values.size != rank:
            return None, None

        def set_constant(size: int) -> None:
            new = np.atleast_1d(node.inputs[1].values).copy()
            new[position] = size
            name = unique_name(f"{target.name}_resized", taken_names(walk.graph))
            node.inputs[1] = gs.Constant(name, new.reshape(target.values.shape))

        return int(values[position]), set_constant
    concat = target.inputs[0] if len(target.inputs) == 1 else None
    if concat is None or concat.op != "Concat" or int(concat.attrs.get("axis", 0)) != 0:
        return None, None
    start = 0
    for k, piece in enumerate(concat.inputs):
        length = np.atleast_1d(piece.values).size if isinstance(piece, gs.Constant) else \
            (walk.shapes.get(piece.name) or (None,))[0]
        if length is None:
            return None, None
        if start <= position < start + length:
            break
        start += length
    else:
        return None, None
    if start + length > rank or not isinstance(piece, gs.Constant) and length != 1:
        return None, None
    literal = np.atleast_1d(piece.values) if isinstance(piece, gs.Constant) else np.array([shape_out[position]])

    def set_piece(size: int) -> None:
        names = taken_names(walk.graph)
        values = literal.astype(np.int64)
        values[position - start] = size
        inputs = list(concat.inputs)
        inputs[k] = gs.Constant(unique_name(f"{piece.name}_resized", names), values)
        out = gs.Variable(unique_name(f"{target.name}_resized", names), dtype=target.dtype, shape=target.shape)
        walk.graph.nodes.insert(walk.graph.nodes.index(node), gs.Node(
            "Concat", unique_name(f"{concat.name or 'Concat'}_resized", names), dict(concat.attrs), inputs, [out]))
        node.inputs[1] = out  # the first Concat, where nothing else reads it, is left for cleanup

    return int(literal[position - start]), set_piece


def _channels_last(layer: Layer, walk: Walk) -> bool:
    """A MatMul (x·B) writes its channels on the last axis; on inputs of rank 3 or more that is not axis 1."""
    return layer.op == "MatMul" and (walk.rank(layer.output) or 2) > 2


def _is_depthwise(layer: Layer) -> bool:
    """A Conv with one input channel per group and one output channel per input channel."""
    w = layer.weight.values
    return layer.op == "Conv" and layer.group > 1 and layer.group == w.shape[0] and w.shape[1] == 1


def _features_axis_ok(layer: Layer, tensor: gs.Tensor, shapes: dict, channels: int) -> bool:
    shape = shapes.get(tensor.name)
    if layer.op == "Gemm":
        return not layer.node.attrs.get("transA", 0) and shape is not None and len(shape) == 2
    return shape is not None and len(shape) == 2  # MatMul over the last axis of a 2-D tensor


def _to_features(node: gs.Node, tensor: gs.Tensor, space: Space, shapes: dict) -> list[gs.Tensor]:
    """A Flatten/Reshape of (N, C, *spatial) to (N, C·B) feeding linear layers: channel c → block c."""
    shape_in = shapes.get(tensor.name)
    out = node.outputs[0]
    shape_out = shapes.get(out.name)
    if shape_in is None or shape_out is None or len(shape_out) != 2 or shape_out[0] != shape_in[0] \
            or shape_in[1] != space.channels:
        space.freeze(f"{node.op} '{node.name}' that does not flatten channels into features")
        return []
    if node.op == "Flatten" and node.attrs.get("axis", 1) != 1:
        space.freeze(f"Flatten '{node.name}' on axis {node.attrs.get('axis')}")
        return []
    block = int(np.prod(shape_in[2:]))
    if node.op == "Reshape":
        target = node.inputs[1]
        if isinstance(target, gs.Constant):
            if len(target.outputs) > 1:
                space.freeze(f"Reshape '{node.name}' shape constant shared with other nodes")
                return []
            space.resizes.append(lambda keep, c: _resize_target(target, c * block, len(keep) * block))
        elif not _adapts_to_channels(target, space.channels * block):
            space.freeze(f"Reshape '{node.name}' with a computed shape that may fix the feature count")
            return []
    for consumer in out.outputs:
        if consumer.op not in ("Gemm", "MatMul"):
            space.freeze(f"flattened features feed {consumer.op} '{consumer.name}'")
            return []
    return [out]


def _resize_target(target: gs.Constant, before: int, after: int) -> None:
    values = target.values.copy()
    values[values == before] = after
    target.values = values


def _adapts_to_channels(target: gs.Tensor, features: int) -> bool:
    """A computed Reshape shape like Concat(Shape(x)[:1], [-1]): it follows a new channel count."""
    producer = target.inputs[0] if target.inputs else None
    if producer is None or producer.op != "Concat":
        return False
    consts = [t.values for t in producer.inputs if isinstance(t, gs.Constant)]
    return any(np.any(v == -1) for v in consts) and not any(np.any(v == features) for v in consts)


def _rank(tensor: gs.Tensor, shapes: dict) -> int | None:
    shape = shapes.get(tensor.name)
    return len(shape) if shape is not None else None


def _add_param(space: Space, const: gs.Constant, tensor: gs.Tensor, shapes: dict, where: str) -> bool:
    """Register a constant broadcast against ``tensor`` as a per-channel parameter (a scalar needs
    nothing); freeze the space if it varies along another axis or is shared with other nodes."""
    values = const.values
    if values.size == 1:
        return True
    rank = _rank(tensor, shapes)
    axis = _channel_axis(values.shape, space.channels, rank, space.axis(rank))
    if axis is None:
        space.freeze(f"{where}: constant of shape {values.shape} is not one value per channel")
        return False
    if len(const.outputs) > 1:
        space.freeze(f"{where}: per-channel constant '{const.name}' is shared with other nodes")
        return False
    space.params.append(ChannelParam(const, axis))
    return True


def _add_tail_param(space: Space, const: gs.Constant, tensor: gs.Tensor, span: _Span, walk: Walk) -> bool:
    """Past a Concat or Split: a scalar needs nothing; a constant with one value per channel of the
    tensor (``span.total``, on ``span.axis``), not shared, is a parameter of the space's entries."""
    if const.values.size == 1:
        return True
    if span.block != 1:
        return False
    axis = _channel_axis(const.values.shape, span.total, walk.rank(tensor), span.axis)
    if axis is None or len(const.outputs) > 1:
        return False
    space.params.append(ChannelParam(const, axis, span.lo, span.hi, span.shift))
    return True


def _channel_axis(shape: tuple[int, ...], channels: int, rank: int | None, axis: int | None = 1) -> int | None:
    """The axis of a constant that broadcasts along ``axis`` of a rank-``rank`` tensor, or None."""
    if rank is None or axis is None or len(shape) > rank or rank < 2:
        return None
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    if padded[axis] != channels or any(d != 1 for i, d in enumerate(padded) if i != axis):
        return None
    return axis - (rank - len(shape))


def _resize_keeps_channels(node: gs.Node) -> bool:
    """Resize/Upsample by constant scales that are 1 on the batch and channel axes, no sizes."""
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
        return False
    scales = node.inputs[2] if node.op == "Resize" and len(node.inputs) > 2 else \
        (node.inputs[1] if len(node.inputs) > 1 else None)
    if scales is None or not scales.name:
        return node.op == "Upsample" and list(node.attrs.get("scales", [1, 1]))[:2] == [1, 1]
    return isinstance(scales, gs.Constant) and scales.values.size >= 2 and np.all(scales.values[:2] == 1)


def _clip_bounds(node: gs.Node) -> tuple[float, float]:
    lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        lo = float(node.inputs[1].values)
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        hi = float(node.inputs[2].values)
    return lo, hi


def _zero_pad(node: gs.Node) -> bool:
    if node.attrs.get("mode", "constant") not in ("constant", b"constant"):
        return True  # reflect / edge: linear per channel
    value = node.inputs[2] if len(node.inputs) > 2 else None
    return value is None or value.name == "" or (isinstance(value, gs.Constant) and not np.any(value.values)) \
        or node.attrs.get("value", 0.0) == 0.0 and value is None


def _pads_channels(node: gs.Node) -> bool:
    pads = node.inputs[1].values if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) \
        else np.asarray(node.attrs.get("pads", []))
    if len(node.inputs) > 1 and not isinstance(node.inputs[1], gs.Constant):
        return True
    rank = len(pads) // 2
    return rank > 1 and (pads[1] != 0 or pads[rank + 1] != 0)


def _listed_axes(node: gs.Node) -> list[int] | None:
    """A Reduce*'s, Squeeze's or Unsqueeze's axes (attribute, or constant input); None where
    computed or absent."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = node.inputs[1].values
    return None if axes is None else np.atleast_1d(axes).astype(int).tolist()


def _reduces_none_of(node: gs.Node, rank: int, kept: set[int]) -> bool:
    """Whether a Reduce* node on a tensor of ``rank`` leaves the axes ``kept`` (batch, channels) alone:
    its axes are known and miss them (with or without kept dims, the channels stay on axis 1, or
    on the last axis)."""
    axes = _listed_axes(node)
    if axes is None:
        return False
    if not axes:  # every axis, unless noop_with_empty_axes
        return node.attrs.get("noop_with_empty_axes", 0) == 1
    return not {a % rank for a in axes} & kept
