"""The pytest plugin, run the way users run it: pytest sessions of their own (pytester), in process."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from dtypelint.shipped import available_packs

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "test_tiny_llama_dtypes.py"

# The users' conftest: small models with known findings.
MODELS = '''
import pytest
import torch
from torch import nn


class Clean(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16).half()

    def forward(self, x):
        return self.body(x)


class UpcastHead(nn.Module):
    """One warning: DT105, a float32 LayerNorm head on the float16 stream (torch's CPU kernel accepts it).
    (Issue #12: a float32 head reached only through an explicit ``.float()`` is an info now.)"""
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16).half()
        self.head = nn.LayerNorm(16)

    def forward(self, x):
        return self.head(self.body(x))


class StrayHead(nn.Module):
    """An fp16 MLP whose head was created after .half(): DT101 on head.weight (and DT001, DT105)."""
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).half()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16).half()

    def forward(self, x):
        raise ValueError("the forward is broken")


@pytest.fixture
def x():
    return torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).half()


@pytest.fixture
def models():
    torch.manual_seed(0)
    return {"clean": Clean(), "upcast": UpcastHead(), "stray": StrayHead(), "broken": Broken()}
'''

INTERNALS = ("pytest_plugin.py", "dtypelint/pipeline.py", "dtypelint/rules", "site-packages", "Traceback")


@pytest.fixture(scope="module", autouse=True)
def _imports_of_an_audit() -> None:
    """pytester drops the modules an in-process session imported when the session ends. An audit
    imports hundreds lazily (torch._dynamo among them, whose operator registrations cannot run twice):
    importing them out here, once, keeps them loaded, and every inner session fast."""
    import torch

    from dtypelint import audit

    audit(torch.nn.Linear(2, 2).half(), torch.ones(1, 2, dtype=torch.float16))


@pytest.fixture
def users(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory with the models conftest."""
    pytester.makeconftest(MODELS)
    return pytester


# Plugins the inner sessions do without: hypothesis's would re-import (and assertion-rewrite) hypothesis
# in every in-process run, about 1.5 s each.
QUIET = ("-p", "no:cacheprovider", "-p", "no:warnings", "-p", "no:hypothesispytest", "-p", "no:anyio")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*QUIET, *args)


def internals(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines + result.errlines if any(text in line for text in INTERNALS)]


def test_the_entry_point_registers_the_plugin(users):
    entry = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "dtypelint"]
    assert [ep.value for ep in entry] == ["dtypelint.pytest_plugin"]
    users.makepyfile("def test_it(dtypelint):\n    pass\n")
    run(users).assert_outcomes(passed=1)
    result = run(users, "-p", "no:dtypelint")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'dtypelint' not found*"])


def test_a_clean_model_passes_and_is_listed_in_the_summary(users):
    users.makepyfile(
        """
        def test_clean(dtypelint, models, x):
            report = dtypelint.assert_clean(models["clean"], x)
            assert report.findings == [] and report.backend == "hf-eager"
            assert dtypelint.reports == [report]

        def test_no_audit():
            pass
        """
    )
    result = run(users)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "*= dtypelint =*",
        "test * model * backend * dtype * errors * warnings * infos * result",
        "test_a_clean_model_passes_and_is_listed_in_the_summary.py::test_clean * Clean * hf-eager * float16 "
        "* 0 * 0 * 0 * ok",
        "1 audit in 1 test; 0 tests failed assert_clean",
    ])
    assert "test_no_audit" not in result.stdout.str().split("= dtypelint =")[1]


def test_no_summary_section_without_audits(users):
    users.makepyfile("def test_nothing():\n    pass\n")
    result = run(users)
    result.assert_outcomes(passed=1)
    assert "= dtypelint =" not in result.stdout.str()


def test_a_failing_audit_reads_as_a_findings_table(users):
    users.makepyfile(
        """
        def test_stray(dtypelint, models, x):
            dtypelint.assert_clean(models["stray"], x)
        """
    )
    result = run(users)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "dtypelint: 2 findings at or above 'error' in StrayHead (backend hf-eager, float16, value mode), "
        "assert_clean at test_a_failing_audit_reads_as_a_findings_table.py:2",
        "severity * code * location * tensor * dtypes * message * fix",
        "error * DT101 * head * head.weight *",
        "warning * DT105 * head * head.weight *",
        "StrayHead [value, float16, backend hf-eager]: 2 errors, 1 warning, 0 infos",
        "*test_stray * StrayHead * hf-eager * float16 * 2 * 1 * 0 * failed: 2 at or above error",
        "FAILED *::test_stray*",
    ])
    assert internals(result) == []


def test_the_summary_counts_failed_tests_and_leaves_plain_audits_unjudged(users):
    users.makepyfile(
        """
        def test_reports_only(dtypelint, models, x):
            report = dtypelint.audit(models["stray"], x)   # looks, does not judge: the test passes
            assert report.errors

        def test_stray_twice(dtypelint, models, x):
            dtypelint.audit(models["clean"], x)
            dtypelint.assert_clean(models["stray"], x)

        def test_stray_again(dtypelint, models, x):
            dtypelint.assert_clean(models["stray"], x)
        """
    )
    result = run(users)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*test_reports_only * StrayHead * 2 * 1 * 0 * audit only",
        "*test_stray_twice * Clean * 0 * 0 * 0 * audit only",
        "*test_stray_twice * StrayHead * 2 * 1 * 0 * failed: 2 at or above error",
        "*test_stray_again * StrayHead * 2 * 1 * 0 * failed: 2 at or above error",
        "4 audits in 3 tests; 2 tests failed assert_clean",
    ])


def test_a_forward_that_raises_is_a_test_failure_with_dt001(users):
    users.makepyfile(
        """
        def test_broken(dtypelint, models, x):
            dtypelint.assert_clean(models["broken"], x)
        """
    )
    result = run(users)
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["error * DT001 * <model> * forward raised ValueError: the forward is broken*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert internals(result) == []


def test_fail_on_from_the_marker_and_explicit_options_above_it(users):
    users.makepyfile(
        """
        import pytest

        def test_a_warning_passes_by_default(dtypelint, models, x):
            dtypelint.assert_clean(models["upcast"], x)

        @pytest.mark.dtypelint(fail_on="warning")
        def test_a_warning_fails_at_warning(dtypelint, models, x):
            dtypelint.assert_clean(models["upcast"], x)

        @pytest.mark.dtypelint(fail_on="warning")
        def test_keyword_beats_marker(dtypelint, models, x):
            dtypelint.assert_clean(models["upcast"], x, fail_on="error")

        @pytest.mark.dtypelint(fail_on="warning", ignore=["DT105"])
        def test_ignore_in_the_marker(dtypelint, models, x):
            dtypelint.assert_clean(models["upcast"], x)
        """
    )
    result = run(users)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "_* test_a_warning_fails_at_warning _*",
        "dtypelint: 1 finding at or above 'warning' in UpcastHead *",
    ])


def test_marker_beats_command_line(users):
    users.makepyfile(
        """
        import pytest

        def test_command_line(dtypelint, models, x):
            report = dtypelint.audit(models["clean"], x)
            assert (report.backend, report.compute_dtype) == ("ipex-llm-xpu", "float32")

        @pytest.mark.dtypelint(backend="hf-eager")
        def test_marker(dtypelint, models, x):
            report = dtypelint.audit(models["clean"], x)
            assert (report.backend, report.compute_dtype) == ("hf-eager", "float32")

        @pytest.mark.dtypelint(backend="hf-eager", dtype="auto")
        def test_keyword(dtypelint, models, x):
            report = dtypelint.audit(models["clean"], x, backend="ipex-llm-xpu")
            assert (report.backend, report.compute_dtype) == ("ipex-llm-xpu", "float16")

        @pytest.mark.dtypelint(backend="hf-eager", dtype="bfloat16")
        class TestClass:
            @pytest.mark.dtypelint(dtype="float16")
            def test_closest_marker_wins(self, dtypelint, models, x):
                report = dtypelint.audit(models["clean"], x)
                assert (report.backend, report.compute_dtype) == ("hf-eager", "float16")
        """
    )
    result = run(users, "--dtypelint-backend=ipex-llm-xpu", "--dtypelint-dtype=float32")
    result.assert_outcomes(passed=4)


def test_ini_options_and_command_line_above_them(users):
    users.makeini(
        """
        [pytest]
        dtypelint_backend = ipex-llm-xpu
        dtypelint_fail_on = warning
        """
    )
    users.makepyfile(
        """
        def test_ini(dtypelint, models, x):
            assert dtypelint.audit(models["clean"], x).backend == "ipex-llm-xpu"
            dtypelint.assert_clean(models["upcast"], x)
        """
    )
    result = run(users)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*1 finding at or above 'warning' in UpcastHead (backend ipex-llm-xpu*"])
    result = run(users, "--dtypelint-fail-on=error", "--dtypelint-backend=hf-eager")
    result.assert_outcomes(failed=1)  # the first assertion: the backend is now hf-eager
    result.stdout.fnmatch_lines(["*assert 'hf-eager' == 'ipex-llm-xpu'*"])


def test_pyproject_is_the_lowest_layer(users):
    users.makepyfile(
        """
        import pytest

        def test_pyproject(dtypelint, models, x):
            settings = dtypelint.settings()
            assert (settings.backend, settings.fail_on) == (("hf-eager",), "warning")  # backend: the ini option
            assert settings.selection.ignore == ["DT105"]
            dtypelint.assert_clean(models["upcast"], x)  # DT105 ignored by pyproject

        @pytest.mark.dtypelint(ignore=[])
        def test_marker_clears_the_ignore(dtypelint, models, x):
            dtypelint.assert_clean(models["upcast"], x)
        """
    )
    users.makepyprojecttoml(
        """
        [tool.dtypelint]
        backend = "ipex-llm-xpu"
        fail-on = "warning"
        ignore = ["DT105"]

        [tool.pytest.ini_options]
        dtypelint_backend = "hf-eager"
        """
    )
    result = run(users)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "_* test_marker_clears_the_ignore _*",
        "dtypelint: 1 finding at or above 'warning' in UpcastHead (backend hf-eager, *",
        "warning * DT105 *",
    ])


def test_pyproject_alone_sets_the_defaults(users):
    users.makepyprojecttoml('[tool.dtypelint]\nbackend = "ipex-llm-xpu"\ndtype = "bfloat16"\n')
    users.makepyfile(
        """
        def test_it(dtypelint, models, x):
            report = dtypelint.audit(models["clean"], x)
            assert (report.backend, report.compute_dtype) == ("ipex-llm-xpu", "bfloat16")
        """
    )
    run(users).assert_outcomes(passed=1)


def test_mistakes_fail_with_one_line(users):
    users.makepyfile(
        """
        import pytest

        @pytest.mark.dtypelint(backend="no-such-pack")
        def test_unknown_backend(dtypelint, models, x):
            dtypelint.audit(models["clean"], x)

        @pytest.mark.dtypelint(bakend="ipex-llm-xpu")
        def test_unknown_marker_option(dtypelint, models, x):
            dtypelint.audit(models["clean"], x)

        def test_unknown_selector(dtypelint, models, x):
            dtypelint.assert_clean(models["clean"], x, ignore=["DT999"])
        """
    )
    result = run(users)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "_* test_unknown_backend _*",
        "dtypelint: unknown backend 'no-such-pack'; available: *",
        "_* test_unknown_marker_option _*",
        "dtypelint: @pytest.mark.dtypelint: unknown option(s) bakend; known: backend, *",
        "_* test_unknown_selector _*",
        "dtypelint: selector 'DT999' matches no rule*",
    ])
    assert "During handling" not in result.stdout.str()
    assert internals(result) == []

    result = run(users, "--dtypelint-dtype=fp17")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*dtypelint: the command line: unknown dtype 'fp17'*"])


def test_a_broken_pyproject_fails_the_tests_that_audit(users):
    users.makepyprojecttoml('[tool.dtypelint]\nbackends = "ipex-llm-xpu"\n')
    users.makepyfile(
        """
        def test_audit(dtypelint, models, x):
            dtypelint.audit(models["clean"], x)

        def test_other():
            pass
        """
    )
    result = run(users)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["dtypelint: *pyproject.toml: [[]tool.dtypelint[]]: 'backends' is not a known key"])


def test_the_shipped_example_passes(pytester):
    """examples/test_tiny_llama_dtypes.py as a user runs it (it loads the tiny Llama: a few seconds)."""
    # Imported here so that the in-process run finds them loaded: pytester drops the modules an inner
    # session imports, which leaves transformers' lazy modules half-initialized for the next one.
    import transformers.models.llama.modeling_llama  # noqa: F401
    result = pytester.runpytest(*QUIET, str(EXAMPLE))
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*test_ipex_llm_xpu_is_clean * LlamaForCausalLM * ipex-llm-xpu * float16 * 0 * 0 * 0 * ok"])


@pytest.mark.slow
def test_the_plugin_works_from_an_installed_wheel(tmp_path):
    """Build the wheel, install it (no dependencies) into a fresh virtual environment that borrows this
    one's torch, transformers and pytest through a .pth file, and run a user test from outside the
    source tree: the fixture must come from the installed wheel's entry point."""
    started = time.perf_counter()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True,
    )
    if build.returncode and "No matching distribution found for hatchling" in build.stderr:
        pytest.skip("the build backend (hatchling) cannot be downloaded here")
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("dtypelint-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {"dtypelint/pytest_plugin.py", "dtypelint/packs/shipped/ipex-llm-xpu.toml",
            "dtypelint/packs/shipped/hf-eager.toml"} <= names
    packs = sorted(name.rsplit("/", 1)[-1] for name in names if name.endswith(".toml"))
    assert packs == sorted(set(packs)) == sorted(f"{pack}.toml" for pack in available_packs())  # each once
    assert "[pytest11]\ndtypelint = dtypelint.pytest_plugin" in entry_points

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    ours = Path(subprocess.check_output([sys.executable, "-c", "import torch, pathlib; "
                                         "print(pathlib.Path(torch.__file__).parents[1])"], text=True).strip())
    (site / "borrowed.pth").write_text(f"{ours}\n")  # appended to sys.path, after the wheel's own files
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True, text=True,
    )
    user = tmp_path / "user"
    user.mkdir()
    (user / "conftest.py").write_text(MODELS)
    (user / "test_user.py").write_text(textwrap.dedent(
        """
        import dtypelint, pathlib, sys

        def test_from_the_wheel(dtypelint, models, x):
            assert pathlib.Path(sys.modules["dtypelint"].__file__).is_relative_to(pathlib.Path(sys.prefix))
            dtypelint.assert_clean(models["clean"], x, backend="ipex-llm-xpu")

        def test_fails(dtypelint, models, x):
            dtypelint.assert_clean(models["stray"], x)
        """
    ))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    result = subprocess.run(
        [python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:warnings", "-rf"],
        cwd=user, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout, result.stdout
    assert "DT101" in result.stdout and "head.weight" in result.stdout
    assert "= dtypelint =" in result.stdout
    assert str(ROOT / "dtypelint") not in result.stdout + result.stderr
    print(f"wheel build, install and run: {time.perf_counter() - started:.1f} s")
    shutil.rmtree(venv)
