"""The passes, and the one schedule the pipeline runs them in.

A pass is a module with ``NAME`` and ``run(ctx: Context) -> PassResult``: it rewrites
``ctx.graph`` in place, spends ``ctx.budget`` on lossy edits if it has any (``ctx.lossy``), and
returns what it changed, with a :class:`~red_onnx.context.LeftAlone` record (``result.leave(name,
reason)``) for everything it did not rewrite and why. To add one: write ``passes/<name>.py`` and
its test, and add a :class:`Step` to ``SCHEDULE`` (``tests/test_toy_pass.py`` is a worked example).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Iterable

from ..context import Context, PassResult
from . import codebook, fold, hash, merge, prune, separate


@dataclass(frozen=True)
class Step:
    """One entry of the schedule: ``module.run`` under the name the report gives it."""

    name: str
    module: ModuleType
    selected_by: str | None = None  # the ``--passes`` name that turns it on; None: always runs
    after: str | None = None  # also needs this ``--passes`` name (the exact re-runs after hashing)
    exact: bool = False  # runs without the budget, whatever the tolerance

    def wanted(self, names: Iterable[str]) -> bool:
        names = set(names)
        return (self.selected_by is None or self.selected_by in names) and (self.after is None or self.after in names)

    def run(self, ctx: Context) -> PassResult:
        result = self.module.run(ctx.exact() if self.exact else ctx)
        result.name = self.name
        return result


#: The pipeline's order. Canonicalization first; the MAC-saving passes spend the budget before
#: hashing (latency first, then size; merge offers the prunes too when both are selected, in one
#: sequence per channel space); after hashing, the exact merge and separation rules run
#: again on the hashed weights; codebook storage last (it turns weights into computed tensors).
SCHEDULE: tuple[Step, ...] = (
    Step("fold", fold),
    Step("merge", merge, "merge"),
    Step("prune", prune, "prune"),
    Step("separate", separate, "separate"),
    Step("hash", hash, "hash"),
    Step("merge_after_hash", merge, "merge", after="hash", exact=True),
    Step("separate_after_hash", separate, "separate", after="hash", exact=True),
    Step("codebook", codebook),
)

#: The passes ``--passes`` selects, in schedule order (canonicalization and storage always run).
PLANNED = tuple(dict.fromkeys(s.selected_by for s in SCHEDULE if s.selected_by))

#: The selectable passes, by name.
AVAILABLE: dict[str, ModuleType] = {s.selected_by: s.module for s in SCHEDULE if s.selected_by and not s.exact}

__all__ = ["Step", "SCHEDULE", "PLANNED", "AVAILABLE", "codebook", "fold", "hash", "merge", "prune", "separate"]
