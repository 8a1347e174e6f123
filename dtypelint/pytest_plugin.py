"""The pytest plugin: a ``dtypelint`` fixture, a ``dtypelint`` marker, options and a summary section.

Registered through the ``pytest11`` entry point (``-p no:dtypelint`` turns it off)::

    def test_model_dtypes(dtypelint):
        dtypelint.assert_clean(model, input_ids)            # fails with the findings table

    @pytest.mark.dtypelint(backend="ipex-llm-xpu", dtype="float16", ignore=["DT105"])
    def test_on_xpu(dtypelint):
        report = dtypelint.audit(model, input_ids)          # a dtypelint.Report

Where a setting comes from, highest first: keyword arguments of ``audit``/``assert_clean``; the
``dtypelint`` markers of the test (the closest one first: function, class, module); the command line
(``--dtypelint-backend``, ``--dtypelint-dtype``, ``--dtypelint-fail-on``); the ini options
(``dtypelint_backend``, ``dtypelint_dtype``, ``dtypelint_fail_on``); ``[tool.dtypelint]`` of the
rootdir's ``pyproject.toml``; the built-in defaults. Each layer changes only the keys it sets.
``dtype="auto"`` means the dtype of most of the model's parameters.

This module needs only ``dtypelint.report`` to load; the audit machinery is imported when a test first
uses the fixture or a ``--dtypelint-*`` / ``dtypelint_*`` option is set, so a pytest run that audits
nothing does not pay for importing torch.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dtypelint.diagnostics import SEVERITIES

if TYPE_CHECKING:
    from dtypelint.config import Settings
    from dtypelint.report import Report


RUN_KEYS = ("mode", "stats")  # besides the settings (dtypelint.config.SETTING_KEYS): how the forward runs
COMMAND_LINE_KEYS = ("backend", "dtype", "fail_on")  # also the ini options, prefixed dtypelint_
PROPERTY = "dtypelint"  # the name of the user_properties entry of each audit

_file_settings_key = pytest.StashKey["Settings | Exception"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dtypelint", "dtypelint: dtype audits of PyTorch models")
    group.addoption(
        "--dtypelint-backend", metavar="PACK", default=None,
        help="rule pack name or path for the dtypelint fixture (default: [tool.dtypelint] backend, hf-eager)",
    )
    group.addoption(
        "--dtypelint-dtype", metavar="DTYPE", default=None,
        help="intended compute dtype: float16|bfloat16|float32|auto (default: the model's own)",
    )
    group.addoption(
        "--dtypelint-fail-on", metavar="SEVERITY", choices=SEVERITIES, default=None,
        help="lowest severity that fails dtypelint.assert_clean: info|warning|error (default: error)",
    )
    parser.addini("dtypelint_backend", "rule pack name or path for the dtypelint fixture", default="")
    parser.addini("dtypelint_dtype", "intended compute dtype for the dtypelint fixture", default="")
    parser.addini("dtypelint_fail_on", "lowest severity that fails dtypelint.assert_clean", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "dtypelint(**options): defaults of the dtypelint fixture for this test: backend, dtype, fail_on, "
        "select, ignore, extend_select, per_location_ignores, severity, packs, options, mode, stats",
    )
    ini, command_line = _ini_layer(config), _command_line_layer(config)
    if ini or command_line:  # a typo on the command line or in the ini file fails before any test runs
        from dtypelint.config import Settings
        from dtypelint.errors import DtypelintError

        try:
            _layered(Settings(), [("the ini options", ini), ("the command line", command_line)])
        except DtypelintError as error:
            raise pytest.UsageError(f"dtypelint: {error}") from None
    config.pluginmanager.register(AuditSummary(), "dtypelint-summary")


@pytest.fixture
def dtypelint(request: pytest.FixtureRequest) -> DtypelintFixture:
    """Audit models for dtype conflicts: ``dtypelint.audit(model, inputs, **options)`` returns the
    report, ``dtypelint.assert_clean(model, inputs, **options)`` fails the test with the findings table
    when findings at or above ``fail_on`` exist. Defaults: ``@pytest.mark.dtypelint(...)``,
    ``--dtypelint-*``, ``dtypelint_*`` ini options, ``[tool.dtypelint]``."""
    return DtypelintFixture(request.node, request.config)


class DtypelintFixture:
    """What the ``dtypelint`` fixture gives a test. Options are the keyword arguments of
    ``dtypelint.pipeline`` (``backend``, ``dtype``, ``select``, ``ignore``, ``extend_select``,
    ``per_location_ignores``, ``severity``, ``packs``, ``options``, ``mode``, ``stats``) and ``fail_on``;
    ``settings=`` (a ``dtypelint.config.Settings``) replaces every layer below the keyword arguments."""

    def __init__(self, node: pytest.Item, config: pytest.Config) -> None:
        self._node = node
        self._config = config
        self.reports: list[Report] = []  # every report of this test, in order

    def settings(self, **options: Any) -> Settings:
        """The settings an audit with ``options`` would use (validated), fail level included."""
        __tracebackhide__ = True
        return self._resolve(options)[0]

    def audit(self, model: Any, inputs: Any, **options: Any) -> Report:
        """Audit one forward of ``model`` on ``inputs``; the report lists the findings, never raises for
        them (a forward that raises is finding DT001)."""
        __tracebackhide__ = True
        return self._audit(model, inputs, options, asserted=False)[0]

    def assert_clean(self, model: Any, inputs: Any, **options: Any) -> Report:
        """Audit like ``audit`` and fail the test, with the findings table, when any finding is at or
        above the fail level (``fail_on``, default ``error``). Returns the report when it passes."""
        __tracebackhide__ = True
        report, fail_on = self._audit(model, inputs, options, asserted=True)
        failing = report.at_or_above(fail_on)
        if failing:
            caller = sys._getframe(1)
            where = f"{_relative(caller.f_code.co_filename, self._config.rootpath)}:{caller.f_lineno}"
            pytest.fail(_failure_message(report, failing, fail_on, where), pytrace=False)
        return report

    def _audit(self, model: Any, inputs: Any, options: dict[str, Any], *, asserted: bool) -> tuple[Report, str]:
        __tracebackhide__ = True
        from dtypelint.errors import DtypelintError
        from dtypelint.pipeline import audit

        settings, run = self._resolve(options)
        try:
            report = audit(model, inputs, settings=settings, **run)
        except DtypelintError as error:
            report, problem = None, str(error)
        if report is None:  # failed outside the except block: no "During handling" chain in the output
            pytest.fail(f"dtypelint: {problem}", pytrace=False)
        self.reports.append(report)
        self._node.user_properties.append((PROPERTY, _summary_entry(report, settings.fail_on, asserted)))
        return report, settings.fail_on

    def _resolve(self, options: dict[str, Any]) -> tuple[Settings, dict[str, Any]]:
        """The layered settings for this test with ``options`` on top, and the run keys (mode, stats)."""
        __tracebackhide__ = True
        from dtypelint.errors import DtypelintError

        try:
            explicit = dict(options)
            base = explicit.pop("settings", None)
            _check_keys(explicit, "dtypelint.pipeline")
            layers: list[tuple[str, Mapping[str, Any]]] = []
            run: dict[str, Any] = {}
            if base is None:
                base = _file_settings(self._config)
                layers += [("the ini options", _ini_layer(self._config)),
                           ("the command line", _command_line_layer(self._config))]
                for marker in reversed(list(self._node.iter_markers("dtypelint"))):
                    if marker.args:
                        raise _usage("@pytest.mark.dtypelint takes keyword arguments only")
                    _check_keys(marker.kwargs, "@pytest.mark.dtypelint")
                    layers.append(("@pytest.mark.dtypelint", marker.kwargs))
                    run.update({key: marker.kwargs[key] for key in RUN_KEYS if key in marker.kwargs})
            layers.append(("the keyword arguments", explicit))
            run.update({key: explicit[key] for key in RUN_KEYS if key in explicit})
            return _layered(base, layers), run
        except DtypelintError as error:
            problem = str(error)
        pytest.fail(f"dtypelint: {problem}", pytrace=False)


def _usage(message: str) -> Exception:
    from dtypelint.errors import UsageError

    return UsageError(message)


def _check_keys(options: Mapping[str, Any], where: str) -> None:
    from dtypelint.config import SETTING_KEYS

    unknown = sorted(set(options) - {*SETTING_KEYS, *RUN_KEYS})
    if unknown:
        raise _usage(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join((*SETTING_KEYS, *RUN_KEYS))}")


def _layered(base: Settings, layers: list[tuple[str, Mapping[str, Any]]]) -> Settings:
    """``Settings.layered`` with each layer's problems named by where the layer comes from."""
    from dtypelint.errors import DtypelintError

    settings = base
    for where, layer in layers:
        try:
            settings = settings.layer({key: value for key, value in layer.items() if key not in RUN_KEYS})
        except DtypelintError as error:
            raise _usage(f"{where}: {error}") from None
    return settings.layered()


def _ini_layer(config: pytest.Config) -> dict[str, str]:
    values = {key: str(config.getini(f"dtypelint_{key}")).strip() for key in COMMAND_LINE_KEYS}
    return {key: value for key, value in values.items() if value}


def _command_line_layer(config: pytest.Config) -> dict[str, str]:
    values = {key: config.getoption(f"dtypelint_{key}") for key in COMMAND_LINE_KEYS}
    return {key: value for key, value in values.items() if value}


def _file_settings(config: pytest.Config) -> Settings:
    """``[tool.dtypelint]`` of ``<rootdir>/pyproject.toml`` (defaults without one), read once."""
    from dtypelint.config import Settings, load_settings
    from dtypelint.errors import DtypelintError

    if _file_settings_key not in config.stash:
        path = config.rootpath / "pyproject.toml"
        try:
            config.stash[_file_settings_key] = load_settings(path) if path.is_file() else Settings()
        except DtypelintError as error:  # kept, and raised again at every use of the fixture
            config.stash[_file_settings_key] = error
    settings = config.stash[_file_settings_key]
    if isinstance(settings, Exception):
        raise settings
    return settings


def _relative(filename: str, root: Path) -> str:
    try:
        return str(Path(filename).resolve().relative_to(root))
    except ValueError:
        return filename


def _failure_message(report: Report, failing: list[Any], fail_on: str, where: str) -> str:
    count = f"{len(failing)} finding{'s' if len(failing) != 1 else ''}"
    head = (
        f"dtypelint: {count} at or above {fail_on!r} in {report.model} "
        f"(backend {report.backend}, {report.compute_dtype}, {report.mode} mode), assert_clean at {where}"
    )
    hint = (
        "fail level and rules: fail_on / ignore / select in @pytest.mark.dtypelint, "
        "--dtypelint-fail-on, [tool.dtypelint]; `dtypelint explain CODE` documents a rule"
    )
    return "\n".join([head, "", report.render(), "", hint])


def _summary_entry(report: Report, fail_on: str, asserted: bool) -> dict[str, Any]:
    """What the summary lists of one audit. Only ``assert_clean`` judges: ``failing`` counts the findings
    that failed it; a plain ``audit`` reports and judges nothing."""
    return {
        "model": report.model,
        "backend": report.backend,
        "dtype": report.compute_dtype,
        "mode": report.mode,
        **report.counts(),
        "fail_on": fail_on,
        "asserted": asserted,
        "failing": len(report.at_or_above(fail_on)) if asserted else 0,
    }


class AuditSummary:
    """Collects the audits of every test from the reports (so pytest-xdist workers' audits arrive too)
    and lists them in a terminal summary section headed "dtypelint"."""

    def __init__(self) -> None:
        self.audits: list[tuple[str, dict[str, Any]]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":  # carries the user_properties of setup and call too
            self.audits += [(report.nodeid, value) for name, value in report.user_properties if name == PROPERTY]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.audits:
            return
        from tabulate import tabulate

        rows = [
            (nodeid, entry["model"], entry["backend"], entry["dtype"], entry.get("error", 0), entry.get("warning", 0),
             entry.get("info", 0), _result(entry))
            for nodeid, entry in self.audits
        ]
        headers = ("test", "model", "backend", "dtype", "errors", "warnings", "infos", "result")
        terminalreporter.section("dtypelint")
        for line in tabulate(rows, headers=headers, tablefmt="simple").splitlines():
            terminalreporter.write_line(line)
        audits, tests = len(self.audits), len({nodeid for nodeid, _ in self.audits})
        failed = len({nodeid for nodeid, entry in self.audits if entry.get("failing")})
        terminalreporter.write_line(
            f"{audits} audit{'s' if audits != 1 else ''} in {tests} test{'s' if tests != 1 else ''}; "
            f"{failed} test{'s' if failed != 1 else ''} failed assert_clean"
        )


def _result(entry: dict[str, Any]) -> str:
    if not entry.get("asserted"):
        return "audit only"
    return f"failed: {entry['failing']} at or above {entry['fail_on']}" if entry["failing"] else "ok"
