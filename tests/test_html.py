"""``--format html``: one self-contained page with a drawing per error, and the graph labels it draws.

The unit tests always run. The browser test runs the page in headless Chromium without a network; it is
skipped where no Chromium is installed, except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from dataclasses import replace
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest
import torch

from dtypelint import audit
from dtypelint.cli import main
from dtypelint.diagnostics import Finding
from dtypelint.drawing import MAX_DRAWINGS, MERMAID_CLASSES, cause_path, mermaid_text, to_dot, to_mermaid, write_graph
from dtypelint.formats import render
from dtypelint.formats.html import mermaid_js
from dtypelint.graph import ellipsize
from dtypelint.report import Report

MERMAID_SHA256 = "336df803d87a38b70a01e736e666c8f7601d2ce42f5e47c8fafe5d721074b9a3"  # vendor/README.md
HOSTILE = 'w"<b>#1</b>[0]{x}|y;`z`\\&amp;</script>'  # a parameter name: torch forbids only "." and ""


@pytest.fixture
def stray_report(stray_fp32_layer) -> Report:
    report = audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    assert [finding.code for finding in report.errors] == ["DT001", "DT101"]
    return report


@pytest.fixture
def hostile_report(stray_fp32_layer) -> Report:
    """The stray layer with its float32 head weight renamed ``HOSTILE``."""
    head = stray_fp32_layer.head
    head.register_parameter(HOSTILE, head._parameters.pop("weight"))
    head.forward = lambda x: torch.nn.functional.linear(x, getattr(head, HOSTILE), head.bias)
    report = audit(stray_fp32_layer, torch.randn(2, 16, dtype=torch.float16))
    assert f"head.{HOSTILE}" in {finding.tensor for finding in report.findings}
    return report


class Page(HTMLParser):
    """The parts of a page the tests look at: elements by tag, text by class, scripts apart."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.mermaid: list[str] = []
        self.cells: list[str] = []
        self._open: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open.append(f"{tag}.{dict(attrs).get('class') or ''}")
        if tag in ("script", "pre", "td"):
            {"script": self.scripts, "pre": self.mermaid, "td": self.cells}[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        while self._open and not self._open.pop().startswith(f"{tag}."):
            pass

    def handle_data(self, data: str) -> None:
        if "script." in self._open:
            self.scripts[-1] += data
        elif "pre.mermaid" in self._open:
            self.mermaid[-1] += data
        elif any(element.startswith("td.") for element in self._open):
            self.cells[-1] += data


def without_scripts(text: str) -> str:
    return re.sub(r"<script>.*?</script>", "", text, flags=re.DOTALL)


# The page -----------------------------------------------------------------------------------------------


def test_vendored_mermaid_is_the_pinned_release():
    assert hashlib.sha256(mermaid_js().encode()).hexdigest() == MERMAID_SHA256


def test_the_page_has_the_summary_the_findings_and_one_drawing_per_error_site(stray_report):
    text = render(stray_report, "html")
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>")
    assert f'<p class="summary">{stray_report.summary_line()}</p>' in text
    rows = [attrs.get("class") for tag, attrs in page.tags if tag == "tr" and attrs]
    assert rows == ["error", "warning"]  # DT001 raised at the op DT101 names: one row
    assert "cast head.weight, head.bias to float16 (safe)" in page.cells
    (drawing,) = page.mermaid
    assert "DT101 at <code>head</code>: aten.addmm @ head</h2>" in text
    assert drawing.lstrip().startswith("flowchart TD")
    assert len(page.scripts) == 2 and mermaid_js()[:200] in page.scripts[0]


def test_the_drawing_follows_the_odd_operand_to_its_parameter_and_highlights_it(stray_report):
    graph = stray_report.graph
    (site,) = {finding.node for finding in stray_report.errors}
    weight, bias = graph.find_tensor("head.weight"), graph.find_tensor("head.bias")
    path = cause_path(graph, site, "float16")
    assert {weight, bias} <= set(path.roots) and {weight, bias} <= path.culprits
    assert nx.has_path(graph.subgraph(path.nodes), weight, site)
    assert site not in path.culprits and path.classes()[site] == "conflict"

    (drawing,) = Page(render(stray_report, "html")).mermaid
    assert f'{weight}("head.weight float32[4, 16]"):::culprit' in drawing
    assert f'{site}["aten.addmm @ head"]:::conflict' in drawing
    assert f'-->|"float32"| {site}' in drawing and f'-->|"float16"| {site}' in drawing
    for name, style in MERMAID_CLASSES.items():
        assert f"classDef {name} {style}" in drawing


def test_nothing_in_the_page_would_be_fetched(stray_report):
    text = render(stray_report, "html")
    assert "default-src 'none'" in text  # the page's own Content-Security-Policy forbids every fetch
    markup = without_scripts(text)
    assert "http://" not in markup and "https://" not in markup
    references = re.compile(r"""(?:\b(?:src|href|action|poster|srcset)\s*=|url\(|@import)\s*["']?\s*(?:https?:)?//""", re.I)
    assert not references.search(text)
    assert not any(tag in ("link", "img", "iframe", "object", "embed") for tag, _ in Page(text).tags)
    assert all(not attrs.get("src") for tag, attrs in Page(text).tags if tag == "script")


def test_model_text_is_escaped_in_markup_and_in_mermaid(hostile_report):
    text = render(hostile_report, "html")
    page = Page(text)
    assert [tag for tag, _ in page.tags if tag == "b"] == []
    assert len(page.scripts) == 2  # the name's </script> did not end or add a script
    assert f"head.{HOSTILE}" in page.cells
    (drawing,) = page.mermaid
    label = drawing.split(f"{hostile_report.graph.find_tensor(f'head.{HOSTILE}')}(", 1)[1].split("\n", 1)[0]
    assert label.startswith('"') and label.count('"') == 2  # the name's quote does not end the label
    assert not set('<>&`') & set(label) and "#34;#60;b#62;#35;1" in label


def test_mermaid_text_encodes_what_ends_or_marks_up_a_label():
    assert mermaid_text('a "b"\n#1 <i>&`c`') == "a #34;b#34; #35;1 #60;i#62;#38;#96;c#96;"
    assert mermaid_text("[x](y){z}|;") == "[x](y){z}|;"  # harmless inside quotes, left readable


def test_error_drawings_stop_at_the_cap_and_say_how_many_more(stray_report, tiny_llama_fp16, input_ids):
    llama = audit(tiny_llama_fp16, {"input_ids": input_ids})
    error = stray_report.errors[1]
    sites = list(llama.graph.ops())[: MAX_DRAWINGS + 3]
    # One distinct error at each site (identical ones would be one cause, drawn once).
    many = replace(llama, findings=[replace(error, node=op, message=f"{op}: {error.message}") for op in sites])
    text = render(many, "html")
    assert len(Page(text).mermaid) == MAX_DRAWINGS
    assert "3 more error sites not drawn." in text
    assert len(Page(render(replace(many, findings=many.findings[:2]), "html")).mermaid) == 2


def test_an_error_at_a_tensor_is_drawn_from_its_roots_and_one_without_a_node_is_listed(stray_report):
    graph = stray_report.graph
    weight = graph.find_tensor("head.weight")
    (view,) = graph.outputs(graph.consumers(weight)[0])
    error = stray_report.errors[1]
    at_tensor = replace(error, node=view)  # as a kernel contract names an operand
    nowhere = replace(error, code="IPX101", node=None, tensor="model.layers.0.self_attn.rotary_emb.inv_freq")
    text = render(replace(stray_report, findings=[at_tensor, nowhere]), "html")
    (drawing,) = Page(text).mermaid
    assert f"{view}(" in drawing and ":::conflict" in drawing.split(f"{view}(", 1)[1].split("\n", 1)[0]
    assert f'{weight}("head.weight float32[4, 16]"):::culprit' in drawing
    assert "Not drawn:" in text and "<li>IPX101 at <code>head</code>: <code>model.<wbr>layers.<wbr>0.<wbr>self_attn" in text


def test_a_clean_report_has_no_drawing_and_carries_no_script(tiny_llama_fp16, input_ids):
    report = audit(tiny_llama_fp16, {"input_ids": input_ids})
    text = render(report, "html")
    assert Page(text).mermaid == [] and "<p>No findings.</p>" in text
    assert "<script" not in text and len(text.encode()) < 20_000  # not the 5.5 MB of Mermaid


def _rotary_contract_error(report: Report) -> Finding:
    """IPX101 as ipex-llm's per-layer layout gets it: a buffer read while the model was built, which the
    traced forward never used (no graph node)."""
    return replace(report.errors[1], code="IPX101", pack="ipex-llm-xpu", node=None, op="xe_addons.rotary_half_inplaced",
                   location="model.layers.0.self_attn.rotary_emb", tensor="model.layers.0.self_attn.rotary_emb.inv_freq",
                   dtypes=["float16", "float32"])


def test_a_contract_broken_by_a_buffer_the_forward_never_used_is_drawn_as_the_contract(stray_report):
    text = render(replace(stray_report, findings=[_rotary_contract_error(stray_report)]), "html")
    (drawing,) = Page(text).mermaid
    assert 'tensor("model.layers.0.self_attn.rotary_emb.inv_freq float32"):::culprit' in drawing
    assert 'operands("query/key float16")' in drawing  # the pack's must-match label
    assert 'kernel["xe_addons.rotary_half_inplaced (ipex-llm-xpu kernel)"]:::conflict' in drawing
    assert "Not drawn" not in text and "the contract of <code>xe_addons.<wbr>rotary_half_inplaced</code>" in text
    assert "<script>" in text


def test_table_names_wrap_at_dots_not_inside_a_word(stray_report):
    text = render(stray_report, "html")
    assert "<code>model.<wbr>layers.<wbr>0" in text or "<code>head.<wbr>weight</code>" in text
    assert "overflow-wrap: anywhere" not in text and "word-break: break-all" not in text


def test_check_writes_the_page_with_format_html(tmp_path, capsys, monkeypatch):
    (tmp_path / "stray_entry.py").write_text(
        "import torch\nfrom helpers import StrayFp32Layer\n\n"
        "def build():\n    torch.manual_seed(0)\n    return StrayFp32Layer().eval(), torch.randn(2, 16, dtype=torch.float16)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "--entry", "stray_entry:build", "--format", "html"]) == 1
    page = Page(capsys.readouterr().out)
    assert len(page.mermaid) == 1 and "head.weight" in page.cells


# Graph labels -------------------------------------------------------------------------------------------


def test_tensor_labels_name_the_leaf_its_view_or_its_producer(stray_report):
    graph = stray_report.graph
    weight = graph.find_tensor("head.weight")
    (view,) = graph.outputs(graph.consumers(weight)[0])
    (site,) = {finding.node for finding in stray_report.errors}
    produced = next(node for node, _ in graph.inputs(site) if graph.tensor(node)["dtype"] == "float16")
    assert graph.label(weight) == "head.weight float32[4, 16]"
    assert graph.label(view) == "head.weight (view) float32[16, 4]"
    assert graph.label(produced) == "from aten.addmm float16[2, 16]"


def test_exports_carry_the_labels_and_dtypes_on_edges(stray_report, tmp_path):
    graph = stray_report.graph
    weight = graph.find_tensor("head.weight")
    loaded = nx.read_graphml(write_graph(graph, tmp_path / "graph.graphml"))
    assert loaded.nodes[weight]["label"] == "head.weight float32[4, 16]"
    dot = to_dot(graph)
    assert f'{weight} [shape=ellipse, label="head.weight float32[4, 16]"];' in dot
    assert '[label="float32"]' in dot and '[label="float16"]' in dot
    assert '-->|"float32"|' in to_mermaid(graph)


def test_rotary_buffers_are_named_in_the_drawing(tiny_llama_fp16, input_ids):
    report = audit(tiny_llama_fp16, {"input_ids": input_ids})
    assert "(model.rotary_emb.inv_freq float32[" in to_mermaid(report.graph).replace('"', "")


def test_drawings_ellipsize_long_names_in_the_middle_and_tables_keep_them():
    name = "model.layers.0.self_attn.rotary_emb." + "very_" * 20 + "inv_freq"
    short = ellipsize(name, 60)
    assert len(short) == 60 and short.startswith("model.layers.0.") and short.endswith("inv_freq")
    assert ellipsize(name, None) == name and ellipsize("short", 60) == "short"


# In a browser ---------------------------------------------------------------------------------------------


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        message = "no chromium or chromium-browser on PATH (Debian: apt-get install chromium)"
        if "CI" in os.environ:
            pytest.fail(f"CI needs the browser test: {message}")
        pytest.skip(message)
    return binary


def run_chromium(binary: str, page: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``page`` with every network route closed: names do not resolve and every
    request would go to a proxy on a closed port (the page's CSP forbids fetches as well)."""
    command = [
        binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
        "--window-size=1100,1500", "--virtual-time-budget=15000", *arguments, page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def png_colours(data: bytes) -> Counter[bytes]:
    """How often each RGB colour occurs in an 8-bit RGB/RGBA PNG, sampling every third pixel (stdlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and colour_type in (2, 6), (depth, colour_type)
    channels = 4 if colour_type == 6 else 3
    chunks, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            chunks.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    previous = bytearray(stride)
    colours: Counter[bytes] = Counter()
    for row in range(height):
        start = row * (stride + 1)
        line = unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, channels)
        colours.update(bytes(line[i : i + 3]) for i in range(0, stride, channels * 3))  # every 3rd pixel
        previous = line
    return colours


def unfilter(kind: int, line: bytearray, previous: bytearray, bpp: int) -> bytearray:
    if kind == 2:
        return bytearray((a + b) & 255 for a, b in zip(line, previous, strict=True))
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up, corner = previous[i], (previous[i - bpp] if i >= bpp else 0)
        if kind == 1:
            line[i] = (line[i] + left) & 255
        elif kind == 3:
            line[i] = (line[i] + ((left + up) >> 1)) & 255
        elif kind == 4:
            estimate = left + up - corner
            distances = (abs(estimate - left), abs(estimate - up), abs(estimate - corner))
            line[i] = (line[i] + (left, up, corner)[distances.index(min(distances))]) & 255
    return line


def rendered_drawing_text(binary: str, report: Report, tmp_path: Path) -> tuple[Path, str]:
    """Write the report's page, load it in Chromium, and return the page and the text of the SVG that
    Mermaid drew in the first error's drawing container."""
    page = tmp_path / "report.html"
    page.write_text(render(report, "html"), encoding="utf-8")
    dom = run_chromium(binary, page, tmp_path / "profile", "--dump-dom").stdout
    assert 'data-drawings="rendered"' in dom, re.findall(r'data-drawings="[^"]*"', dom)
    section = dom.split('<section class="error-site"', 1)[1].split("</section>", 1)[0]
    svg = re.search(r"<pre class=\"mermaid\"[^>]*>\s*<svg .*?</svg>", section, re.DOTALL)
    assert svg, section[:2000]
    text = unescape(" ".join(re.sub(r"<[^>]+>", " ", svg.group(0)).split()))
    assert "Syntax error" not in text
    return page, text


def test_a_hostile_name_is_drawn_as_it_is_in_headless_chromium(hostile_report, tmp_path):
    _, text = rendered_drawing_text(chromium(), hostile_report, tmp_path)
    assert f"head.{HOSTILE} float32[4, 16]" in text


def test_a_contract_drawing_renders_in_headless_chromium(stray_report, tmp_path):
    report = replace(stray_report, findings=[_rotary_contract_error(stray_report)])
    _, text = rendered_drawing_text(chromium(), report, tmp_path)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq float32" in text and "query/key float16" in text
    assert "xe_addons.rotary_half_inplaced (ipex-llm-xpu kernel)" in text


def test_the_page_renders_offline_in_headless_chromium(stray_report, tmp_path):
    binary = chromium()
    page, text = rendered_drawing_text(binary, stray_report, tmp_path)
    assert "head.weight float32[4, 16]" in text and "aten.addmm @ head" in text

    screenshot = tmp_path / "report.png"
    run_chromium(binary, page, tmp_path / "profile", f"--screenshot={screenshot}")
    data = screenshot.read_bytes()
    assert len(data) > 5000
    colours = png_colours(data)
    assert len(colours) > 10  # not blank
    # Both highlight fills cover whole nodes, many times what the legend's small swatches of them cover.
    fills = {name: bytes.fromhex(style.split("fill:#")[1][:6]) for name, style in MERMAID_CLASSES.items()}
    assert colours[fills["culprit"]] > 3000 and colours[fills["conflict"]] > 1000, {
        name: colours[fill] for name, fill in fills.items()
    }
