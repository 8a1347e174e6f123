"""The ``dtypelint`` command.

Exit codes: 0 no finding at or above ``--fail-on``; 1 findings at or above it; 2 anything else: a usage
error, a model, config or rule pack that could not be loaded, an internal error, an interrupt (Ctrl-C).
Every failure is one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from dtypelint.errors import DtypelintError, LoadError, UsageError, first_line
from dtypelint.shipped import available_packs

if TYPE_CHECKING:
    from dtypelint.config import Settings
    from dtypelint.report import Report

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line with a pointer to ``--help`` instead of a usage block, raised so that
    main() reports them like every other error. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dtypelint", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="audit a checkpoint directory or a config")
    check.add_argument("path", nargs="?", help="checkpoint directory, or a config.json / directory without weights")
    check.add_argument("--entry", metavar="MODULE:FUNCTION", help="a function returning (model, inputs)")
    check.add_argument("--static", action="store_true",
                       help="no forward: the stored dtype census from safetensors headers against config.json")
    check.add_argument("--graph", metavar="FILE", help="write the dtype graph (.json, .graphml, .dot, .mmd)")
    check.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    check.add_argument("--dtype", help="float16|bfloat16|float32|auto (default: the config's)")
    check.add_argument("--backend", action="append", metavar="PACK",
                       help="rule pack name or path, repeatable or comma-separated for a device and a quantization "
                            f"pack (shipped: {', '.join(available_packs())}; default: hf-eager)")
    check.add_argument("--pack", action="append", dest="packs", metavar="PACK",
                       help="an extra rule pack whose contracts join the backend's (repeatable)")
    check.add_argument("--attn-implementation", metavar="NAME",
                       help="the attention the deployment runs (flash_attention_2: checked with a CPU stand-in)")
    check.add_argument("--config", help="pyproject.toml to read [tool.dtypelint] from (default: the nearest)")
    check.add_argument("--mode", choices=("value", "meta"), help="value (real weights) or meta (config only)")
    check.add_argument("--batch", type=_positive_int, default=1)
    check.add_argument("--seq-len", type=_positive_int, default=16,
                       help="sample length (at most the config's max_position_embeddings)")
    check.add_argument("--max-ops", type=_positive_int, metavar="N", help="ops recorded per forward (default: 200000)")
    check.add_argument("--format", choices=("text", "json", "sarif", "github", "markdown"), default="text")
    check.add_argument("--fail-on", choices=("info", "warning", "error"))
    check.add_argument("--exit-zero", action="store_true", help="exit 0 whatever the findings")
    check.add_argument("--select", type=_codes, help="comma-separated codes, prefixes or names")
    check.add_argument("--ignore", type=_codes)
    check.add_argument("--extend-select", type=_codes)
    check.add_argument("--trust-remote-code", action="store_true")
    fixes = check.add_argument_group("fixes (value mode)")
    fixes.add_argument("--fix", action="store_true", help="apply the safe fixes in memory, verified by a re-audit")
    fixes.add_argument("--unsafe-fixes", action="store_true", help="also the fixes that may cost precision")
    fixes.add_argument("--diff", action="store_true", help="list the casts a fix would make; change nothing")
    fixes.add_argument("--write-plan", metavar="FILE", help="write the fix plan (JSON) for dtypelint.apply_plan")
    fixes.add_argument("--save-fixed", metavar="DIR", help="save_pretrained the fixed model into a new directory")
    fixes.add_argument("--force", action="store_true", help="let --save-fixed replace a non-empty directory")

    rules = commands.add_parser("rules", help="list the rules")
    rules.add_argument("--backend", action="append", metavar="PACK",
                       help="only the generic rules and this pack's (repeatable, or a comma list)")
    explain = commands.add_parser("explain", help="print a rule's documentation")
    explain.add_argument("code")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _codes(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _has_weights(path: Path) -> bool:
    return path.is_dir() and any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS)


def _settings(options: argparse.Namespace) -> Settings:
    """[tool.dtypelint] with the command line on top; ``--dtype auto`` means the checkpoint's own dtype."""
    from dtypelint.config import load_settings

    return load_settings(options.config).layered({
        "backend": options.backend, "packs": options.packs, "select": options.select, "ignore": options.ignore,
        "extend_select": options.extend_select, "fail_on": options.fail_on, "dtype": options.dtype,
        "attn_implementation": options.attn_implementation,
        "options": {"max_ops": options.max_ops} if options.max_ops else None,
    })


def _check(options: argparse.Namespace) -> int:
    progress = not options.quiet and sys.stderr.isatty()
    with _library_noise(quiet=options.quiet, progress=progress):
        return _run_check(options, progress)


@contextmanager
def _library_noise(*, quiet: bool, progress: bool) -> Iterator[None]:
    """Without progress, no progress bars; with ``-q``, no library warnings or log lines (transformers'
    load reports, ipex-llm banners, torch's pickle warnings) either, so a failure is one line on stderr.
    Everything is restored afterwards: main() also runs in-process (tests, scripts)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    logging_disabled = logging.root.manager.disable
    with warnings.catch_warnings():
        if not progress:
            transformers_logging.disable_progress_bar()
        if quiet:
            transformers_logging.set_verbosity_error()
            logging.disable(logging.WARNING)
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers_logging.set_verbosity(verbosity)
            (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()
            logging.disable(logging_disabled)


def _run_check(options: argparse.Namespace, progress: bool) -> int:
    from dtypelint.audit import audit, audit_config
    from dtypelint.dtypes import parse_dtype
    from dtypelint.load import (
        check_sample_size,
        config_dtype,
        load_checkpoint,
        load_config,
        load_entry,
        local_path,
        refuse_weights_file,
        sample_inputs,
    )
    from dtypelint.save import PLAN_FILE

    if options.save_fixed and not options.fix:
        raise UsageError("--save-fixed needs --fix")
    _check_outputs(options)
    settings = _settings(options)
    dtype = parse_dtype(settings.dtype)
    if options.entry:
        model, inputs = load_entry(options.entry)
        report = audit(model, inputs, dtype=dtype, settings=settings, progress=progress)
        return _finish(options, report, settings, model=model, inputs=inputs, dtype=dtype)
    if options.path is None:
        raise UsageError("check needs a PATH (or --entry MODULE:FUNCTION)")
    path = local_path(options.path)
    refuse_weights_file(path)
    if path.is_dir() and not any(path.iterdir()):
        raise LoadError(f"{path} is an empty directory")
    if options.static:
        return _static(path, settings.fail_on, options.exit_zero)
    mode = options.mode or ("value" if _has_weights(path) else "meta")
    if _fixing(options) and mode == "meta":
        raise UsageError("fixes need real weights: --fix, --diff, --write-plan and --save-fixed work in value mode")
    if mode == "value" and not _has_weights(path):
        raise UsageError(f"{path} holds no weights (*.safetensors, pytorch_model*.bin); use --mode meta")
    config = load_config(path, trust_remote_code=options.trust_remote_code)
    check_sample_size(config, batch=options.batch, seq_len=options.seq_len, real=mode == "value")  # before loading
    if mode == "meta":
        report = audit_config(
            config, dtype=dtype, batch=options.batch, seq_len=options.seq_len,
            trust_remote_code=options.trust_remote_code, settings=settings, progress=progress,
        )
        return _finish(options, report, settings)
    load_dtype = dtype or config_dtype(config)
    model = load_checkpoint(path, load_dtype, trust_remote_code=options.trust_remote_code)
    inputs = sample_inputs(model, config, batch=options.batch, seq_len=options.seq_len)
    report = audit(model, inputs, dtype=load_dtype, settings=settings, progress=progress)
    if (path / PLAN_FILE).is_file():
        report.notes.append(
            f"{PLAN_FILE} holds a fix plan: checkpoints do not store non-persistent buffers, so apply it after "
            f"every load: dtypelint.apply_plan(model, {str(path / PLAN_FILE)!r})"
        )
    return _finish(options, report, settings, model=model, inputs=inputs, dtype=load_dtype)


def _check_outputs(options: argparse.Namespace) -> None:
    """The one place where output paths are checked, before anything is loaded rather than after a long
    audit."""
    from dtypelint.graph import GRAPH_SUFFIXES, unsupported_graph_suffix
    from dtypelint.save import check_save_target

    if options.graph:
        _check_writable_file("--graph", options.graph)
        suffix = Path(options.graph).suffix.lower()
        if suffix not in GRAPH_SUFFIXES:
            raise UsageError(f"--graph {options.graph}: {unsupported_graph_suffix(suffix)}")
    if options.write_plan:
        _check_writable_file("--write-plan", options.write_plan)
    if options.save_fixed:
        check_save_target(options.save_fixed, sources=[options.path] if options.path else [], force=options.force)


def _check_writable_file(option: str, name: str) -> None:
    """``name`` must be a file (new or not) in an existing directory that we may create files in."""
    target = Path(name)
    if target.is_dir():
        raise UsageError(f"{option} {target} is a directory; name a file")
    parent = target.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"{option} {target}: {parent} {problem}")
    try:
        # Permission bits say nothing for root, and nothing about read-only file systems or /proc: try.
        with tempfile.TemporaryFile(dir=parent):
            pass
        if target.exists():
            target.open("ab").close()
    except OSError as error:
        raise UsageError(f"{option} {target}: cannot write there: {error.strerror or error}") from None


def _finish(options: argparse.Namespace, report: Report, settings: Settings, **fixable: Any) -> int:
    """Write the graph, then print the report, or fix and print both; the exit code."""
    if options.graph:
        try:
            report.graph.write(options.graph)
        except OSError as error:  # the preflight passed, but the disk may fill or the directory go
            raise UsageError(f"--graph {options.graph}: cannot write: {error.strerror or error}") from None
    if _fixing(options):
        return _fix(options, fixable["model"], report, fixable["inputs"], dtype=fixable["dtype"], settings=settings)
    return _print(options, report, settings.fail_on)


def _fixing(options: argparse.Namespace) -> bool:
    return bool(options.fix or options.diff or options.write_plan or options.save_fixed)


def _static(path: Path, fail_on: str, exit_zero: bool) -> int:
    """The stored dtype census against the dtype config.json declares: headers only, no weights read."""
    from collections import Counter

    from tabulate import tabulate

    from dtypelint.dtypes import dtype_name
    from dtypelint.load import config_dtype, load_config, stored_dtypes

    stored = stored_dtypes(path)
    declared = config_dtype(load_config(path))
    census = Counter(stored.values())
    print(tabulate(sorted(census.items()), headers=("stored dtype", "tensors")))
    floating = {"float64", "float32", "float16", "bfloat16"}
    others = sorted(name for name, dtype in stored.items()
                    if declared is not None and dtype in floating and dtype != dtype_name(declared))
    if declared is None:
        print(f"{path}: config.json declares no dtype")
    for name in others:
        print(f"warning: {name} is stored as {stored[name]}, config.json declares {dtype_name(declared)}")
    print(f"{path}: {len(stored)} tensors, {len(others)} stored in another floating dtype than declared")
    failing = others and fail_on in ("warning", "info")
    return EXIT_FINDINGS if failing and not exit_zero else EXIT_CLEAN


def _fix(options: argparse.Namespace, model: Any, report: Report, inputs: Any, **audit_options: Any) -> int:
    from dtypelint.fix import fix
    from dtypelint.save import save_fixed

    result = fix(model, report, inputs=inputs, unsafe=options.unsafe_fixes, dry_run=not options.fix, **audit_options)
    if options.write_plan:
        result.plan.write(options.write_plan)
    saved = None
    if options.save_fixed and result.changed:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saved = save_fixed(model, options.save_fixed, result.plan, source=options.path, force=options.force)
        for warning in caught:
            print(f"dtypelint: {warning.message}", file=sys.stderr)
    final = result.after if result.changed else report
    if options.format == "json":
        data = final.to_dict()
        data["fix"] = {
            "applied": bool(result.changed),
            "rolled_back": result.rolled_back,
            "reason": result.reason,
            "changes": result.plan.to_dict()["changes"],
            "output_change": result.output_change,
            "rope_error": result.rope_error,
            "unread": result.unread,
            "saved": str(saved) if saved else None,
        }
        print(json.dumps(data, indent=2))
    else:
        print(report.render())
        print(result.render())
        if saved:
            print(f"saved the fixed model and its fix plan to {saved}")
        elif options.save_fixed:
            print(f"nothing saved: no fix was applied, so {options.save_fixed} was not written")
    failing = final.at_or_above(audit_options["settings"].fail_on)
    return EXIT_FINDINGS if failing and not options.exit_zero else EXIT_CLEAN


def _print(options: argparse.Namespace, report: Report, fail_on: str) -> int:
    from dtypelint.formats import render

    output = render(report, options.format, path=options.path)
    if output:
        print(output)
    failing = report.at_or_above(fail_on)
    return EXIT_FINDINGS if failing and not options.exit_zero else EXIT_CLEAN


def _rules(backend: list[str] | None) -> int:
    from tabulate import tabulate

    from dtypelint.config import Settings
    from dtypelint.rules import all_rules

    rules = Settings().layered({"backend": backend}).rules if backend else all_rules()
    rows = [(rule.code, rule.name, rule.pack or "generic", rule.category, rule.severity, rule.summary) for rule in rules]
    headers = ("code", "name", "pack", "category", "severity", "summary")
    print(tabulate(rows, headers=headers, maxcolwidths=[None] * 5 + [70]))
    return EXIT_CLEAN


def _explain(code: str) -> int:
    from dtypelint.rules import find_rule

    rule = find_rule(code)
    print(f"# {rule.name} ({rule.code})\n\ncategory: {rule.category}, default severity: {rule.severity}, "
          f"fix: {rule.fix_availability}\n\n{rule.docs}")
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
            return _rules(options.backend)
        return _explain(options.code)
    except BrokenPipeError:  # `dtypelint check ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except BaseException as error:  # noqa: BLE001 - the boundary: no failure leaves as a traceback
        if options.debug:
            raise
        return _fail(_describe(error))


def _describe(error: BaseException) -> str:
    if isinstance(error, DtypelintError):
        return f"error: {first_line(error)}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, SystemExit):  # dtypelint's commands return; only the code under audit exits
        return f"error: the code under audit called sys.exit({error.code!r})"
    return f"internal error: {type(error).__name__}: {first_line(error)}; rerun with --debug"


def _fail(message: str) -> int:
    sys.stdout.flush()
    print(f"dtypelint: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
