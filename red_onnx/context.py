"""What the pipeline hands to every pass (:class:`Context`), and what every pass hands back
(:class:`PassResult`, with a :class:`LeftAlone` record for everything it did not rewrite)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .defaults import PASS_NAMES

if TYPE_CHECKING:
    from .budget import Budget, Candidate, Spent

#: A long loop (inside a pass, or the budget's search) says where it is at most this often.
PROGRESS_SECONDS = 5.0


@dataclass
class Progress:
    """A log for long loops: passes a message on at most every PROGRESS_SECONDS."""

    log: Callable[[str], None] = lambda message: None
    last: float = field(default_factory=time.perf_counter)

    shown: bool = False  # whether the log reaches a person (progress bars on a terminal)

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        if now - self.last > PROGRESS_SECONDS:
            self.last = now
            self.log(message)

    def bar(self, total: int, what: str):
        """A progress bar with the time left (tqdm) where the log is shown and stderr is a
        terminal; else a bar that shows nothing. Use as a context manager; ``update(n)``."""
        import sys

        from tqdm import tqdm

        disable = not (self.shown and sys.stderr.isatty())
        return tqdm(total=total, desc=what, leave=False, file=sys.stderr, disable=disable, dynamic_ncols=True)


@dataclass(frozen=True)
class LeftAlone:
    """A node, layer or channel space a pass did not rewrite, and why (one line, for people)."""

    name: str
    reason: str
    pass_name: str = ""


@dataclass
class PassResult:
    """A pass's own account of what it changed: the report is built from these, not from diffs."""

    name: str
    modified: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer rows: {"name": ..., ...}
    left_alone: list[LeftAlone] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)  # names of the layers whose nodes it replaced
    seconds: float = 0.0

    def leave(self, name: str, reason: str) -> None:
        self.left_alone.append(LeftAlone(name, reason, self.name))


@dataclass
class Context:
    """One build's model and everything a pass may need.

    Each build gets its own Context: ``graph`` and ``shapes`` are this build's to change (a pass
    that changes channel counts refreshes ``shapes``); the input model's analysis is never shared
    mutably. Passes may build onnxruntime sessions on the current graph (the budget and the
    merge pass's activation statistics do), never on files."""

    graph: gs.Graph
    template: onnx.ModelProto  # the input model without weights: model-level fields for exporting the graph
    shapes: dict[str, tuple[int, ...]]  # static tensor shapes (batch 1) of this build's current graph
    budget: Budget | None = None  # None: exact rewrites only
    exclude: re.Pattern | None = None
    keep_dense: frozenset[str] = frozenset()  # convs the latency guard keeps as they are
    # channel counts the latency guard wants: kept counts a multiple of this (0: remove no channel)
    channel_align: int = 1
    # the share of the squared target the channel removals (merge, prune) may spend, the rest left
    # to the passes after them (see pipeline.build_best)
    removal_share: float = 1.0
    passes: frozenset[str] = frozenset(PASS_NAMES)  # the passes selected
    latency_check: bool = True  # optimise rewrites for onnxruntime CPU latency (guard on)
    codebook: str = "uint8"  # codebook index types allowed: "uint8", "auto" (also uint16) or "off"
    # weight → the per-channel factor fold multiplied into it (W' = W · s exactly)
    fold_scales: dict[str, np.ndarray] = field(default_factory=dict)
    # weight → (per-channel scales, codebook) of the values hash gave it: W' = fl(codebook[i] · scale)
    hashed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    log: Callable[[str], None] = lambda message: None
    progress_log: Progress = field(default_factory=Progress)
    # what passes computed from weights, kept for the later builds of this call (other tolerances,
    # back-offs, the exact re-runs), keyed by a digest of the values it was computed from
    memo: dict[str, Any] = field(default_factory=dict)

    def memoized(self, what: str, values: list[np.ndarray], compute: Callable[[], Any]) -> Any:
        """``compute()``, or what it returned in an earlier build for the same ``values``."""
        from .profile import digest

        key = what + " " + "".join(digest(np.asarray(v)) for v in values)
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def progress(self, what: str, done: int, total: int) -> None:
        """Say how far a long loop is (at most every PROGRESS_SECONDS)."""
        self.progress_log(f"  {what}: {done} of {total}")

    @property
    def lossy(self) -> bool:
        """Whether lossy edits may be proposed (a budget is given)."""
        return self.budget is not None

    def exact(self) -> Context:
        """The same build with lossy edits off (the exact re-runs after hashing)."""
        from dataclasses import replace

        return replace(self, budget=None)

    def spend(self, candidates: list[Candidate], materialize: Callable[[list[Candidate]], dict[str, np.ndarray]],
              per_level: bool = False, share: float = 1.0) -> Spent:
        """Let the budget choose among ``candidates`` on the current graph, then write the accepted
        edits' weights (``materialize``: initializer name → new values) into the graph; ``share``:
        of the squared target, the most this spend may reach."""
        from .model_io import snapshot

        model, arrays = snapshot(self.graph, self.template)
        target = self.budget.target
        self.budget.target = target * share ** 0.5
        try:
            spent = self.budget.spend(model, candidates, materialize, arrays, per_level=per_level)
        finally:
            self.budget.target = target
        tensors = self.graph.tensors()
        for name, values in materialize(spent.accepted).items():
            tensors[name].values = np.array(values)  # the graph's own copy: proposals may be kept (memo)
        return spent
