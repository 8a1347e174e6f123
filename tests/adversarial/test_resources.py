"""Attack table: inputs that would make an audit's time or memory unbounded."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

import dtypelint
from dtypelint.cli import main
from dtypelint.config import load_settings
from dtypelint.errors import LoadError
from dtypelint.rules.base import Options

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


class Loop(nn.Module):
    """``steps`` tiny ops (one aten.add each), then optionally a failing matmul."""

    def __init__(self, steps: int, fail: bool = False) -> None:
        super().__init__()
        self.steps, self.fail = steps, fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = x + 1
        if self.fail:
            x = x @ torch.ones(3, 3)
        return x


def _ops(report: dtypelint.Report) -> int:
    return sum(1 for _ in report.graph.ops())


def _audit_with_options(model: nn.Module, max_ops: int, tmp_path: Path) -> dtypelint.Report:
    return dtypelint.audit(model, torch.ones(2), options=Options(max_ops=max_ops))


def _audit_with_settings(model: nn.Module, max_ops: int, tmp_path: Path) -> dtypelint.Report:
    (tmp_path / "pyproject.toml").write_text(f"[tool.dtypelint]\nmax-ops = {max_ops}\n")
    return dtypelint.audit(model, torch.ones(2), settings=load_settings(tmp_path / "pyproject.toml"))


CAPPED_AUDITS = {"Options(max_ops=)": _audit_with_options, "[tool.dtypelint] max-ops": _audit_with_settings}


@pytest.mark.parametrize("how", list(CAPPED_AUDITS))
def test_past_max_ops_the_trace_only_counts_and_says_so(how, tmp_path) -> None:
    report = CAPPED_AUDITS[how](Loop(5000), 1000, tmp_path)
    assert _ops(report) == 1000
    assert report.graph.graph["ops_run"] == 5000 and report.graph.graph["ops_recorded"] == 1000
    [finding] = report.by_code("DT002")
    assert finding.severity == "warning"
    assert "5000 ops" in finding.message and "first 1000" in finding.message and "only that part" in finding.message


def test_the_forward_runs_on_past_the_cap_and_its_error_is_still_reported() -> None:
    report = dtypelint.audit(Loop(3000, fail=True), torch.ones(2), options=Options(max_ops=100))
    assert {f.code for f in report.findings} == {"DT001", "DT002"}
    assert "cannot be multiplied" in report.by_code("DT001")[0].message


def test_under_the_cap_nothing_changes() -> None:
    report = dtypelint.audit(Loop(50), torch.ones(2), options=Options(max_ops=50))
    assert _ops(report) == 50 and report.findings == []
    assert Options().max_ops == 200_000


def test_memory_stays_bounded_past_the_cap() -> None:
    """About 4 KB of Python objects per recorded op: 40k uncapped ops would take ~170 MB."""
    tracemalloc.start()
    try:
        report = dtypelint.audit(Loop(40_000), torch.ones(2), options=Options(max_ops=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.graph.graph["ops_run"] == 40_000
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MB"


def test_tracer_records_at_most_max_ops() -> None:
    model, x = Loop(300), torch.ones(2)
    with dtypelint.Tracer(model, max_ops=10) as tracer:
        model(x)
    assert len(tracer.records) == 10 and tracer.ops_run == 300


def test_cli_max_ops(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "loop_entry.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Loop(nn.Module):\n"
        "    def forward(self, x):\n"
        "        for _ in range(500):\n"
        "            x = x + 1\n"
        "        return x\n\n"
        "def build():\n    return Loop(), torch.ones(2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    main(["check", "--entry", "loop_entry:build", "--max-ops", "100", "--format", "json", "--exit-zero"])
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert [f["code"] for f in findings] == ["DT002"] and "500 ops" in findings[0]["message"]


META_GROWTH = """
import resource, sys
import dtypelint
from dtypelint.load import load_config

config = load_config(sys.argv[1])
config.max_position_embeddings = 200_000  # seq_len 100k is then valid for the model itself
small = dtypelint.audit_config(config)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
big = dtypelint.audit_config(config, batch=1000, seq_len=100_000)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
key = lambda report: [(f.code, f.location, f.tensor, f.op) for f in report.findings]
ops = lambda report: [report.graph.nodes[op]["target"] for op in report.graph.ops()]
print(growth, key(small) == key(big), ops(small) == ops(big), big.graph.graph["error"])
"""


def test_meta_mode_inputs_are_fake_so_memory_does_not_grow_with_batch_times_seq(tiny_llama_path) -> None:
    """batch x seq_len = 10^8: real int64 input_ids and mask alone would take 1.6 GB."""
    run = subprocess.run(
        [sys.executable, "-c", META_GROWTH, str(tiny_llama_path)],
        capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    growth, same_findings, same_ops, error = run.stdout.split()
    assert float(growth) < 100, f"peak RSS grew {growth} MB"
    assert same_findings == "True" and same_ops == "True" and error == "None"


# Bounds on what a config may ask for ---------------------------------------------------------------------

ADDRESS_SPACE = 4 * 2**30  # a run that allocated what the hostile configs ask for would fail under it


def _capped_check(*arguments: str) -> subprocess.CompletedProcess:
    """``dtypelint check ... -q`` in a process that cannot map more than ADDRESS_SPACE: a bound that gave
    way would end in an allocation failure, and one that let a build run on would time out, not hang."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    return subprocess.run([sys.executable, "-m", "dtypelint.cli", "check", *arguments, "-q"], capture_output=True,
                          text=True, timeout=180, env={"PYTHONPATH": str(ROOT), "PATH": ""}, preexec_fn=cap)


def _config_with(source: Path, target: Path, weights: bool = False, **changes: object) -> Path:
    """A copy of ``source``'s config.json with ``changes`` (a checkpoint too with ``weights``)."""
    if weights:
        shutil.copytree(source, target)
    else:
        target.mkdir()
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


TINY_TEXT = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 4, "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 256}
# A mixture of experts whose experts are modules in every transformers (a ModuleDict): 10 modules each.
TINY_SWITCH = {"model_type": "switch_transformers", "architectures": ["SwitchTransformersForConditionalGeneration"],
               "num_experts": 300, "d_model": 32, "d_ff": 64, "num_heads": 4, "d_kv": 8, "num_layers": 2,
               "num_decoder_layers": 2, "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1,
               "vocab_size": 64, "decoder_start_token_id": 0, "pad_token_id": 0}
TINY_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoints whose input sizes the weights do not fix (a ResNet sized by its preprocessor, a
    wav2vec2 by its strides), and a tiny LLaVA config (meta mode) with image placeholder tokens."""
    from transformers import ResNetConfig, ResNetForImageClassification, Wav2Vec2Config, Wav2Vec2ForCTC

    root = tmp_path_factory.mktemp("bounded")
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1],
                                              layer_type="basic", num_labels=2)).save_pretrained(root / "resnet")
    (root / "resnet" / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    Wav2Vec2ForCTC(Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, vocab_size=32,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )).save_pretrained(root / "wav2vec2")
    (root / "switch").mkdir()
    (root / "switch" / "config.json").write_text(json.dumps(TINY_SWITCH))
    (root / "llava").mkdir()
    (root / "llava" / "config.json").write_text(json.dumps({
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": TINY_TEXT,
        "vision_config": TINY_VISION, "image_token_index": 63,
    }))
    return root


def _hostile(checkpoints: Path, tiny: Path, tmp: Path, name: str) -> Path:
    """The checkpoint or config of one attack row."""
    huge_image = {"size": {"height": 100_000, "width": 100_000}}
    if name == "preprocessor-image-size":
        target = shutil.copytree(checkpoints / "resnet", tmp / name)
        (target / "preprocessor_config.json").write_text(json.dumps(huge_image))
        return target
    made = {
        "conv-stride": lambda: _config_with(checkpoints / "wav2vec2", tmp / name, True, conv_stride=[100_000, 100_000]),
        "image-seq-length-meta": lambda: _config_with(checkpoints / "llava", tmp / name, image_seq_length=10**10),
        "layers-meta": lambda: _config_with(tiny, tmp / name, num_hidden_layers=10**7),
        "layers-value": lambda: _config_with(tiny, tmp / name, True, num_hidden_layers=10**7),
        "sub-config-layers-meta": lambda: _config_with(checkpoints / "llava", tmp / name,
                                                       text_config={**TINY_TEXT, "num_hidden_layers": 5000}),
        "experts-meta": lambda: _config_with(checkpoints / "switch", tmp / name, num_experts=10**6),
        "vocab-over-the-weights": lambda: _config_with(tiny, tmp / name, True, vocab_size=10**9),
    }
    return made[name]()


# (row, what the one line must say: {dir} is the row's directory); rows have the default bounds but one
BOUND_ROWS = [
    ("preprocessor-image-size",
     "error: pixel_values [1, 3, 100000, 100000] would hold 30000000000 elements, over the bound of 33554432 input "
     "elements (raise it with --max-input-elements N): sized by 'size' {{'height': 100000, 'width': 100000}} in "
     "{dir}/preprocessor_config.json"),
    ("conv-stride", "error: input_values [1, 320000000010] would hold 320000000010 elements, over the bound of "
     "33554432 input elements (raise it with --max-input-elements N): sized by 'conv_stride' [100000, 100000] in "
     "{dir}/config.json, 'conv_kernel' [10, 3] in {dir}/config.json"),
    ("image-seq-length-meta", "error: the image placeholder tokens of input_ids [10000000000] would hold 10000000000 "
     "elements, over the bound of 33554432 input elements (raise it with --max-input-elements N): sized by "
     "'image_seq_length' 10000000000 in {dir}/config.json"),
    ("layers-meta", "error: {dir}/config.json: 'num_hidden_layers' is 10000000, over the bound of 1024 layers a "
     "config may ask for; raise it with --max-layers N"),
    ("layers-value", "error: {dir}/config.json: 'num_hidden_layers' is 10000000, over the bound of 1024 layers"),
    ("sub-config-layers-meta", "error: {dir}/config.json: 'text_config.num_hidden_layers' is 5000, over the bound of "
     "1024 layers"),
    # a bound of 8 layers, 2048 modules, stops it at once (the default bound, 262144 modules, in seconds)
    ("experts-meta", "error: {dir}/config.json: SwitchTransformersForConditionalGeneration built more than 2048 "
     "modules (256 a layer for --max-layers 8) and was stopped: the config asks for 'num_experts' 1000000; raise "
     "the bound with --max-layers N"),
    ("vocab-over-the-weights", "error: cannot load {dir}: {dir}/config.json asks for a model of {parameters} "
     "parameters, more than its weight files hold ({stored} bytes: under one bit per parameter)"),
]


@pytest.mark.parametrize(("name", "message"), BOUND_ROWS, ids=[row[0] for row in BOUND_ROWS])
def test_a_config_asking_for_too_much_is_refused_before_it_is_allocated(name, message, checkpoints, tiny_llama_path,
                                                                        tmp_path):
    target = _hostile(checkpoints, tiny_llama_path, tmp_path, name)
    started = time.monotonic()
    run = _capped_check(str(target), *(["--max-layers", "8"] if name == "experts-meta" else []))
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and _expected(message, target) in run.stderr, run.stderr
    assert time.monotonic() - started < 60


def _expected(message: str, target: Path) -> str:
    """The row's line for ``target``: the parameters are the tiny Llama's with a vocabulary of 10^9 (its
    embedding and untied head alone hold 2 * 64 * 10^9), counted the way a reader would."""
    if "{parameters}" not in message:
        return message.format(dir=target)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert parameters > 2 * 64 * 10**9
    return message.format(dir=target, parameters=parameters, stored=(target / "model.safetensors").stat().st_size)


def test_a_head_size_no_model_has_still_audits_in_meta_mode_in_bounded_memory(tiny_llama_path, tmp_path):
    """hidden_size 10^7 costs nothing on the meta device; the rotary error DT107 measures on the real
    frequencies of that width once took 20 minutes (and before that 40 GB)."""
    target = _config_with(tiny_llama_path, tmp_path / "wide", hidden_size=10**7, num_attention_heads=1,
                          num_key_value_heads=1)
    started = time.monotonic()
    run = _capped_check(str(target), "--exit-zero")
    assert run.returncode == 0 and "LlamaForCausalLM [meta, float16" in run.stdout, run.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("bound", [3071, 3072])
def test_max_input_elements_raises_the_input_bound(bound, checkpoints, capfd):
    """The ResNet's 32x32 preprocessor image is 3072 elements: one under it is refused, at it the audit runs."""
    code = main(["check", str(checkpoints / "resnet"), "--max-input-elements", str(bound), "-q", "--exit-zero"])
    err = capfd.readouterr().err
    if bound < 3 * 32 * 32:
        assert code == 2 and "pixel_values [1, 3, 32, 32] would hold 3072 elements, over the bound of 3071" in err
        assert "'size' {'height': 32, 'width': 32} in" in err
    else:
        assert code == 0 and err == ""


def _audit_layers_with_cli(path: Path, bound: int, tmp_path: Path) -> int:
    return main(["check", str(path), "--max-layers", str(bound), "-q", "--exit-zero"])


def _audit_layers_with_settings(path: Path, bound: int, tmp_path: Path) -> int:
    (tmp_path / "pyproject.toml").write_text(f"[tool.dtypelint]\nmax-layers = {bound}\n")
    return main(["check", str(path), "--config", str(tmp_path / "pyproject.toml"), "-q", "--exit-zero"])


def _audit_layers_with_api(path: Path, bound: int, tmp_path: Path) -> int:
    try:
        dtypelint.audit_config(path, options=Options(max_layers=bound))
    except LoadError as error:
        print(f"dtypelint: error: {error}", file=sys.stderr)
        return 2
    return 0


LAYER_BOUNDS = {"--max-layers": _audit_layers_with_cli, "[tool.dtypelint] max-layers": _audit_layers_with_settings,
                "Options(max_layers=)": _audit_layers_with_api}


@pytest.mark.parametrize(("how", "mode"), [(how, "meta") for how in LAYER_BOUNDS]
                         + [(how, "value") for how in LAYER_BOUNDS if how.startswith(("--", "[tool"))])
def test_max_layers_raises_the_layer_bound(how, mode, tiny_llama_path, tmp_path, capfd):
    """Five tiny layers: a bound of 4 refuses them, a bound of 5 audits them (in value mode the five layers
    lack weights, which is then the error: the bound let the load go on). audit_config is meta mode."""
    target = _config_with(tiny_llama_path, tmp_path / "five", weights=mode == "value", num_hidden_layers=5)
    assert LAYER_BOUNDS[how](target, 4, tmp_path) == 2
    assert "'num_hidden_layers' is 5, over the bound of 4 layers" in capfd.readouterr().err
    code = LAYER_BOUNDS[how](target, 5, tmp_path)
    err = capfd.readouterr().err
    if mode == "meta":
        assert code == 0 and err == ""
    else:
        assert code == 2 and "missing tensor(s) against its config: model.layers.2." in err


def _shipped_configs() -> list:
    """Every shipped config; Llama 3.1's rope_scaling is newer than transformers 4.37 (4.43 reads it)."""
    from dtypelint.load import transformers_version

    too_new = pytest.mark.skipif(transformers_version() < (4, 43), reason="transformers < 4.43 cannot read Llama 3.1")
    return [pytest.param(path.name, marks=too_new if path.name.startswith("llama-3.1") else ())
            for path in sorted((EXAMPLES / "configs").iterdir())]


@pytest.mark.parametrize("bound", [8, 16])
def test_max_layers_raises_the_bound_on_modules_a_layer_builds(bound, checkpoints, capfd):
    """Four layers, two of them with 300 experts of 10 modules: over 8 * 256 modules, under 16 * 256."""
    code = main(["check", str(checkpoints / "switch"), "--max-layers", str(bound), "-q", "--exit-zero"])
    err = capfd.readouterr().err
    if bound == 8:
        assert code == 2 and "built more than 2048 modules" in err and "'num_experts' 300" in err
    else:
        assert code == 0 and err == ""


@pytest.mark.parametrize("config", _shipped_configs())
def test_the_shipped_configs_of_real_models_are_within_the_bounds(config, capfd):
    """Llama 3 70B and Llama 3.1 405B (126 layers) audit in meta mode under the default bounds."""
    assert main(["check", str(EXAMPLES / "configs" / config), "-q", "--exit-zero"]) == 0
    assert capfd.readouterr().err == ""


def test_an_option_of_the_bounds_must_be_a_positive_integer(tiny_llama_path, tmp_path, capfd):
    (tmp_path / "pyproject.toml").write_text("[tool.dtypelint]\nmax-input-elements = 0\n")
    assert main(["check", str(tiny_llama_path), "--config", str(tmp_path / "pyproject.toml")]) == 2
    assert "'max-input-elements' must be a positive integer, not 0" in capfd.readouterr().err
    assert main(["check", str(tiny_llama_path), "--max-layers", "0"]) == 2
    assert "argument --max-layers: must be a positive integer, not '0'" in capfd.readouterr().err
