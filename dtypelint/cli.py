"""Find dtype conflicts in a PyTorch model before the backend does: check a checkpoint, a config or your
own model function against a backend's kernels, and fix what can be fixed.

Exit codes: 0 no finding at or above ``--fail-on``; 1 findings at or above it; 2 anything else: a usage
error, a model, config or rule pack that could not be loaded, an internal error, an interrupt (Ctrl-C).
Every failure is one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tomllib
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from dtypelint.errors import DtypelintError, LoadError, UsageError, WriteError, first_line
from dtypelint.escape import printable
from dtypelint.formats import FORMATS, PRECISION_FORMATS
from dtypelint.paths import (
    GRAPH_SUFFIXES,
    check_output_file,
    find_pyproject,
    local_path,
    reason,
    refuse_weights_file,
    shown,
    unsupported_graph_suffix,
)
from dtypelint.rule_docs import find_rule_doc, shipped_rule_docs
from dtypelint.shipped import available_packs, is_pack_path, shipped_pack

if TYPE_CHECKING:
    from dtypelint.config import Settings
    from dtypelint.plan import FixResult
    from dtypelint.report import Report

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
STDOUT_FD, STDERR_FD = 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line with a pointer to ``--help`` instead of a usage block, raised so that
    main() reports them like every other error. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dtypelint", description=__doc__.split("\n\n")[0].replace("\n", " "),
                     epilog="Exit codes: 0 clean, 1 findings at or above --fail-on, 2 usage or load error, "
                            "internal error or interrupt. `dtypelint COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    check = commands.add_parser("check", help="audit a checkpoint directory or a config",
                                description="Audit a checkpoint directory, a config (meta mode) or an --entry "
                                            "function's (model, inputs), and report or fix the dtype conflicts.")
    _model_arguments(check, path_help="checkpoint directory, or a config.json / directory without weights")
    check.add_argument("--static", action="store_true",
                       help="no forward: the stored dtype census from safetensors headers against config.json")
    check.add_argument("--graph", metavar="FILE", help="write the dtype graph (.json, .graphml, .dot, .mmd)")
    check.add_argument("--dtype", help="float16|bfloat16|float32|auto (default: the config's); a diffusers pipeline's "
                                       "per-component dtypes as text_encoder=float32,default=float16")
    check.add_argument("--pack", action="append", dest="packs", metavar="PACK",
                       help="an extra rule pack whose contracts join the backend's (repeatable)")
    check.add_argument("--mode", choices=("value", "meta"), help="value (real weights) or meta (config only)")
    check.add_argument("--max-ops", type=_positive_int, metavar="N", help="ops recorded per forward (default: 200000)")
    check.add_argument("--steps", type=_positive_int, metavar="N",
                       help="calls traced of a generative model: the prompt, then N-1 decode steps fed the cache "
                            "it returned (default: 2; 1: the prompt only)")
    check.add_argument("--format", choices=tuple(FORMATS), default="text", help="output format (default: text)")
    check.add_argument("--fail-on", choices=("info", "warning", "error"),
                       help="lowest severity that makes the exit code 1 (default: error)")
    check.add_argument("--exit-zero", action="store_true", help="exit 0 whatever the findings")
    check.add_argument("--select", type=_codes, help="comma-separated codes, prefixes or names")
    check.add_argument("--ignore", type=_codes, help="comma-separated codes, prefixes or names to leave out")
    check.add_argument("--extend-select", type=_codes, help="codes, prefixes or names to add to the selection")
    fixes = check.add_argument_group("fixes (value mode)")
    fixes.add_argument("--fix", action="store_true", help="apply the safe fixes in memory, verified by a re-audit")
    fixes.add_argument("--unsafe-fixes", action="store_true", help="also the fixes that may cost precision")
    fixes.add_argument("--diff", action="store_true", help="list the casts a fix would make; change nothing")
    fixes.add_argument("--write-plan", metavar="FILE", help="write the fix plan (JSON) for dtypelint.apply_plan")
    fixes.add_argument("--save-fixed", metavar="DIR", help="save_pretrained the fixed model into a new directory")
    fixes.add_argument("--force", action="store_true", help="let --save-fixed replace a non-empty directory")

    precision = commands.add_parser(
        "precision", help="which modules must stay float32 for a float16/bfloat16 deployment",
        description="Find the fewest modules to keep in float32 (islands) for the model to run in --dtype within "
                    "the tolerance of a float32 run, verified; or the dtype that works. Exit 0: the dtype is fine "
                    "as is; 1: a plan or another dtype is needed; 2: usage or load error.")
    _model_arguments(precision, path_help="checkpoint directory (real weights)")
    precision.add_argument("--dtype", default="float16", help="float16|bfloat16 to deploy in (default: float16)")
    precision.add_argument("--tolerance", type=_positive_float, metavar="X",
                           help="output error accepted, max |output - reference| / max |reference| (default: per "
                                "output kind: logits and hidden states 1e-2 in float16, 6e-2 in bfloat16)")
    precision.add_argument("--reference", default="float32", help="float32|float64 reference (default: float32)")
    precision.add_argument("--max-keep", type=_positive_int, metavar="N",
                           help="most modules a plan may keep in float32; past it another dtype is recommended")
    precision.add_argument("--format", choices=PRECISION_FORMATS, default="text", help="output format (default: text)")
    precision.add_argument("--write-plan", metavar="FILE", help="write the plan (JSON) for dtypelint.apply_plan")

    rules = commands.add_parser("rules", help="list the rules: code, name, pack, severity, fix, enabled")
    rules.add_argument("--backend", action="append", metavar="PACK",
                       help="only the generic rules and this pack's (default: every shipped pack)")
    rules.add_argument("--format", choices=("text", "markdown"), default="text",
                       help="a terminal table, or Markdown (the README's table)")
    rules.add_argument("--config", help="pyproject.toml whose selection says which rules are enabled")
    explain = commands.add_parser("explain", help="print a rule's documentation")
    explain.add_argument("code", help="a rule code (DT101) or name (mixed-input)")
    return parser


def _model_arguments(command: argparse.ArgumentParser, *, path_help: str) -> None:
    """What the commands that load a model share: where it comes from, how it is built and fed, the backend."""
    command.add_argument("path", nargs="?", help=path_help)
    command.add_argument("--entry", metavar="MODULE:FUNCTION",
                         help="a function returning (model, inputs), imported as `python -m` would (from here)")
    loudness = command.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true",
                          help="no progress bars, and nothing from other packages")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="show other packages' warnings and log lines as they come (default: counted in "
                               "one line on stderr)")
    command.add_argument("--backend", action="append", metavar="PACK",
                         help="rule pack name or path, repeatable or comma-separated for a device and a quantization "
                              f"pack (shipped: {', '.join(available_packs())}; default: hf-eager)")
    command.add_argument("--model-class", metavar="NAME",
                         help="the transformers class to build (default: the one config.architectures names, "
                              "else the first task mapping with one for the model_type)")
    command.add_argument("--inputs-dtype", metavar="DTYPE",
                         help="dtype of the synthesized float inputs (default: the compute dtype, as a pipeline casts "
                              "them; float32 audits a pipeline that forgets the cast)")
    command.add_argument("--attn-implementation", metavar="NAME",
                         help="the attention the deployment runs (flash_attention_2: checked with a CPU stand-in)")
    command.add_argument("--config", help="pyproject.toml to read [tool.dtypelint] from (default: the nearest)")
    command.add_argument("--batch", type=_positive_int, default=1, help="sample batch size (default: 1)")
    command.add_argument("--seq-len", type=_positive_int, default=16,
                         help="sample length (default: 16; at most the config's max_position_embeddings)")
    command.add_argument("--max-input-elements", type=_positive_int, metavar="N",
                         help="elements each input synthesized from the config may have, in value mode "
                              "(default: 33554432)")
    command.add_argument("--max-layers", type=_positive_int, metavar="N",
                         help="layers per stack, or experts per layer, a config may ask for (default: 1024)")
    command.add_argument("--trust-remote-code", action="store_true",
                         help="run the checkpoint's own modeling code (auto_map); only for code you trust")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dtypelint")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _codes(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _settings(options: argparse.Namespace) -> Settings:
    """[tool.dtypelint] with the command line on top; ``--dtype auto`` means the checkpoint's own dtype."""
    from dtypelint.config import load_settings

    return load_settings(options.config).layered({
        "backend": options.backend, "packs": options.packs, "select": options.select, "ignore": options.ignore,
        "extend_select": options.extend_select, "fail_on": options.fail_on, "dtype": _default_dtype(options.dtype),
        "attn_implementation": options.attn_implementation,
        "options": {name: getattr(options, name) for name in ("max_ops", "max_input_elements", "max_layers", "steps")
                    if getattr(options, name)} or None,
    })


def _default_dtype(value: str | None) -> str | None:
    """``--dtype``'s dtype for everything: the value, or the ``default=`` part of per-component dtypes."""
    if value is None or "=" not in value:
        return value
    parts = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
    return parts.get("default")


def _check(options: argparse.Namespace) -> int:
    """Everything that runs the user's code (the entry, the model) writes its stdout to stderr: stdout holds
    the report alone, which ``--format json`` readers parse."""
    path = _preflight(options)
    progress = not options.quiet and sys.stderr.isatty()
    with _library_noise(options, progress=progress), _stdout_to_stderr():
        report, fail_on, fixed = _run_check(options, path, progress)
    return _print(options, report, fail_on, fixed)


class _StderrStream(io.TextIOBase):
    """``sys.stdout`` while user code runs: writes go to stderr, and closing it closes nothing."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def fileno(self) -> int:
        return sys.stderr.fileno()

    def close(self) -> None:
        """A forward's ``sys.stdout.close()`` must not close the stream the report goes to."""


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Python's ``sys.stdout`` and the process's descriptor 1 point at stderr (native code and
    ``print(file=sys.__stdout__)`` write there), and are restored afterwards."""
    stdout = sys.stdout
    for stream in (stdout, sys.__stdout__):
        with suppress(OSError, ValueError, AttributeError):
            stream.flush()
    try:
        saved = os.dup(STDOUT_FD)
        os.dup2(STDERR_FD, STDOUT_FD)
    except OSError:  # no descriptor 1 (a closed stdout): Python's stream is all there is
        saved = None
    sys.stdout = _StderrStream()
    try:
        yield
    finally:
        sys.stdout = stdout
        if saved is not None:
            with suppress(OSError, ValueError, AttributeError):
                sys.__stdout__.flush()
            os.dup2(saved, STDOUT_FD)
            os.close(saved)


def _preflight(options: argparse.Namespace) -> Path | None:
    """Everything that can be checked without torch, checked before importing it: a usage error costs
    well under a second. Returns the checkpoint or config path (None for --entry)."""
    from dtypelint.dtypes import dtype_attribute

    if options.static and options.entry:
        raise UsageError("--static reads a checkpoint's safetensors headers; an --entry function has none")
    if options.save_fixed and not options.fix:
        raise UsageError("--save-fixed needs --fix")
    if options.dtype and options.dtype.strip().lower() != "auto":
        for part in options.dtype.split(","):
            dtype_attribute(part.partition("=")[2] if "=" in part else part, also=("auto",))
    _check_model_options(options, packs=options.packs or [])
    _check_outputs(options)
    return _model_path(options)


def _check_model_options(options: argparse.Namespace, *, packs: Sequence[str] = ()) -> None:
    """The checks of ``_model_arguments`` that need no torch."""
    from dtypelint.dtypes import dtype_attribute

    if options.entry and options.path is not None:
        raise UsageError("give a PATH or --entry MODULE:FUNCTION, not both")
    if options.inputs_dtype:
        dtype_attribute(options.inputs_dtype)
    if options.entry and (options.model_class or options.inputs_dtype):
        raise UsageError("--model-class and --inputs-dtype choose how a checkpoint or config is built and fed; "
                         "an --entry function returns its own model and inputs")
    for name in _codes(",".join(options.backend or [])) + list(packs):
        if not is_pack_path(name):
            shipped_pack(name)


def _model_path(options: argparse.Namespace) -> Path | None:
    """The checkpoint or config directory the command reads (None for --entry), checked to exist."""
    if options.entry:
        return None
    if options.path is None:
        raise UsageError(f"{options.command} needs a PATH (or --entry MODULE:FUNCTION)")
    path = local_path(options.path)
    refuse_weights_file(path)
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as error:
            raise LoadError(f"{shown(path)}: cannot read: {reason(error)}") from None
        if empty:
            raise LoadError(f"{shown(path)} is an empty directory")
    return path


@contextmanager
def _library_noise(options: argparse.Namespace, *, progress: bool) -> Iterator[None]:
    """What other packages say while dtypelint loads and traces (transformers' deprecation warnings, ipex-llm's
    "Converting the current model to sym_int4 format", torch's "Initializing zero-element tensors"): shown as
    it comes with ``-v``, dropped with ``-q``, else held and counted in one line on stderr afterwards.
    dtypelint's own warnings always show. Without progress, no progress bars. Everything is restored
    afterwards: main() also runs in-process (tests, scripts)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    held: dict[str, int] = {}  # what kind (a warning's category, a logger's package) -> how many
    with warnings.catch_warnings(record=not options.verbose) as caught, _held_log_lines(held, options.verbose):
        if not progress:
            transformers_logging.disable_progress_bar()
        if not options.verbose:
            warnings.simplefilter("default")  # each distinct warning once, as Python shows them
        try:
            yield
        finally:
            transformers_logging.set_verbosity(verbosity)
            (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()
    for warning in caught or ():
        if Path(warning.filename).resolve().is_relative_to(_PACKAGE):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        else:
            held[warning.category.__name__] = held.get(warning.category.__name__, 0) + 1
    if held and not options.quiet:
        count = sum(held.values())
        print(f"dtypelint: other packages printed {count} warning{'s' if count != 1 else ''} or log "
              f"line{'s' if count != 1 else ''} while loading and tracing ({', '.join(held)}); -v shows them",
              file=sys.stderr)


_PACKAGE = Path(__file__).resolve().parent


@contextmanager
def _held_log_lines(held: dict[str, int], verbose: bool) -> Iterator[None]:
    """Log lines that stream handlers would write to stderr (or to stdout, which points there) are counted
    in ``held`` by the logger's package instead, unless ``verbose``; errors, dtypelint's own lines and
    handlers that write elsewhere (a file, a test's capture) are left alone."""
    if verbose:
        yield
        return
    emit = logging.StreamHandler.emit
    terminal = (sys.stderr, sys.__stderr__, sys.stdout, sys.__stdout__)

    def hold(handler: logging.StreamHandler, record: logging.LogRecord) -> None:
        package = record.name.split(".")[0]
        to_terminal = handler.stream in terminal or isinstance(handler.stream, _StderrStream)
        if not to_terminal or record.levelno > logging.WARNING or package == "dtypelint":
            emit(handler, record)
        else:
            held[f"{package} log"] = held.get(f"{package} log", 0) + 1

    logging.StreamHandler.emit = hold  # type: ignore[method-assign]
    try:
        yield
    finally:
        logging.StreamHandler.emit = emit  # type: ignore[method-assign]


def _run_check(options: argparse.Namespace, path: Path | None, progress: bool) -> tuple[Report, str, FixResult | None]:
    """The report to print, the --fail-on threshold, and what a fix did."""
    from dtypelint.dtypes import parse_dtype
    from dtypelint.load import Request, find_loader
    from dtypelint.pipeline import audit_loaded
    from dtypelint.progress import progress_bar
    from dtypelint.save import PLAN_FILE

    settings = _settings(options)
    if options.static and path is not None:
        return _static(options, path, settings), settings.fail_on, None
    request = Request(path=path, entry=options.entry, mode=options.mode, dtype=parse_dtype(settings.dtype),
                      batch=options.batch, seq_len=options.seq_len, trust_remote_code=options.trust_remote_code,
                      model_class=options.model_class, inputs_dtype=parse_dtype(options.inputs_dtype),
                      max_input_elements=settings.options.max_input_elements, max_layers=settings.options.max_layers,
                      component_dtypes=_component_dtypes(options.dtype))
    loader = find_loader(request)
    if _fixing(options) and loader.mode == "meta":
        raise UsageError("fixes need real weights: --fix, --diff, --write-plan and --save-fixed work in value mode")
    with progress_bar(progress, f"loading ({loader.name})"):
        loaded = loader.load(request)
    report = audit_loaded(loaded, settings=settings, progress=progress)
    if path is not None and (path / PLAN_FILE).is_file():
        report.notes.append(
            f"{PLAN_FILE} holds a fix plan: checkpoints do not store non-persistent buffers, so apply it after "
            f"every load: dtypelint.apply_plan(model, {str(path / PLAN_FILE)!r})"
        )
    if options.graph:
        from dtypelint.drawing import write_graph

        write_graph(report.graph, options.graph, sources=_sources(options))
    if _fixing(options):
        fixed = _fix(options, loaded.model, report)
        return (fixed.after if fixed.changed else report), settings.fail_on, fixed
    return report, settings.fail_on, None


def _precision(options: argparse.Namespace) -> int:
    """``dtypelint precision``: exit 0 when the dtype is fine as is, 1 when a plan or another dtype is needed."""
    from dtypelint.dtypes import dtype_attribute

    dtype_attribute(options.dtype)
    dtype_attribute(options.reference)
    _check_model_options(options)
    if options.write_plan:
        check_output_file("--write-plan", options.write_plan, _sources(options))
    path = _model_path(options)
    progress = not options.quiet and sys.stderr.isatty()
    with _library_noise(options, progress=progress), _stdout_to_stderr():
        plan = _run_precision(options, path, progress)
    if options.write_plan:
        _write_plan(plan, options, "the precision plan")
    from dtypelint.formats.precision import render_precision

    _write_stdout(render_precision(plan, options.format))
    return EXIT_CLEAN if plan.fine_as_is else EXIT_FINDINGS


def _run_precision(options: argparse.Namespace, path: Path | None, progress: bool) -> Any:
    from dtypelint.advisor import precision
    from dtypelint.config import load_settings
    from dtypelint.dtypes import parse_dtype
    from dtypelint.load import Request, find_loader, has_weights
    from dtypelint.progress import progress_bar

    if path is not None and not has_weights(path):
        raise UsageError(f"{shown(path)} holds no weights (*.safetensors, pytorch_model*.bin): precision measures "
                         "real outputs")
    settings = load_settings(options.config).layered({
        "backend": options.backend, "attn_implementation": options.attn_implementation,
        "options": {name: getattr(options, name) for name in ("max_input_elements", "max_layers")
                    if getattr(options, name)} or None,
    })
    reference = parse_dtype(options.reference)
    request = Request(path=path, entry=options.entry, mode="value", dtype=reference, batch=options.batch,
                      seq_len=options.seq_len, trust_remote_code=options.trust_remote_code,
                      model_class=options.model_class, max_input_elements=settings.options.max_input_elements,
                      max_layers=settings.options.max_layers)
    loader = find_loader(request)
    with progress_bar(progress, f"loading ({loader.name})"):
        loaded = loader.load(request)
    with progress_bar(progress, "planning"):
        return precision(loaded.model, loaded.inputs, options.dtype, reference=reference,
                         tolerance=options.tolerance or settings.options.precision_tolerance,
                         backend=list(settings.backend), max_keep=options.max_keep,
                         attn_implementation=settings.attn_implementation,
                         inputs_dtype=parse_dtype(options.inputs_dtype))


def _component_dtypes(value: str | None) -> dict[str, Any] | None:
    """``--dtype text_encoder=float32,default=float16``: a diffusers pipeline's per-component dtypes."""
    from dtypelint.diffusion import parse_component_dtypes

    return parse_component_dtypes(value) if value and "=" in value else None


def _check_outputs(options: argparse.Namespace) -> None:
    """The one place where output paths are checked, before anything is loaded rather than after a long
    audit."""
    from dtypelint.save import check_save_target

    if options.graph:
        suffix = Path(options.graph).suffix.lower()
        if suffix not in GRAPH_SUFFIXES:
            raise UsageError(f"--graph {shown(options.graph)}: {unsupported_graph_suffix(suffix)}")
        check_output_file("--graph", options.graph, _sources(options))
    if options.write_plan:
        check_output_file("--write-plan", options.write_plan, _sources(options))
    if options.save_fixed:
        check_save_target(options.save_fixed, sources=_sources(options), force=options.force)


def _sources(options: argparse.Namespace) -> list[str]:
    """The checkpoint every output must stay clear of."""
    return [options.path] if options.path else []


def _fixing(options: argparse.Namespace) -> bool:
    return bool(options.fix or options.diff or options.write_plan or options.save_fixed)


def _static(options: argparse.Namespace, path: Path, settings: Settings) -> Report:
    from dtypelint.pipeline import audit_static

    if _fixing(options):
        raise UsageError("fixes need a forward: --static reads headers only")
    if options.graph:
        raise UsageError("--graph needs a forward: --static reads headers only")
    return audit_static(path, settings=settings)


def _write_plan(plan: Any, options: argparse.Namespace, what: str) -> None:
    """Write ``--write-plan`` and say so: a file written silently is a file nobody finds."""
    from dtypelint.paths import shown

    plan.write(options.write_plan, sources=_sources(options))
    print(f"dtypelint: wrote {what} to {shown(Path(options.write_plan))}", file=sys.stderr)


def _fix(options: argparse.Namespace, model: Any, report: Report) -> FixResult:
    from dtypelint.fixes import fix
    from dtypelint.save import save_fixed

    result = fix(model, report, unsafe=options.unsafe_fixes, dry_run=not options.fix)
    if options.write_plan:
        _write_plan(result.plan, options, "the fix plan")
    if options.save_fixed and result.changed:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result.saved = save_fixed(model, options.save_fixed, result.plan, source=options.path, force=options.force)
        for warning in caught:
            print(f"dtypelint: {warning.message}", file=sys.stderr)
    elif options.save_fixed:
        result.not_saved = options.save_fixed
    if options.entry and result.changed:
        casts = ", ".join(f"{change.tensor} -> {change.to_dtype}" for change in result.changed)
        result.remarks.append(f"applied in memory only: {options.entry} builds the model anew each run, so make the "
                              f"same casts where it does ({casts}), or write them with --write-plan and call "
                              f"dtypelint.apply_plan(model, FILE) after building")
    return result


def _print(options: argparse.Namespace, report: Report, fail_on: str, fixed: FixResult | None = None) -> int:
    """Every output goes through the renderers of ``dtypelint.formats``: the audit's, the fix's, --static's."""
    from dtypelint.formats import render

    _write_stdout(render(report, options.format, path=options.path, fix=fixed))
    failing = report.at_or_above(fail_on)
    return EXIT_FINDINGS if failing and not options.exit_zero else EXIT_CLEAN


def _write_stdout(output: str) -> None:
    """The command's output on stdout, or a WriteError saying why it cannot be written."""
    if output:
        try:
            encoding = sys.stdout.encoding or "utf-8"  # a terminal that cannot show a character gets its escape
            sys.stdout.write(output.encode(encoding, "backslashreplace").decode(encoding) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as error:  # /dev/full, a closed stdout
            _discard_stdout()
            problem = reason(error) if isinstance(error, OSError) else first_line(error)
            raise WriteError(f"cannot write the report to stdout: {problem}") from None


def _rules(options: argparse.Namespace) -> int:
    from dtypelint.formats.catalog import render_rules

    if options.backend is None and options.config is None and not _configured(find_pyproject()):
        # The shipped rules, every one enabled: the catalog, without importing torch.
        print(render_rules(shipped_rule_docs(), options.format))
        return EXIT_CLEAN
    from dtypelint.config import load_settings
    from dtypelint.rules import all_rules

    settings = load_settings(options.config)
    rules = settings.layered({"backend": options.backend}).rules if options.backend else all_rules()
    print(render_rules(rules, options.format, enabled=settings.selection.enabled))
    return EXIT_CLEAN


def _configured(pyproject: Path | None) -> bool:
    """Whether a pyproject.toml may change the rule list (a ``[tool.dtypelint]`` table, or one it cannot read:
    the full path then says why)."""
    try:
        return pyproject is not None and "dtypelint" in tomllib.loads(pyproject.read_text("utf-8")).get("tool", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return True


def _explain(code: str) -> int:
    doc = find_rule_doc(code)  # the shipped rules: all that ``explain`` knows, as ``rules.find_rule``
    if doc is None:
        raise UsageError(f"unknown rule {code!r}; `dtypelint rules` lists them")
    print(doc.explanation())
    return EXIT_CLEAN


def main(argv: Sequence[str] | None = None) -> int:
    """The command's exit code. Every failure ends here as one line on stderr and exit code 2."""
    try:
        options = _parser().parse_args(argv)  # --help exits here with code 0
    except UsageError as error:
        return _fail(f"error: {error}")
    try:
        if options.command == "check":
            return _check(options)
        if options.command == "rules":
            return _rules(options)
        if options.command == "precision":
            return _precision(options)
        return _explain(options.code)
    except BrokenPipeError:  # `dtypelint check ... | head`: the reader left; say nothing more
        _discard_stdout()
        return EXIT_ERROR
    except BaseException as error:  # noqa: BLE001 - the boundary: no failure leaves as a traceback
        if options.debug:
            traceback.print_exc()
        return _fail(_describe(error))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what could not be written
    fails no more (it would print "Exception ignored" and exit 120)."""
    with suppress(OSError, ValueError, io.UnsupportedOperation):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _describe(error: BaseException) -> str:
    if isinstance(error, DtypelintError):
        return f"error: {first_line(error)}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, SystemExit):  # dtypelint's commands return; only the code under audit exits
        return f"error: the code under audit called sys.exit({error.code!r})"
    return f"internal error: {type(error).__name__}: {first_line(error)}; rerun with --debug"


def _fail(message: str) -> int:
    with suppress(OSError, ValueError):
        sys.stdout.flush()
    print(f"dtypelint: {printable(message)}", file=sys.stderr, flush=True)  # errors quote the model's code
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
