"""Attacks through the output: a module name is any string ``nn.Module`` keeps, and every format prints it.

Each hostile name below names the float32 head of an fp16 model (``--entry``), so that three findings (DT001,
DT101, DT105) carry it in their location, tensor and message. Every format and graph export of that audit must
stay well-formed for its reader (the same structure as for a benign name: lines, table rows, HTML elements,
JSON, XML, DOT and Mermaid statements), carry the name in the format's escaped form, and never the raw
dangerous sequence: no control character for a terminal, no Markdown or HTML markup, nothing XML forbids.
"""

from __future__ import annotations

import importlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest
import torch
from helpers import markdown_view, parse_github_command, sarif_validator
from torch import nn

import dtypelint
from dtypelint.cli import main


@dataclass(frozen=True)
class Hostile:
    name: str  # the module name
    shown: str  # what a reader sees: every character str.isprintable rejects as repr escapes it


HOSTILE = {
    "md-double-backtick": Hostile("x``<img src=x onerror=alert(1)>``y", "x``<img src=x onerror=alert(1)>``y"),
    "md-backtick-edges": Hostile("`<img src=x onerror=alert(1)>`", "`<img src=x onerror=alert(1)>`"),
    "md-pipes": Hostile("a|<img src=x>|b\\|c", "a|<img src=x>|b\\|c"),
    "md-image-link": Hostile("![p](https://a/p)[c](javascript:alert(1))@octocat",
                             "![p](https://a/p)[c](javascript:alert(1))@octocat"),
    "html-script": Hostile("</script><script>alert(1)</script>&amp;", "</script><script>alert(1)</script>&amp;"),
    "terminal-osc-csi": Hostile("\x1b]0;pwned\x07\x1b[2J\x1b[31mred", r"\x1b]0;pwned\x07\x1b[2J\x1b[31mred"),
    "nul-del-c1": Hostile("nul\x00del\x7fcsi\x9b31m", r"nul\x00del\x7fcsi\x9b31m"),
    "newlines": Hostile("x\nhead: error DT000 forged\r\n", r"x\nhead: error DT000 forged\r\n"),
    "bidi-separators": Hostile("evil\u202etxtexe\u2066\u2028", r"evil\u202etxtexe\u2066\u2028"),
    "graph-syntax": Hostile('q"]-->|x| t0["\\N #1; ', 'q"]-->|x| t0["\\N #1; '),
    "not-utf8": Hostile(os.fsdecode(b"ck\xffpt"), r"ck\udcffpt"),
}
BENIGN = Hostile("plain_head", "plain_head")
ENTRY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8).half())
    model._modules[{name!r}] = nn.Linear(8, 4)  # add_module refuses some names; the model keeps any
    return model, torch.randn(2, 8, dtype=torch.float16)
"""
FINDINGS = 3  # DT001, DT101, DT105, each at the head
LISTED = 2  # the lines people read: DT001 (raised at the op DT101 names) joins the DT101 line
MODULE_NUMBERS = itertools.count()  # a module name per model, this whole session: imports are cached


@pytest.fixture
def entry(tmp_path, monkeypatch) -> Callable[[str], str]:
    """Writes a module whose ``build`` returns the model with its head named as given, and its inputs;
    returns ``MODULE:build`` for ``--entry``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str) -> str:
        module = f"hostile_entry_{next(MODULE_NUMBERS)}"
        (tmp_path / f"{module}.py").write_text(ENTRY.format(name=name), encoding="utf-8")
        return f"{module}:build"

    return write


def built(entry: Callable[[str], str], name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model and inputs that ``--entry`` would audit, for the API."""
    module, _, function = entry(name).partition(":")
    return getattr(importlib.import_module(module), function)()


@pytest.fixture
def check(entry, monkeypatch, capsys) -> Callable[..., str]:
    """Runs ``dtypelint check -q`` with ``options`` on the model whose head is named ``hostile``; returns
    stdout (the findings make the exit code 1; stderr stays empty)."""
    monkeypatch.setenv("COLUMNS", "1000")  # text: the table, one line per finding whatever the name's length

    def run(hostile: Hostile, *options: str) -> str:
        code = main(["check", "--entry", entry(hostile.name), "-q", *options])
        out, err = capsys.readouterr()
        assert (code, err) == (1, ""), err
        out.encode("utf-8")  # printable as it is: no lone surrogate
        return out

    return run


# The formats ------------------------------------------------------------------------------------------


def text_shape(out: str, hostile: Hostile) -> int:
    """text, concise, full: every line printable, the name as shown on each finding's line."""
    lines = out.splitlines()
    assert all(line.isprintable() for line in lines), [line for line in lines if not line.isprintable()]
    assert sum(hostile.shown in line for line in lines) == LISTED
    return len(lines)


def github_shape(out: str, hostile: Hostile) -> int:
    lines = out.splitlines()
    assert len(lines) == LISTED and all(line.isprintable() for line in lines)
    for line in lines:
        _, properties, message = parse_github_command(line)
        assert set(properties) == {"title"} and message.startswith(f"{hostile.shown}: ")
    return len(lines)


def json_shape(out: str, hostile: Hostile) -> list[str]:
    """json keeps the exact name (its escapes round-trip), in ASCII: no raw control character."""
    assert out.isascii()
    data = json.loads(out)
    assert [finding["location"] for finding in data["findings"]] == [hostile.name] * FINDINGS
    assert {finding["tensor"] for finding in data["findings"]} == {f"{hostile.name}.weight"}
    return list(data)


def sarif_shape(out: str, hostile: Hostile) -> int:
    """SARIF is UTF-8: the exact name, but undecodable bytes escaped (no lone surrogate)."""
    assert out.isascii()
    log = json.loads(out)
    errors = list(sarif_validator().iter_errors(log))
    assert not errors, [error.message for error in errors]
    (run,) = log["runs"]
    expected = hostile.name.encode("utf-8", "backslashreplace").decode("utf-8")
    for result in run["results"]:
        module, member = result["locations"][0]["logicalLocations"]
        assert (module["fullyQualifiedName"], member["fullyQualifiedName"]) == (expected, f"{expected}.weight")
        assert expected in result["message"]["text"]
    return len(run["results"])


def markdown_shape(out: str, hostile: Hostile) -> tuple[int, list[int]]:
    """The comment as CommonMark + GFM tables renders it: no HTML, image or link; the name as shown in
    the location and tensor code spans and, as text, in the messages."""
    assert all(line.isprintable() for line in out.splitlines())
    view = markdown_view(out)
    assert not view.kinds & {"html_inline", "html_block", "image", "link_open", "autolink"}, view.kinds
    header, *rows = view.rows
    for row in rows:
        assert row[3:5] == [hostile.shown, f"{hostile.shown}.weight"], row
        assert hostile.shown in row[6]
    assert view.code.count(hostile.shown) == LISTED + 1  # the drawing's heading names it too
    return len(view.headings), [len(row) for row in view.rows]


class Page(HTMLParser):
    """Every element of a page, the text of its cells and of its Mermaid drawings."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[str] = []
        self.cells: list[str] = []
        self.mermaid: list[str] = []
        self._texts: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(f"{tag}.{dict(attrs).get('class') or ''}")
        self._texts = {"td": self.cells, "pre": self.mermaid}.get(tag, self._texts)
        if tag in ("td", "pre"):
            self._texts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "pre"):
            self._texts = None

    def handle_data(self, data: str) -> None:
        if self._texts is not None:
            self._texts[-1] += data


def html_shape(out: str, hostile: Hostile) -> list[str]:
    """The page has the elements a benign name gives it (no injected tag, no early end of a script),
    the name as shown in its cells, and Mermaid source a Mermaid parser cannot misread."""
    page = Page(out)
    assert page.cells.count(hostile.shown) == LISTED
    assert page.cells.count(f"{hostile.shown}.weight") == LISTED
    (drawing,) = page.mermaid
    assert any(hostile.shown in label for label in mermaid_labels(drawing))
    return page.elements


FORMATS = {
    "text": text_shape, "concise": text_shape, "full": text_shape, "github": github_shape, "json": json_shape,
    "sarif": sarif_shape, "markdown": markdown_shape, "html": html_shape,
}


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE)
@pytest.mark.parametrize("format", FORMATS)
def test_a_hostile_name_is_shown_escaped_and_breaks_nothing(check, format, hostile):
    shape = FORMATS[format]
    assert shape(check(hostile, "--format", format), hostile) == shape(check(BENIGN, "--format", format), BENIGN)


# Graph exports --------------------------------------------------------------------------------------

MERMAID_LINE = re.compile(
    r'flowchart TD|classDef \w+ [\w:#,-]+|style (op|t)\d+ [\w:#,-]+'
    r'|(op|t)\d+(\["(?P<box>[^"<>]*)"\]|\("(?P<round>[^"<>]*)"\))(:::\w+)?'
    r'|(op|t)\d+ -->\|"\w+"\| (op|t)\d+'
)
DOT_LINE = re.compile(
    r'digraph dtypes \{|rankdir=TB;|\}'
    r'|(op|t)\d+ \[shape=(box|ellipse), label="(?P<label>(?:[^"\\]|\\.)*)"\];'
    r'|(op|t)\d+ -> (op|t)\d+ \[label="\w+"\];'
)


def mermaid_labels(source: str) -> list[str]:
    """The node labels of a flowchart, each statement checked, ``#code;`` decoded (Mermaid's escapes)."""
    labels = []
    for line in source.strip().splitlines():
        match = MERMAID_LINE.fullmatch(line.strip())
        assert match, line
        label = match["box"] or match["round"]
        if label:
            labels.append(re.sub(r"#(\d+);", lambda code: chr(int(code[1])), label))
    return labels


def dot_labels(source: str) -> list[str]:
    labels = []
    for line in source.splitlines():
        match = DOT_LINE.fullmatch(line.strip())
        assert match, line
        if match["label"]:
            labels.append(re.sub(r"\\(.)", r"\1", match["label"]))
    return labels


# XML 1.0's Char production, less CR (an XML parser reads CR back as LF).
XML_KEPT = re.compile("[\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def graph_texts(path: Path) -> list[str]:
    """What an export names, checked against its format's grammar: the data exports' tensor names, the
    drawings' node labels."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        graph = nx.node_link_graph(json.loads(text), edges="edges")
    elif path.suffix == ".graphml":
        ElementTree.parse(path)  # well-formed XML
        graph = nx.read_graphml(path)
    else:
        return dot_labels(text) if path.suffix == ".dot" else mermaid_labels(text)
    return [name for _, name in graph.nodes(data="name") if name]


def head_texts(hostile: Hostile, suffix: str) -> set[str]:
    """How an export names the head's weight and bias: data (json) exactly, GraphML with what XML cannot
    hold escaped, drawings as shown with dtype and shape."""
    if suffix == ".json":
        name = hostile.name
    elif suffix == ".graphml":
        name = "".join(char if XML_KEPT.fullmatch(char) else repr(char)[1:-1] for char in hostile.name)
    else:
        return {f"{hostile.shown}.weight float32[4, 8]", f"{hostile.shown}.bias float32[4]"}
    return {f"{name}.weight", f"{name}.bias"}


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE)
@pytest.mark.parametrize("suffix", [".json", ".graphml", ".dot", ".mmd"])
def test_a_hostile_name_keeps_every_graph_export_well_formed(check, tmp_path, hostile, suffix):
    hostile_graph, benign_graph = tmp_path / f"hostile{suffix}", tmp_path / f"benign{suffix}"
    check(hostile, "--format", "json", "--graph", str(hostile_graph))
    check(BENIGN, "--format", "json", "--graph", str(benign_graph))
    texts = graph_texts(hostile_graph)
    assert head_texts(hostile, suffix) <= set(texts)
    assert len(texts) == len(graph_texts(benign_graph))


# A checkpoint directory whose name is not UTF-8 ------------------------------------------------------


@pytest.fixture
def undecodable_checkpoint(tmp_path, tiny_llama_path, monkeypatch) -> Path:
    """A copy of the example Llama in ``ck\\xffpt`` (os.fsdecode: ``ck\\udcffpt``), the working directory."""
    directory = tmp_path / os.fsdecode(b"ck\xffpt")
    shutil.copytree(tiny_llama_path, directory)
    monkeypatch.chdir(tmp_path)
    return directory


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_a_checkpoint_path_that_is_not_utf8_is_printed_and_pointed_at(undecodable_checkpoint, capsys, format,
                                                                     absolute):
    # --static: safetensors opens no file by a path that is not UTF-8 (the next test), Python reads the
    # headers. bfloat16: each float16 module of the checkpoint is a DT105 warning, each result names the path.
    path = str(undecodable_checkpoint) if absolute else undecodable_checkpoint.name
    code = main(["check", path, "--static", "--dtype", "bfloat16", "--format", format])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    out.encode("utf-8")
    if format == "sarif":  # the URI percent-encodes the byte
        log = json.loads(out)
        assert not list(sarif_validator().iter_errors(log))
        (run,) = log["runs"]
        uri = f"{undecodable_checkpoint.parent.as_uri()}/ck%FFpt" if absolute else "ck%FFpt"
        assert run["artifacts"] == [{"location": {"uri": uri}}] and run["results"]
        located = {result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for result in run["results"]}
        assert located == {uri}
    elif format == "github":
        files = {parse_github_command(line)[1]["file"] for line in out.splitlines()}
        assert files == {path.replace(undecodable_checkpoint.name, r"ck\udcffpt")}
    elif format == "json":
        assert json.loads(out)["summary"]["warning"] > 0
    else:
        assert "DT105" in out


def test_a_value_audit_of_that_path_is_a_one_line_error(undecodable_checkpoint, capsys):
    code = main(["check", undecodable_checkpoint.name, "--dtype", "float16", "--format", "sarif"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and r"cannot load ck\udcffpt" in err[0] and "not valid UTF-8" in err[0], err
    assert err[0].isprintable()


def test_a_terminal_that_cannot_show_a_name_gets_its_escape(entry, monkeypatch):
    """stdout in ASCII (PYTHONIOENCODING=ascii, an old console): a name in Chinese is printed escaped."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["check", "--entry", entry("模块"), "-q", "--format", "concise"]) == 1
    stdout.flush()
    lines = stdout.buffer.getvalue().decode("ascii").splitlines()
    assert sum(line.startswith(r"\u6a21\u5757: ") for line in lines) == LISTED


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE)
def test_print_of_a_report_and_of_its_fix_shows_the_name_escaped(entry, hostile):
    """``print(report)`` and the pytest plugin's failure message (``Report.render``), the fix as the text
    format shows it, and ``print(fix(...))`` (its outcome line)."""
    model, inputs = built(entry, hostile.name)
    report = dtypelint.audit(model, inputs)
    result = dtypelint.fix(model, report)
    assert result.changed
    for text in (str(report), dtypelint.render(result.after, fix=result)):
        assert all(line.isprintable() for line in text.splitlines()) and hostile.shown in text
    assert str(result) == result.summary_line() and str(result).isprintable()
