"""Probe inputs for allocation and verification (and, with the lossy passes, the one error budget).

Two disjoint probe sets: **allocation** probes, on which lossy passes choose their edits, and
**fresh** verification probes, which decide the result, so a choice that fits its own probes by
luck is still caught.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .downstream import Downstream
from .errors import InputError
from .profile import Profile, digest

from .defaults import DEFAULT_CHECK, DEFAULT_TOLERANCE  # noqa: F401 (the pipeline's defaults)

#: The probes' inputs may take at most this many bytes (a quarter of the machine's memory).
PROBE_BYTES = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 if hasattr(os, "sysconf")
               else 4 * 2**30)

Specs = dict[str, tuple[tuple[int, ...], np.dtype]]
Feeds = dict[str, np.ndarray]


@dataclass
class Probes:
    allocation: list[Feeds]
    verification: list[Feeds]


def random_probes(specs: Specs, count: int, rng: np.random.Generator,
                  ranges: dict[str, tuple[float, float]] | None = None) -> list[Feeds]:
    """``count`` samples: N(0,1) floats (uniform in ``ranges[name]`` where given); integers
    uniform among the integers of ``ranges[name]``, 0 where none is given; bools the same (as 0
    and 1: a range 0,1 draws both), False where none is given."""
    ranges = ranges or {}
    samples = []
    for _ in range(count):
        feeds = {}
        for name, (shape, dtype) in specs.items():
            if np.issubdtype(dtype, np.floating):
                if name in ranges:
                    low, high = ranges[name]
                    x = rng.uniform(low, high, size=shape)
                else:
                    x = rng.standard_normal(shape)
                feeds[name] = x.astype(dtype)
            elif (np.issubdtype(dtype, np.integer) or np.dtype(dtype) == np.bool_) and name in ranges:
                low, high = ranges[name]
                feeds[name] = rng.integers(int(np.ceil(low)), int(np.floor(high)), size=shape, endpoint=True).astype(dtype)
            else:
                feeds[name] = np.zeros(shape, dtype=dtype)
        samples.append(feeds)
    return samples


def file_probes(arrays: dict[str, np.ndarray], specs: Specs) -> list[Feeds]:
    """Samples from arrays keyed by input name, first axis = samples."""
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InputError(f"--probe-inputs: no array for input(s) {', '.join(missing)}")
    arrays = {n: np.asarray(arrays[n]) for n in specs}  # each read once (an .npz decompresses on access)
    counts = {arrays[n].shape[0] for n in specs}
    if len(counts) != 1:
        raise InputError(f"--probe-inputs: arrays have different sample counts {sorted(counts)}")
    samples = []
    for k in range(counts.pop()):
        feeds = {}
        for name, (shape, dtype) in specs.items():
            x = np.asarray(arrays[name][k])
            if x.ndim == len(shape) - 1:
                x = x[None]
            if x.ndim != len(shape):
                raise InputError(f"--probe-inputs: '{name}' sample has shape {x.shape}, input expects rank {len(shape)}")
            if np.issubdtype(dtype, np.floating) and not np.isfinite(x).all():
                raise InputError(f"--probe-inputs: sample {k} of '{name}' holds NaN or infinite values")
            feeds[name] = x.astype(dtype)
        samples.append(feeds)
    return samples


def make_probes(specs: Specs, seed: int = 0, allocation: int = 16, verification: int = 8,
                ranges: dict[str, tuple[float, float]] | None = None,
                arrays: dict[str, np.ndarray] | None = None) -> Probes:
    """Allocation and verification probes, disjoint.

    With ``arrays`` (user data): the first half allocates, the rest verifies; a single sample
    verifies and allocation falls back to random probes.
    """
    per_sample = sum(int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize for shape, dtype in specs.values())
    if (allocation + verification) * per_sample > PROBE_BYTES:
        raise InputError(f"{allocation} + {verification} probes of {per_sample / 2**20:.4g} MiB each (input shapes "
                         f"{', '.join(f'{n}:{s}' for n, (s, _) in specs.items())}) need more than "
                         f"{PROBE_BYTES / 2**30:.3g} GiB: give a smaller --check or --input-shape")
    for name, (low, high) in (ranges or {}).items():
        if name not in specs:
            raise InputError(f"--probe-range {name}: the model has no input named '{name}' (inputs: {', '.join(specs)})")
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise InputError(f"--probe-range {name}: needs finite LOW < HIGH, got {low}, {high}")
        dtype = specs[name][1]
        boolean = np.dtype(dtype) == np.bool_
        if boolean and not 0 <= np.ceil(low) <= np.floor(high) <= 1:
            raise InputError(f"--probe-range {name}: input '{name}' is bool: its range is within 0,1 (0,1: random values)")
        if np.issubdtype(dtype, np.integer) and not (np.iinfo(dtype).min <= np.ceil(low) <= np.floor(high)
                                                    <= np.iinfo(dtype).max):
            raise InputError(f"--probe-range {name}: no {np.dtype(dtype).name} value between {low:g} and {high:g}")
        if not np.issubdtype(dtype, np.floating) and not np.issubdtype(dtype, np.integer) and not boolean:
            raise InputError(f"--probe-range {name}: input '{name}' is {np.dtype(dtype).name}, not a number")
    rng = np.random.default_rng(seed)
    if arrays is not None:
        samples = file_probes(arrays, specs)
        if not samples:
            raise InputError("--probe-inputs: no samples")
        if len(samples) == 1:
            return Probes(random_probes(specs, allocation, rng, ranges), samples)
        half = len(samples) // 2
        return Probes(samples[:half], samples[half:])
    alloc = random_probes(specs, allocation, rng, ranges)
    return Probes(alloc, random_probes(specs, verification, rng, ranges))


# ---------------------------------------------------------------------------------------------
# The one error budget


@dataclass
class Candidate:
    """A lossy edit a pass proposes. Candidates sharing a ``slot`` are alternatives of increasing
    ``level`` (e.g. one layer at ranks 8, 4, 2): at most one per slot is taken, level by level."""

    key: str
    slot: str
    saving: tuple[int, int, int]  # (MACs, parameters, bytes) saved, cumulative within the slot
    error: float  # cheap estimate of the deviation it adds, cumulative within the slot
    level: int = 0
    data: Any = None  # whatever the proposing pass needs to materialize it
    tensors: tuple[str, ...] = ()  # initializers it edits, if known (else learned by materializing)


Materialize = Callable[[list[Candidate]], dict[str, np.ndarray]]
#: probes the measured ranking and the screening of candidate sets use (the first allocation probes):
#: ranking needs ratios, not the max; the fewest (up to RANKING_PROBES) whose measured outputs hold
#: RANKING_VALUES values, so that a model with large outputs (an image classifier's 1000 logits)
#: ranks on one probe: a quarter of the model runs, same choices on MobileNetV2 at tolerance 0.01
#: and a 1.5% smaller file at 0.003
RANKING_PROBES = 4
RANKING_VALUES = 1000
#: a model whose run on the ranking probes takes longer has its candidates measured alone on the
#: part of the graph they change (:mod:`red_onnx.downstream`); a faster one runs whole (a
#: sub-model's session costs more than it saves)
DOWNSTREAM_SECONDS = 0.02
#: the steps after the longest fitting prefix are screened and confirmed again after an overshoot
#: on all allocation probes, at most this many times (:meth:`Budget._try_next`)
PATIENCE_MISSES = 3
#: Budget sessions kept for the later builds of a call: at most this many, each of a model whose
#: weights outside the edited ones take at most SESSION_CACHE_BYTES
SESSIONS_KEPT = 4
SESSION_CACHE_BYTES = 2**26


@dataclass
class Spent:
    """What one call of :meth:`Budget.spend` accepted and measured."""

    accepted: list[Candidate]
    deviation_before: float
    deviation_after: float
    evaluations: int


class Budget:
    """Accepts candidate edits by saving per unit of measured deviation while the deviation on
    the allocation probes stays under ``margin × tolerance`` (see :meth:`_spend_measured`).

    The deviation is measured against the *input* model, so each call spends only what earlier
    passes left."""

    def __init__(self, tolerance: float, probes: list[Feeds], reference: list[list[np.ndarray]],
                 reference_names: list[str], plan: list[Any], margin: float = 0.8,
                 max_evaluations: int = 200, patience: int = 24, progress: Callable[[str], None] | None = None,
                 profile: Profile | None = None):
        self.tolerance = tolerance
        self.target = margin * tolerance
        self.probes = probes
        self.reference = reference  # per probe: the input model's tensors named by ``reference_names``
        self.reference_names = reference_names
        self.plan = plan  # what each output's deviation is measured on (verify.measure_plan)
        self.progress = progress or (lambda message: None)  # a context.Progress: says where a long search is
        self.max_evaluations = max_evaluations
        self.patience = patience
        self.history: list[Spent] = []
        self.profile = profile if profile is not None else Profile()
        #: a step that saves MACs is offered only if it removes at least ``mac_worth`` of the
        #: model's ``macs`` per share of the squared target its added deviation uses (the
        #: pipeline sets it where a bytes-saving pass spends the rest of the budget)
        self.mac_worth, self.macs = 0.0, 0
        #: what the passes computed from the model, kept for the later builds of this call (other
        #: tolerances, back-offs), keyed by a digest of the values it was computed from
        self.memo: dict[str, Any] = {}
        #: the deviation on the allocation probes where the last spend of this build ended (exact
        #: rewrites since then change it by float rounding only): the next spend starts from it.
        #: None: unknown (measured); a build starts at 0 (the input's function)
        self.after: float | None = None
        #: the last SESSIONS_KEPT sessions, by model: a later build's spend on the same model (the
        #: first pass of every tolerance, and the passes after it where it accepted the same edits)
        #: skips the session's creation (0.12 s on the captcha CRNN's 902 nodes)
        self.sessions: dict[str, Any] = {}
        #: of the probes after the ranking ones, the one that deviated most in the last run on all
        #: probes, of this spend or an earlier one (the next pass's edits strain the same probes,
        #: often): a decision (:meth:`_Runs.on_all`) runs it alone first
        self.worst: int | None = None

    def spend(self, model: Any, candidates: list[Candidate], materialize: Materialize,
              arrays: dict[str, np.ndarray] | None = None, per_level: bool = False) -> Spent:
        """Choose among ``candidates`` for ``model`` (an onnx.ModelProto whose initializers the
        materialized edits replace, by name; with ``arrays``, a light model from
        :func:`red_onnx.model_io.to_light_model` and its weights). Returns what was accepted.

        Candidates are ranked by measured deviations (the :mod:`red_onnx.profile`; see
        :meth:`_spend_measured`): with ``per_level``, each level of a slot is measured, from the
        mildest, until one alone exceeds the target; else a slot's most aggressive level is
        measured and the others scaled by their estimates."""
        runs = _Runs(self, model, candidates, materialize, arrays or {})
        if self.after is not None and not materialize([]):  # measured at the end of the build's last spend
            before = self.after
        else:
            before = runs.unedited()
        slots: dict[str, list[Candidate]] = {}
        for c in sorted(candidates, key=lambda c: c.level):
            slots.setdefault(c.slot, []).append(c)
        if before > self.target:  # nothing left to spend
            accepted, current = {}, before
        else:
            accepted, current = self._spend_measured(slots, runs, before, per_level=per_level)
        spent = Spent(list(accepted.values()), before, current, runs.evaluations)
        self.history.append(spent)
        self.after = current
        return spent

    def _spend_measured(self, slots: dict[str, list[Candidate]], runs: _Runs, before: float, per_level: bool
                        ) -> tuple[dict[str, Candidate], float]:
        """Rank by measurement, then search the ranked sequence.

        1. Each slot's added deviation alone (on the first ``RANKING_PROBES`` probes; the
           deviation ``d`` of the edit alone gives ``a = sqrt(max(d² − d₀², 0))``, ``d₀`` the
           deviation before), read from the profile where it holds it: with ``per_level``, of each
           level from the mildest up to the first whose ``sqrt(d₀² + a²)`` exceeds the target
           (that one and those above are not offered); else of the most aggressive level, level
           ``i`` estimated at ``a · error_i / error_top``.
        2. Independent edits add in quadrature, so a greedy sequence of steps (a slot to a higher
           level) by saving per added squared deviation predicts ``sqrt(d₀² + Σ a²)`` at each step
           (:meth:`_steps`).
        3. The longest prefix that measures under the target *on the ranking probes* is searched
           for, and confirmed on all allocation probes; where it overshoots there, the search goes
           on below it on all probes (:meth:`_longest`; a run on all probes is a decision: one over
           the target stops at its first probe over it, and the rescaling reads that lower bound).
           Then up to ``patience`` later steps, each predicted to fit, are screened on the ranking
           probes, and those that pass are confirmed together on all (:meth:`_try_next`: where
           they overshoot, the longest run that fits is kept and the steps after the one that
           overshot are tried again, up to PATIENCE_MISSES times). So a pass costs a few runs on
           all probes, however many candidates it has.
        """
        start = time.perf_counter()
        before_ranking = runs.on_ranking([])
        runs.down = self._downstream(runs, time.perf_counter() - start)
        added: dict[str, list[float]] = {}
        bar = getattr(self.progress, "bar", None)
        with bar(len(slots), "profile") if bar else contextlib.nullcontext() as shown:
            for slot, levels in list(slots.items()):
                self._profile_slot(slot, levels, slots, added, runs, before_ranking, per_level)
                if shown is not None:
                    shown.update(1)
        steps, predicted = self._steps(slots, added, before)

        def state(k: int) -> dict[str, Candidate]:
            return {slot: slots[slot][i] for slot, i, _ in steps[:k]}

        screened: dict[int, float] = {0: before_ranking}  # prefix length → deviation on the ranking probes
        full: dict[int, float] = {0: before}  # prefix length → deviation on all allocation probes

        def on_ranking(k: int) -> float:
            if k not in screened:
                screened[k] = runs.on_ranking(list(state(k).values()))
            return screened[k]

        def on_all(k: int) -> float:
            if k not in full:
                full[k] = runs.on_all(list(state(k).values()), screened.get(k), decide=True) if runs.screening \
                    else on_ranking(k)
            return full[k]

        lo = self._longest(on_ranking, predicted, len(steps) + 1, runs.left)
        if lo and on_all(lo) > self.target:  # the ranking probes missed: search below it on all probes
            lo = self._longest(on_all, predicted, lo, runs.left)
        accepted, current = self._try_next(steps[lo + 1:lo + 1 + self.patience], slots, state(lo), on_all(lo), runs)
        if accepted:
            predicted = np.sqrt(before * before + sum(added[s][slots[s].index(c)] ** 2 for s, c in accepted.items()))
            self.profile.predictions.append({"pass": next(iter(accepted)).split(":")[0], "edits": len(accepted),
                                             "predicted": round(float(predicted), 6), "measured": round(current, 6)})
        return accepted, current

    def _steps(self, slots: dict[str, list[Candidate]], added: dict[str, list[float]], before: float
               ) -> tuple[list[tuple[str, int, float]], list[float]]:
        """The greedy sequence of steps (slot, level index, added squared deviation), by marginal
        saving per marginal squared deviation, and each prefix's predicted deviation."""
        level = {slot: -1 for slot in slots}
        steps, predicted, total = [], [], before * before
        while True:
            best = None
            for slot, levels in slots.items():
                s0 = levels[level[slot]].saving if level[slot] >= 0 else (0, 0, 0)
                a0 = added[slot][level[slot]] if level[slot] >= 0 else 0.0
                for i in range(level[slot] + 1, len(levels)):
                    gain = tuple(x - y for x, y in zip(levels[i].saving, s0))
                    if not any(g > 0 for g in gain):
                        continue
                    cost = max(added[slot][i] ** 2 - a0 ** 2, 1e-24)
                    if gain[0] > 0 and gain[0] < self.mac_worth * self.macs * cost / self.target ** 2:
                        continue  # too few MACs for its share of the budget, which hashing can use
                    value = tuple(g / cost for g in gain)
                    if best is None or value > best[0]:
                        best = (value, slot, i, cost)
            if best is None:
                return steps, predicted
            _, slot, i, cost = best
            level[slot] = i
            total += cost
            steps.append((slot, i, cost))
            predicted.append(float(np.sqrt(total)))

    def _longest(self, at: Callable[[int], float], predicted: list[float], hi: int, left: Callable[[], bool]) -> int:
        """The longest prefix whose deviation ``at(k)`` stays under the target: the prefix of lo
        steps fits, the one of hi does not; each guess is the longest prefix predicted to fit once
        the predictions are rescaled by the last measured/predicted ratio; a guess outside the
        bracket moves to the step next to it, and where that too contradicts the prediction,
        bisection follows."""
        lo, scale, edge = 0, 1.0, False
        while hi - lo > 1 and left():
            guess = sum(1 for p in predicted if p * scale <= self.target)
            if lo < guess < hi:
                k, edge = guess, False
            elif not edge:
                k, edge = (lo + 1 if guess <= lo else hi - 1), True
            else:
                k, edge = (lo + hi) // 2, False
            dev = at(k)
            lo, hi = (k, hi) if dev <= self.target else (lo, k)
            scale = dev / predicted[k - 1] if predicted[k - 1] > 0 else 1.0
        return lo

    def _try_next(self, later: list[tuple[str, int, float]], slots: dict[str, list[Candidate]],
                  accepted: dict[str, Candidate], current: float, runs: _Runs) -> tuple[dict[str, Candidate], float]:
        """The steps after the longest fitting prefix, where predicted to fit: each screened on the
        ranking probes together with those that passed before it; the ones that pass are confirmed
        together on all allocation probes. Where they overshoot there, the longest run of them that
        fits is kept (:meth:`_longest`), the step after it dropped, and the steps after that one
        screened again, until PATIENCE_MISSES such overshoots. One confirmation where they all fit:
        on MobileNetV2 at 0.003, whose float16 levels follow the longest prefix by the dozen, its
        hash pass takes 1.30-1.62 s, against 2.89-3.24 s confirming each step alone (3 calls each)."""
        for _ in range(PATIENCE_MISSES):
            passed: list[tuple[dict[str, Candidate], float, int]] = []  # state, screened deviation, step
            squares = [current * current]  # the predicted square of each such state's deviation
            trial, level = accepted, current  # the last state that passed, its deviation as measured
            for n, (slot, i, cost) in enumerate(later):
                if slot in trial and slots[slot].index(trial[slot]) >= i or not runs.left() \
                        or level * level + cost > self.target * self.target:
                    continue
                candidate = {**trial, slot: slots[slot][i]}
                screened = runs.on_ranking(list(candidate.values()))
                if screened <= self.target:
                    trial, level = candidate, screened
                    passed.append((candidate, screened, n))
                    squares.append(squares[-1] + cost)
            if not passed:
                break
            full = {0: current}

            def on_all(k: int) -> float:
                if k not in full:
                    state, screened, _ = passed[k - 1]
                    full[k] = runs.on_all(list(state.values()), screened, decide=True) if runs.screening \
                        else screened
                return full[k]

            if on_all(len(passed)) <= self.target:
                return passed[-1][0], full[len(passed)]
            k = self._longest(on_all, [float(np.sqrt(q)) for q in squares[1:]], len(passed), runs.left)
            if k:
                accepted, current = passed[k - 1][0], full[k]
            later = later[passed[k][2] + 1:]  # past the step that overshot
        return accepted, current

    def _profile_slot(self, slot: str, levels: list[Candidate], slots: dict, added: dict, runs: _Runs,
                      before: float, per_level: bool) -> None:
        """``added[slot]``: each level's added deviation (see :meth:`_spend_measured`, step 1);
        with ``per_level``, the levels that alone exceed the target leave ``slots[slot]``."""
        if per_level:
            added[slot] = []
            for c in levels:
                a = runs.alone(c, before)
                if before ** 2 + a * a > self.target ** 2:
                    break
                added[slot].append(a)
            slots[slot] = levels[:len(added[slot])]
            if not added[slot]:
                del slots[slot], added[slot]
            return
        top = levels[-1]
        a = runs.alone(top, before)
        added[slot] = [a * (c.error / top.error if top.error > 0 else 1.0) for c in levels]

    def _downstream(self, runs: _Runs, seconds: float) -> Downstream | None:
        """Where one run of the model on the ranking probes took over DOWNSTREAM_SECONDS
        (``seconds``), the sub-models that measure slots alone (:mod:`red_onnx.downstream`)."""
        if seconds < DOWNSTREAM_SECONDS:
            return None
        model, kept, outputs = runs.sess._red_onnx_model
        down = Downstream(model, kept, runs.base, outputs, self.probes[:runs.count])
        down.prepare([frozenset(c.tensors or runs.materialize([c])) for c in runs.tops])
        return down

    def add_probes(self, probes: list[Feeds], reference: list[list[np.ndarray]]) -> None:
        """More allocation probes (with the input model's outputs on them, as ``reference``)."""
        self.probes = self.probes + probes
        self.reference = self.reference + reference

    def reference_for(self, names: list[str]) -> list[list[np.ndarray]]:
        index = [self.reference_names.index(n) for n in names]
        return [[sample[i] for i in index] for sample in self.reference]

    def _session(self, model: Any, editable: list[str], arrays: dict[str, np.ndarray]):
        """One session for all evaluations: the editable initializers become graph inputs."""
        import onnx

        from . import verify

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        inits = {t.name: t for t in copy.graph.initializer}
        inputs = {i.name for i in copy.graph.input}  # IR 3 models list their initializers as inputs too
        base = {}
        for name in editable:
            tensor = inits.pop(name)
            base[name] = arrays[name] if name in arrays else onnx.numpy_helper.to_array(tensor)
            if name not in inputs:
                copy.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        kept = [t for t in copy.graph.initializer if t.name in inits]
        del copy.graph.initializer[:]
        copy.graph.initializer.extend(kept)
        pairs = verify.columns(self.plan, copy)  # the rewrite so far may have renamed measured tensors
        kept = {k: v for k, v in arrays.items() if k in inits}
        outputs = [r for _, r, _ in pairs]
        key = None
        if sum(v.nbytes for v in kept.values()) <= SESSION_CACHE_BYTES:
            key = digest(np.frombuffer(copy.SerializeToString(deterministic=True) + repr(outputs).encode()
                                       + "".join(f"{k}:{digest(v)}" for k, v in kept.items()).encode(), np.uint8))
        sess = self.sessions.pop(key, None) if key is not None else None
        if sess is None:
            sess = _measuring_session(copy, outputs, kept)
            sess._red_onnx_model = (copy, kept, outputs)  # for a Downstream on the same model
        if key is not None:
            self.sessions[key] = sess
            while len(self.sessions) > SESSIONS_KEPT:
                del self.sessions[next(iter(self.sessions))]
        return sess, base, [t for t, _, _ in pairs]  # the session's outputs hold the reference's tensors, in order


def _measuring_session(model: Any, outputs: list[str], arrays: dict[str, np.ndarray]):
    """A spend's session: all of onnxruntime's graph optimizations (the edited weights are inputs,
    which they leave as they are) where the other weights are serialized with the model; plain
    where they are not (the optimizer would copy them) or where the optimizer fails on the model.
    Optimized, a spend ran its probes about 10% faster on MobileNetV2 and PP-OCRv6 (hash pass at
    0.01: 1.83 s against 2.16, 3.43 against 3.93; medians of 4 and 3 runs)."""
    from . import verify

    if sum(v.nbytes for v in arrays.values()) < verify.IN_PLACE_BYTES:
        try:
            return verify.session(model, outputs, optimize=True, arrays=arrays)
        except Exception:
            pass
    return verify.session(model, outputs, arrays=arrays)


class _Runs:
    """One spend's measurements: one session in which the editable weights are inputs, run on all
    allocation probes and on the first few (that rank and screen), and what it measured alone."""

    def __init__(self, budget: Budget, model: Any, candidates: list[Candidate], materialize: Materialize,
                 arrays: dict[str, np.ndarray]):
        self.budget, self.materialize, self.candidates = budget, materialize, len(candidates)
        self.tops = list({c.slot: c for c in sorted(candidates, key=lambda c: c.level)}.values())  # one per slot
        editable = sorted({t for c in self.tops for t in (c.tensors or materialize([c]))})
        self.sess, self.base, names = budget._session(model, editable, arrays)
        known = budget.memo.setdefault("batch axes", {})
        self.all = probe_runner(self.sess, budget.probes, self.base, known, tuple(names))
        self.reference = budget.reference_for(names)
        per_probe = max(sum(y.size for y in self.reference[0]), 1)
        self.count = min(RANKING_PROBES, -(-RANKING_VALUES // per_probe), len(budget.probes))
        self.few = (probe_runner(self.sess, budget.probes[:self.count], self.base, known, tuple(names))
                    if self.count < len(budget.probes) else self.all)
        self.screening = self.few is not self.all  # the ranking probes are fewer than all
        self.evaluations = 0
        self.down: Downstream | None = None
        self.digests: dict[str, str] = {}
        self.measured: set[frozenset[str]] = set()  # edited sets measured alone so far

    def left(self) -> bool:
        return self.evaluations < self.budget.max_evaluations

    def on_ranking(self, chosen: list[Candidate], screening: bool = False) -> float:
        """The deviation with ``chosen`` applied, on the ranking probes (a screen: not counted)."""
        from . import verify

        self.evaluations += not screening
        return verify.deviation(self.reference[:self.count], self.few({**self.base, **self.materialize(chosen)}))[0]

    def on_all(self, chosen: list[Candidate], screened: float | None = None, decide: bool = False) -> float:
        """The deviation on all allocation probes; first on the ranking probes (``screened``: that
        deviation, where the caller has it), whose maximum is a lower bound: an edit over the
        target there is rejected without the full run. ``decide``: only whether it fits the target
        matters: the probe that deviated most in the last run on all probes runs first, alone, and
        where the probes run one by one, the first probe over the target ends the run (its
        deviation, a lower bound, is returned)."""
        from . import verify

        self.evaluations += 1
        self.budget.progress(f"  budget: {self.evaluations} measurements of {self.candidates} candidates so far "
                             f"(target {self.budget.target:.3g})")
        if self.screening and screened is None:
            screened = self.on_ranking(chosen, screening=True)
        if self.screening and screened > self.budget.target:
            return screened
        feeds = {**self.base, **self.materialize(chosen)}
        if self.budget.worst is not None and not self.count <= self.budget.worst < len(self.budget.probes):
            self.budget.worst = None  # a later tolerance starts from the probes before an earlier one's back-off
        if decide and self.screening and getattr(self.all, "one_by_one", False):
            later = range(self.count, len(self.budget.probes))
            if self.budget.worst is not None:  # the probe that deviated most last time goes first
                later = [self.budget.worst] + [k for k in later if k != self.budget.worst]
            worst, most = screened, (-1.0, None)
            for k in later:
                d = self._on_probe(self.budget.probes[k], self.reference[k], feeds)
                worst, most = max(worst, d), max(most, (d, k))
                if worst > self.budget.target:
                    return worst
            self.budget.worst = most[1]
            return worst
        if decide and self.screening and self.budget.worst is not None:  # the probe that deviated most last time
            alone = self._on_probe(self.budget.probes[self.budget.worst], self.reference[self.budget.worst], feeds)
            if alone > self.budget.target:
                return max(screened, alone)
        per_sample = verify.sample_deviations(self.reference, self.all(feeds))
        if not per_sample.size:
            return 0.0
        if self.screening:  # of the probes after the ranking ones (which screen anyway)
            self.budget.worst = self.count + int(per_sample[self.count:].max(axis=1).argmax())
        return float(per_sample.max())

    def _on_probe(self, probe: Feeds, reference: list[np.ndarray], feeds: dict[str, np.ndarray]) -> float:
        from . import verify

        return verify.deviation([reference], [self.sess.run(None, {**probe, **feeds})])[0]

    def unedited(self) -> float:
        """The deviation with nothing edited, on all allocation probes."""
        from . import verify

        if hasattr(self.all, "unedited") and not self.materialize([]):  # already run by the batch check
            return verify.deviation(self.reference, self.all.unedited)[0]
        return self.on_all([])

    def alone(self, c: Candidate, before_ranking: float) -> float:
        """The added deviation of ``c`` alone, from the profile or measured into it: on the whole
        model the first time its tensors are edited alone, from the second time on the part of
        the graph it changes where :attr:`down` has a sub-model for it (a sub-model's session
        costs about two whole runs: on VGG-11, 176 ms against 87 ms, its runs 29 ms; and at a
        small tolerance, a slot is measured once)."""
        from . import verify

        names = sorted(c.tensors or self.materialize([c]))
        key = c.key + "@" + ",".join(self.digests.get(n) or self.digests.setdefault(n, digest(self.base[n]))
                                     for n in names)
        added = self.budget.profile.get(key)
        if added is None:
            edited = frozenset(names)
            run_down = self.down.runner(edited) if self.down is not None and edited in self.measured else None
            self.measured.add(edited)
            if run_down is not None:
                d = verify.deviation(self.reference[:self.count], run_down({**self.base, **self.materialize([c])}))[0]
            else:
                d = self.on_ranking([c], screening=True)
            added = float(np.sqrt(max(d * d - before_ranking * before_ranking, 0.0)))
            self.budget.profile.put(key, added)
        return added


def run_all(sess: Any, probes: list[Feeds], known: dict | None = None) -> list[list[np.ndarray]]:
    """Every probe's outputs, in one batch where the model allows it (see :func:`probe_runner`)."""
    run = probe_runner(sess, probes, {}, known)
    return run.unedited if hasattr(run, "unedited") else run({})


def probe_runner(sess: Any, probes: list[Feeds], weights: dict[str, np.ndarray], known: dict | None = None,
                 outputs: tuple[str, ...] | None = None) -> Callable[[dict[str, np.ndarray]], list[list[np.ndarray]]]:
    """A function of the weight feeds returning each probe's outputs, running all probes as one
    batch where the model allows it (its outputs split per sample equal the one-by-one run, checked
    on the first and the last probe). ``known``: what that check found before, per output (the
    input model's name of what the session returns, ``outputs``: a rewrite may rename its own) and
    number of probes: a session whose outputs were all checked, in this session or another (the
    input model's, a build's), skips the check (it costs three runs)."""

    def one_by_one(feeds, subset=probes):
        return [sess.run(None, {**probe, **feeds}) for probe in subset]

    one_by_one.one_by_one = True

    if len(probes) < 2 or any(x.shape[:1] != (1,) for p in probes for x in p.values()) or any(
            i.name in probes[0] and i.shape[:1] == [1] for i in sess.get_inputs()):  # the input's batch size is fixed
        return one_by_one
    outputs = outputs or tuple(o.name for o in sess.get_outputs())
    key = (outputs, len(probes)) if known is not None else None
    if key is not None and known.get(key, 0) is None:
        return one_by_one
    stacked = {name: np.concatenate([p[name] for p in probes]) for name in probes[0]}
    if key is not None and all((name, len(probes)) in known for name in outputs):
        axes = [known[name, len(probes)] for name in outputs]

        def batch_known(feeds):
            try:
                outputs = sess.run(None, {**stacked, **feeds})
            except Exception:  # a rewrite fixed a batch size after all
                return one_by_one(feeds)
            return _split(outputs, axes, range(len(probes)))

        return batch_known
    runner = _checked_runner(sess, probes, weights, stacked, one_by_one)
    if key is not None and hasattr(runner, "axes"):
        known.update({(name, len(probes)): axis for name, axis in zip(outputs, runner.axes)})
    elif key is not None:
        known[key] = None
    return runner


def _checked_runner(sess, probes, weights, stacked, one_by_one):
    ends = [0, len(probes) - 1]
    single = one_by_one(weights, [probes[k] for k in ends])
    try:
        batched = sess.run(None, {**stacked, **weights})
    except Exception:  # a fixed batch size somewhere: one by one
        return one_by_one
    axes = []
    for one, many in zip(single[0], batched):
        candidates = [a for a in range(many.ndim) if one.shape[a] == 1 and many.shape[a] == len(probes)
                      and many.shape[:a] + many.shape[a + 1:] == one.shape[:a] + one.shape[a + 1:]]
        if len(candidates) != 1:
            return one_by_one
        axes.append(candidates[0])

    def batch(feeds):
        return _split(sess.run(None, {**stacked, **feeds}), axes, range(len(probes)))

    from .verify import deviation

    if deviation(single, _split(batched, axes, ends))[0] > 1e-4:
        return one_by_one
    batch.unedited = _split(batched, axes, range(len(probes)))  # the outputs with ``weights``, already run
    batch.axes = axes
    return batch


def _split(outputs: list[np.ndarray], axes: list[int], samples) -> list[list[np.ndarray]]:
    """Each sample's outputs from a batched run (views along each output's batch axis)."""
    return [[y[(slice(None),) * a + (slice(k, k + 1),)] for y, a in zip(outputs, axes)] for k in samples]
