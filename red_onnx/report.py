"""What a run did, per pass and per layer: the before/after table and the JSON report."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Report:
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    output_deviation: float | None = None  # on the fresh verification probes; None with --no-verify
    deviation_per_output: dict[str, float] = field(default_factory=dict)
    # per graph output: what its deviation was measured on ({"label", "tensors": {name: {"what", "deviation"}}})
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)  # probes, max, p95, promise
    tolerance: float = 0.0
    verified: bool = False
    seconds: float = 0.0
    passes: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    left_alone: list[dict[str, str]] = field(default_factory=list)  # {"name", "pass", "reason"}, from every pass
    op_counts_before: dict[str, int] = field(default_factory=dict)
    op_counts_after: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)  # the latency guard's measurement, if it ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_plain)

    def table(self) -> str:
        """The before/after table printed by the CLI."""
        rows = [("", "before", "after", "change")]
        ops = Counter(self.op_counts_before) | Counter(self.op_counts_after)
        for op in sorted(ops, key=lambda o: (-self.op_counts_before.get(o, 0), o)):
            a, b = self.op_counts_before.get(op, 0), self.op_counts_after.get(op, 0)
            rows.append((op, str(a), str(b), _delta(a, b, pct=False)))
        rows.append(("nodes", str(sum(self.op_counts_before.values())), str(sum(self.op_counts_after.values())),
                     _delta(sum(self.op_counts_before.values()), sum(self.op_counts_after.values()), pct=False)))
        rows.append(("parameters", f"{self.params_before:,}", f"{self.params_after:,}",
                     _delta(self.params_before, self.params_after)))
        rows.append(("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}", _delta(self.macs_before, self.macs_after)))
        rows.append(("file size", _size(self.bytes_before), _size(self.bytes_after),
                     _delta(self.bytes_before, self.bytes_after)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.output_deviation is None:
            lines.append("deviation: not verified (--no-verify)")
        else:
            n = self.verification.get("probes", 0)
            lines.append(f"deviation: {self.output_deviation:.3g} max, {self.verification.get('p95', 0.0):.3g} "
                         f"95th percentile, on {n} fresh probes (tolerance {self.tolerance:g})")
            for name, d in self.deviation_per_output.items():
                label = self.measured.get(name, {}).get("label", "the output itself")
                lines.append(f"  {name}: {d:.3g}, measured on {label}")
            if self.verification.get("promise"):
                lines.append(f"  {self.verification['promise']}")
        if self.latency:
            lines.append(f"latency (onnxruntime, 1 thread): {self.latency['input_ms']:.3g} ms -> "
                         f"{self.latency['result_ms']:.3g} ms")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _delta(a: int, b: int, pct: bool = True) -> str:
    if a == b:
        return ""
    if pct and a:
        return f"{100.0 * (b - a) / a:+.1f}%"
    return f"{b - a:+d}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
