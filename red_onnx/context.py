"""What the pipeline hands to every pass, and what every pass hands back."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx_graphsurgeon as gs


@dataclass
class PassResult:
    """A pass's own account of what it changed: the report is built from these, not from diffs."""

    name: str
    modified: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer rows: {"name": ..., ...}
    seconds: float = 0.0


@dataclass
class Context:
    """The model being rewritten and everything a pass may need; passes build no sessions of their own."""

    graph: gs.Graph
    template: Any  # the input onnx.ModelProto: model-level fields for exporting the graph
    shapes: dict[str, tuple[int, ...]]  # static tensor shapes of the input model (batch 1)
    tolerance: float = 0.0
    exclude: re.Pattern | None = None
    budget: Any = None  # budget.Budget, for lossy passes
    keep_dense: frozenset[str] = frozenset()  # convs the latency guard keeps as they are
    latency_check: bool = True  # optimise rewrites for onnxruntime CPU latency (guard on)
    # weight → per-channel factor folded in (fold), or (scales, codebook) of its hashed values (hash)
    scale_hints: dict[str, Any] = field(default_factory=dict)
    codebook: str = "uint8"  # codebook index types allowed: "uint8", "auto" (also uint16) or "off"
    log: Callable[[str], None] = lambda message: None
