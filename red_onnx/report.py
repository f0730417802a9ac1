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
    # the sensitivity profile: entries, measured / reused by this output's builds, predicted vs measured deviations
    profile: dict[str, Any] = field(default_factory=dict)
    # the metric mode: baseline, max_drop, every scored point, the chosen tolerance (or one output's score)
    metric: dict[str, Any] = field(default_factory=dict)

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
        lines.extend(self._channel_lines())
        if self.latency:
            lines.append(f"latency (onnxruntime, 1 thread): {self.latency['input_ms']:.3g} ms -> "
                         f"{self.latency['result_ms']:.3g} ms")
        lines.extend(self._metric_lines())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _channel_lines(self) -> list[str]:
        """Per channel space whose count changed: before → after, merged, pruned, kept for alignment."""
        lines = []
        for row in self.layers:
            for step in ("merge", "prune", "merge_after_hash"):
                info = row.get(step, {})
                if "channels" not in info:
                    continue
                parts = [f"{info[k]} {label}" for k, label in (("merged", "merged"), ("pruned", "pruned"),
                                                               ("dead", "carried 0"),
                                                               ("kept_for_alignment", "kept for the latency guard"))
                         if info.get(k)]
                lines.append(f"  {row['name']}: {info['channels']} -> {info['channels_after']} channels"
                             + (f" ({', '.join(parts)})" if parts else "") + f" [{step}]")
        return (["channels (per channel space, named by its producers):"] + lines) if lines else []

    def _metric_lines(self) -> list[str]:
        m = self.metric
        if not m.get("points"):
            return [f"metric: {m['metric']:.6g} (input {m['baseline']:.6g}, drop {m['drop']:+.4g}, "
                    f"{'within' if m['within'] else 'over'} {m['max_drop']:g})"] if "metric" in m else []
        lines = [f"metric: input {m['baseline']:.6g}; allowed drop {m['max_drop']:g}; chose tolerance "
                 f"{m['chosen_tolerance']:g} of {len(m['points'])} scored (max {m['max_evals']}):"]
        for p in m["points"]:
            mark = "*" if p["tolerance"] == m["chosen_tolerance"] else " "
            lines.append(f" {mark} T={p['tolerance']:<7g} metric {p['metric']:.6g} (drop {p['drop']:+.4g}"
                         f"{', within' if p['within'] else ', over'})  MACs {p['macs']:,}  params {p['params']:,}  "
                         f"{_size(p['bytes'])}" + (f"  latency x{p['latency_ratio']:.2f}" if p["latency_ratio"] else ""))
        return lines

    @staticmethod
    def many_to_json(reports: list[Report], outputs: list[str]) -> str:
        """One entry per output (several tolerances): ``{"outputs": [{"output": path, ...report}]}``."""
        entries = [{"output": path, **r.to_dict()} for r, path in zip(reports, outputs)]
        return json.dumps({"outputs": entries}, indent=2, default=_plain)

    @staticmethod
    def summary(reports: list[Report], outputs: list[str]) -> str:
        """One column per output (several tolerances): what each saves, its deviation and speed."""
        first = reports[0]
        rows = [("", "before") + tuple(f"T={r.tolerance:g}" for r in reports),
                ("parameters", f"{first.params_before:,}") + tuple(
                    f"{_delta(r.params_before, r.params_after) or '='}" for r in reports),
                ("MACs", f"{first.macs_before:,}") + tuple(
                    f"{_delta(r.macs_before, r.macs_after) or '='}" for r in reports),
                ("file size", _size(first.bytes_before)) + tuple(_size(r.bytes_after) for r in reports),
                ("nodes", str(sum(first.op_counts_before.values()))) + tuple(
                    str(sum(r.op_counts_after.values())) for r in reports),
                ("deviation max", "") + tuple("-" if r.output_deviation is None else f"{r.output_deviation:.3g}"
                                              for r in reports),
                ("latency ratio", "") + tuple(f"{r.latency['ratio']:.2f}" if r.latency.get("ratio") else "-"
                                              for r in reports),
                ("seconds", "") + tuple(f"{r.seconds:.1f}" for r in reports)]
        if any("metric" in r.metric for r in reports):
            rows.insert(-2, ("metric", f"{first.metric['baseline']:.4g}") + tuple(
                f"{r.metric['metric']:.4g}{'' if r.metric['within'] else ' (over)'}" for r in reports))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines += [f"T={r.tolerance:g}: {path}" for r, path in zip(reports, outputs)]
        if first.verification.get("probes"):
            lines.append(f"each verified on {first.verification['probes']} fresh probes: no output deviated more "
                         "than its T (see --report for each output's promise and per-output deviations)")
        notes = dict.fromkeys(f"T={r.tolerance:g}: {n}" for r in reports for n in r.notes)
        lines.extend(f"note: {n}" for n in notes)
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
