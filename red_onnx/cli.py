"""Command line: argument parsing, exit codes and printing; the work is in :func:`red_onnx.compress`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

from . import __version__
from .defaults import DEFAULT_CHECK, DEFAULT_MAX_DROP, DEFAULT_MAX_EVALS, DEFAULT_TOLERANCE, PASS_NAMES
from .errors import InputError, VerificationError

EXIT_OK, EXIT_VERIFY, EXIT_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """exit codes:
  0    written (or nothing to do: written unchanged)
  1    verification failed: the result deviates from the input model; nothing written
  2    bad input or usage (unreadable model, bad option, unwritable output); nothing written
  3    internal error (a bug: rerun with --debug and report it); nothing written
  130  interrupted (Ctrl-C or SIGTERM); nothing written
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors are exit 2 with one line, as argparse does
        self.exit(EXIT_INPUT, f"red-onnx: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="red-onnx", description="Compress an ONNX model without data (RED / RED++), verified "
                "against the input with onnxruntime.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="input .onnx model")
    p.add_argument("output", help="output .onnx path (never the input)")
    p.add_argument("--version", action="version", version=f"red_onnx {__version__}")
    p.add_argument("--passes", help=f"comma list of passes ({', '.join(PASS_NAMES)}); default: every pass that exists; "
                   "canonicalization always runs")
    p.add_argument("--tolerance", type=_tolerances, default=None, metavar="T[,T...]",
                   help="error budget of the lossy steps: max relative L2 deviation of any output on any probe "
                   f"(0 = lossless, exact rewrites only; default {DEFAULT_TOLERANCE:g}, the largest at which every "
                   "benchmark model kept its task metric within 1 point: see README). Several values: one "
                   "verified output each, named OUT.tT.onnx (out.onnx -> out.t0.01.onnx), from one profile")
    p.add_argument("--profile", metavar="FILE.json", help="read the sensitivity profile from FILE if it exists "
                   "(it must match the model and the probe options), save it there after each output")
    p.add_argument("--metric", metavar="FILE.py:FUNCTION", help="your metric (a function of an ONNX file's path "
                   "returning a float, higher is better; return minus an error): find the result that saves the "
                   "most within --max-drop of the input's score (with --tolerance: score each output)")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, metavar="D", help="the metric may fall at "
                   f"most this much below the input's (absolute; default {DEFAULT_MAX_DROP:g})")
    p.add_argument("--max-evals", type=int, default=DEFAULT_MAX_EVALS, metavar="N", help="metric calls of the "
                   f"search at most (default {DEFAULT_MAX_EVALS}; the input is scored twice besides)")
    p.add_argument("--check", type=int, default=DEFAULT_CHECK, metavar="N",
                   help=f"fresh verification probes, run in one batch where the model allows (default {DEFAULT_CHECK}: "
                   f"none above the tolerance means fewer than 3/N of such inputs are, at 95%% confidence)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probes (default 0)")
    p.add_argument("--no-verify", action="store_true", help="skip verification (then only exact rewrites are made)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="concrete shape of an input with symbolic dimensions (repeatable)")
    p.add_argument("--probe-inputs", metavar="FILE.npz", help="probe arrays keyed by input name, first axis = "
                   "samples; half choose the edits, half verify")
    p.add_argument("--probe-range", action="append", default=[], metavar="NAME:LOW,HIGH",
                   help="uniform probes in [LOW, HIGH] for that input instead of N(0,1); an integer "
                   "input gets the integers in it (default: the rows of the embedding table it indexes; "
                   "uint8/int8: all values; else 0) (repeatable)")
    p.add_argument("--no-latency-check", action="store_true", help="keep every rewrite (separations, channel "
                   "counts) even where onnxruntime CPU runs the result slower (e.g. for a TensorRT target)")
    p.add_argument("--codebook", choices=("uint8", "auto", "off"), default="uint8",
                   help="store few-valued weights as codebook + uint8 indices or as float16 (default), also "
                   "uint16 indices (auto), or keep plain weights, unhashed (off)")
    p.add_argument("--exclude", metavar="REGEX", help="leave alone the layers whose node name matches")
    p.add_argument("--external-data", action="store_true", help="store weights beside the model "
                   "(automatic above 2 GB)")
    p.add_argument("--report", metavar="R.json", help="write the report as JSON")
    p.add_argument("--dry-run", action="store_true", help="do everything but write the output")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _tolerances(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers (0.003,0.01), got '{text}'")
    return values


def output_paths(output: str, tolerances: list[float]) -> list[str]:
    """One tolerance: ``output``; several: ``out.onnx`` → ``out.t0.01.onnx`` per tolerance."""
    if len(tolerances) == 1:
        return [output]
    stem, dot, suffix = output.rpartition(".")
    if not dot or "/" in suffix:
        stem, suffix = output, ""
    return [f"{stem}.t{t:g}" + (f".{suffix}" if suffix else "") for t in tolerances]


def _named(values: list[str], option: str, parse) -> dict:
    result = {}
    for value in values:
        name, sep, rest = value.rpartition(":")
        if not sep or not name:
            raise InputError(f"{option} {value}: expected NAME:VALUES")
        try:
            result[name] = parse(rest)
        except ValueError:
            raise InputError(f"{option} {value}: cannot parse '{rest}'") from None
    return result


def _shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in text.split(","))
    if any(d < 1 for d in dims):
        raise ValueError
    return dims


def _range(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    if not low < high:
        raise ValueError
    return low, high


def _load_npz(path: str):
    """The archive, read lazily: only the arrays named by the model's inputs are ever decompressed."""
    if not os.path.isfile(path):
        raise InputError(f"--probe-inputs {path}: not a regular file")
    try:
        import numpy as np

        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(f"--probe-inputs {path}: cannot read ({err})") from None


def _written(write, path: str, written: list[str]) -> None:
    """Run ``write`` (of ``path``); an OS error (disk full, permission denied) is the user's to fix.
    An interrupt meanwhile takes effect once ``path`` is written and counted."""
    from .model_io import interrupts_deferred

    try:
        with interrupts_deferred():
            write()
            if path not in written:
                written.append(path)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}; {_on_disk(written)}") from None


def _on_disk(written: list[str]) -> str:
    return f"{' and '.join(written)} written" if written else "nothing written"


def _also_on_disk(written: list[str], message: str) -> str:
    """With several tolerances, the outputs finished before the error stay: say so."""
    return f" ({_on_disk(written)} before this)" if written and _on_disk(written) not in message else ""


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def _interrupted(err: BaseException | None) -> bool:
    """Whether ``err`` was raised by, or while handling, a KeyboardInterrupt."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _numba_without_blas() -> None:
    """numba looks for a BLAS the first time a jitted function runs, by importing scipy.linalg where
    scipy is installed (0.2 s here, in every call that hashes); red_onnx's kernels use none. In the
    command's own process, numba is loaded with scipy.linalg hidden, which it takes for no BLAS;
    scipy.linalg imports as usual afterwards (a --metric function may use it)."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # an import of it raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401 (its BLAS check runs once, at import)
    except ImportError:  # no numba: the pipeline's import says so
        pass
    finally:
        del sys.modules["scipy.linalg"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    start = time.perf_counter()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    written: list[str] = []  # what is on disk, for the message if writing the rest fails
    try:
        input_shapes = _named(args.input_shape, "--input-shape", _shape)  # a typo is told before the libraries load
        probe_ranges = _named(args.probe_range, "--probe-range", _range)
        from . import model_io  # numpy, onnx and onnxruntime load here: --help and --version need none of them
        from . import metric
        from .pipeline import compress, compress_each
        from .report import Report

        _numba_without_blas()  # before the first jitted call, which would look for a BLAS

        tolerances = list(dict.fromkeys(args.tolerance or [DEFAULT_TOLERANCE]))
        search = args.metric is not None and args.tolerance is None  # else each tolerance is scored
        outputs = output_paths(args.output, tolerances[:1] if search else tolerances)
        if not args.dry_run:
            for output in outputs:
                model_io.check_output_path(output, [args.input])
        if args.report:
            model_io.check_output_path(args.report, [args.input] + [p for o in outputs for p in (o, o + ".data")])
        if args.profile:
            model_io.check_output_path(args.profile, [p for p in (args.input, args.report) if p] + outputs)

        options = dict(passes=args.passes, seed=args.seed, check=args.check,
                       input_shapes=input_shapes,
                       probe_inputs=_load_npz(args.probe_inputs) if args.probe_inputs else None,
                       probe_ranges=probe_ranges, exclude=args.exclude,
                       verify_result=not args.no_verify, latency_check=not args.no_latency_check,
                       codebook=args.codebook, profile=args.profile, log=None if args.quiet else log)
        if search:
            results = [(None, *compress(args.input, metric=args.metric, max_drop=args.max_drop,
                                        max_evals=args.max_evals, **options))]
        else:
            results = compress_each(args.input, tolerances, **options)
            if args.metric is not None:
                results = metric.scored_each(args.input, results, metric.load(args.metric), args.max_drop)
        reports = []
        for output, (_, model, report) in zip(outputs, results):
            if not args.dry_run:
                log(f"writing {output}")
                _written(lambda: model_io.save(model, output, external_data=True if args.external_data else None),
                         output, written)
            del model
            reports.append(report)
            if args.report:
                text = reports[0].to_json() if len(outputs) == 1 else Report.many_to_json(reports, outputs)
                _written(lambda: model_io.write_text(args.report, text), args.report, written)
        if not args.quiet:
            print(reports[0].table() if len(outputs) == 1 else Report.summary(reports, outputs))
            if args.dry_run:
                print("dry run: nothing written")
        return EXIT_OK
    except InputError as err:
        if args.debug and err.__cause__ is not None:  # e.g. the traceback of a failing --metric
            traceback.print_exception(err.__cause__)
        print(f"red-onnx: error: {err}" + _also_on_disk(written, str(err)), file=sys.stderr)
        return EXIT_INPUT
    except VerificationError as err:
        print(f"red-onnx: verification failed: {err}" + _also_on_disk(written, str(err)), file=sys.stderr)
        return EXIT_VERIFY
    except KeyboardInterrupt:
        print(f"red-onnx: interrupted; {_on_disk(written)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if _interrupted(err):  # a Ctrl-C that a library wrapped (numba's import, in a __set_name__)
            print(f"red-onnx: interrupted; {_on_disk(written)}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if args.debug:
            traceback.print_exc()
        else:
            print(f"red-onnx: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback, "
                  "and please report it)", file=sys.stderr)
        return EXIT_BUG
