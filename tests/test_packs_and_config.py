"""Rule packs (schema, errors, extra packs) and [tool.dtypelint] settings."""

from __future__ import annotations

import textwrap

import pytest
import torch

import dtypelint
from dtypelint import LoadError, UsageError
from dtypelint.cli import main
from dtypelint.config import load_settings
from dtypelint.packs.schema import load_pack
from dtypelint.shipped import available_packs

CUSTOM_PACK = """
[pack]
name = "acme-npu"
intended-fp32 = ["*.calibration"]

[[contract]]
code = "ACM101"
name = "head-weight-dtype"
kernel = "acme.fused_head"
summary = "The head kernel takes the weight in the dtype of its input."
why = "acme.fused_head asserts weight.dtype == input.dtype."
references = ["ACME NPU SDK 3.1, fused_head"]
modules = ["Linear"]
tensors = ["param:weight"]
must-match = "input"
fix = "cast"
fix-safety = "safe"
"""


def write(tmp_path, text, name="pack.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_packs_load_and_have_unique_codes():
    assert {"hf-eager", "ipex-llm-xpu"} <= set(available_packs())
    ipex = load_pack("ipex-llm-xpu")
    assert [c.code for c in ipex.contracts] == [f"IPX10{n}" for n in range(1, 9)]
    assert all(c.references and c.summary and c.why for c in ipex.contracts)
    assert ipex.keeps_fp32("model.rotary_emb.inv_freq")


def test_a_pack_by_path_adds_its_contracts(tmp_path):
    pack = write(tmp_path, CUSTOM_PACK)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4).half(), torch.nn.ReLU())
    model[0].bias.data = model[0].bias.data.float()  # the weight is fine: the contract checks weights only
    clean = dtypelint.audit(model, torch.randn(2, 4, dtype=torch.float16), packs=[str(pack)], select=["ACM"])
    assert clean.findings == []
    model[0].weight.data = model[0].weight.data.float()
    report = dtypelint.audit(model, torch.randn(2, 4, dtype=torch.float16), packs=[str(pack)], select=["ACM"])
    assert [(f.code, f.tensor, f.op) for f in report.findings] == [("ACM101", "0.weight", "acme.fused_head")]
    assert report.findings[0].fix.safety == "safe"
    as_backend = dtypelint.audit(model, torch.randn(2, 4, dtype=torch.float16), backend=str(pack), select=["ACM"])
    assert as_backend.backend == "acme-npu" and len(as_backend.findings) == 1


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda t: t.replace('name = "acme-npu"', ""), "[pack]: 'name' is required"),
        (lambda t: t.replace('code = "ACM101"', 'code = "acm-1"'), "'code' must look like IPX101"),
        (lambda t: t.replace('tensors = ["param:weight"]', 'tensors = ["weights"]'), "unknown selector 'weights'"),
        (lambda t: t.replace('fix-safety = "safe"', 'fix-safety = "maybe"'), "'fix-safety' must be one of"),
        (lambda t: t.replace('modules = ["Linear"]', 'modules = "Linear"'), "'modules' must be a list"),
        (lambda t: t + '\nbogus = 1\n', "'bogus' is not a known key"),
        (lambda t: t.replace('must-match = "input"', 'must-match = "input"\nprint = "x"'), "'print' is not a known"),
        (lambda t: t + "\n[[contract]\n", "not valid TOML"),
        (lambda t: t.replace('fix = "cast"', 'accepted-dtypes = ["float13"]'), "unknown dtype"),
    ],
)
def test_malformed_pack_is_one_line_naming_file_entry_and_problem(tmp_path, mutation, message):
    path = write(tmp_path, mutation(CUSTOM_PACK))
    with pytest.raises(LoadError) as error:
        load_pack(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text
    if "TOML" not in message and "[pack]" not in message:
        assert "contract ACM101" in text or "[[contract]] #1" in text or "contract acm-1" in text


def test_cli_reports_a_malformed_pack_with_exit_2(tmp_path, tiny_llama_path, capsys):
    path = write(tmp_path, CUSTOM_PACK.replace('kernel = "acme.fused_head"', ""))
    assert main(["check", str(tiny_llama_path), "--pack", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'kernel' is required" in err and err.count("\n") == 1


def test_every_rule_code_and_name_is_one_rules_across_generic_rules_and_every_shipped_pack():
    from dtypelint.rules import all_rules

    rules = all_rules()  # the generic rules and every shipped pack together
    assert {pack for pack in available_packs()} >= {"cuda", "bitsandbytes", "ipex-llm-xpu"}
    assert len({rule.code for rule in rules}) == len({rule.name for rule in rules}) == len(rules)


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda t: t.replace('code = "ACM101"', 'code = "DT101"'), "contract DT101: code 'DT101' is already a generic rule's"),
        (lambda t: t.replace('name = "head-weight-dtype"', 'name = "mixed-input"'),
         "contract ACM101: name 'mixed-input' is already a generic rule's"),
        (lambda t: t.replace('code = "ACM101"', 'code = "CUDA101"'), "code 'CUDA101' is already pack cuda's"),
        (lambda t: t.replace('name = "head-weight-dtype"', 'name = "norm-weight-dtype"'),
         "name 'norm-weight-dtype' is already pack cuda's"),
    ],
    ids=["generic-code", "generic-name", "shipped-code", "shipped-name"],
)
def test_a_pack_reusing_a_code_or_name_is_refused_with_one_line(tmp_path, tiny_llama_path, capsys, mutation, message):
    path = write(tmp_path, mutation(CUSTOM_PACK))
    with pytest.raises(LoadError, match=message):
        dtypelint.audit(torch.nn.Linear(4, 4), torch.randn(2, 4), packs=[str(path)])
    assert main(["check", str(tiny_llama_path), "--pack", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and err.count("\n") == 1


def test_two_shipped_packs_in_one_deployment_load_together(tiny_llama_path):
    report = dtypelint.audit_config(tiny_llama_path, backend=["cuda", "bitsandbytes"])
    assert report.backend == "cuda+bitsandbytes"


PYPROJECT = """
[project]
name = "user-model"

[tool.dtypelint]
backend = "ipex-llm-xpu"
dtype = "float16"
ignore = ["low-precision-op"]
fail-on = "warning"
overflow-fraction = 0.25

[tool.dtypelint.per-location-ignores]
"head" = ["DT105"]

[tool.dtypelint.severity]
DT101 = "warning"
"""


def test_pyproject_settings_are_read_and_validated(tmp_path):
    settings = load_settings(write(tmp_path, PYPROJECT, "pyproject.toml"))
    assert (settings.backend, settings.dtype, settings.fail_on) == (("ipex-llm-xpu",), "float16", "warning")
    assert settings.selection.ignore == ["low-precision-op"]
    assert settings.selection.per_location_ignores == {"head": ["DT105"]}
    assert settings.options.overflow_fraction == 0.25
    for bad, message in [
        ('fail-on = "fatal"', "fail_on 'fatal' is not one of"),
        ('rules = ["x.toml"]', "'rules' is now called 'packs'"),
        ("backend = 3", "'backend' must be a pack name or a list of them"),
        ('dtype = "fp13"', "unknown dtype"),
        ("selectt = []", "'selectt' is not a known key"),
        ("overflow-fraction = -1", "positive number"),
    ]:
        broken = write(tmp_path, f"[tool.dtypelint]\n{bad}\n", "broken.toml")
        with pytest.raises(LoadError, match=message):
            load_settings(broken)


def test_settings_feed_the_audit_and_arguments_beat_them(tmp_path, stray_fp32_layer):
    settings = load_settings(write(tmp_path, PYPROJECT, "pyproject.toml"))
    x = torch.randn(2, 16, dtype=torch.float16)
    report = dtypelint.audit(stray_fp32_layer, x, settings=settings)
    assert report.backend == "ipex-llm-xpu"
    codes = {f.code: f.severity for f in report.findings}
    assert codes == {"DT001": "error", "DT101": "warning"}  # DT105 ignored at "head", DT101 softened
    overridden = dtypelint.audit(stray_fp32_layer, x, settings=settings, backend="hf-eager", severity={})
    assert overridden.backend == "hf-eager"
    assert {f.code: f.severity for f in overridden.findings}["DT101"] == "error"


def test_cli_reads_the_nearest_pyproject_and_options_beat_it(tmp_path, tiny_llama_path, capsys, monkeypatch):
    write(tmp_path, PYPROJECT, "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(tiny_llama_path), "--format", "json"]) == 0
    assert '"backend": "ipex-llm-xpu"' in capsys.readouterr().out
    assert main(["check", str(tiny_llama_path), "--backend", "hf-eager", "--format", "json"]) == 0
    assert '"backend": "hf-eager"' in capsys.readouterr().out


def test_selectors_may_name_another_backends_rules_but_not_nonsense(stray_fp32_layer):
    x = torch.randn(2, 16, dtype=torch.float16)
    dtypelint.audit(stray_fp32_layer, x, ignore=["IPX101"])  # valid under hf-eager too
    with pytest.raises(UsageError, match="matches no rule"):
        dtypelint.audit(stray_fp32_layer, x, ignore=["IPX999"])


def test_layers_apply_in_order_and_only_the_keys_they_set(tmp_path):
    file = load_settings(write(tmp_path, PYPROJECT, "pyproject.toml"))
    settings = file.layered({"dtype": None, "fail_on": "info"}, {"backend": "hf-eager,ipex-llm-xpu", "dtype": "auto"})
    assert settings.backend == ("hf-eager", "ipex-llm-xpu") and settings.dtype is None
    assert settings.fail_on == "info" and settings.selection.ignore == ["low-precision-op"]  # from the file
    assert settings.pack.name == "hf-eager+ipex-llm-xpu"
    assert {rule.code for rule in settings.rules} >= {"DT101", "IPX101"}
    with pytest.raises(UsageError, match="unknown setting"):
        file.layered({"rules": ["x.toml"]})
    with pytest.raises(UsageError, match="options takes"):
        file.layered({"options": {"overflow": 1}})


def test_packs_are_parsed_once_per_process_until_the_file_changes(tmp_path):
    assert load_pack("ipex-llm-xpu") is load_pack("ipex-llm-xpu")
    pack = write(tmp_path, CUSTOM_PACK, "acme.toml")
    first = load_pack(pack)
    assert load_pack(pack) is first
    pack.write_text(textwrap.dedent(CUSTOM_PACK).replace("acme.fused_head", "acme.fused_head_v2"))
    assert load_pack(pack) is not first


def test_combined_backends_join_their_contracts_and_refuse_duplicates(tmp_path, stray_fp32_layer):
    x = torch.randn(2, 16, dtype=torch.float16)
    report = dtypelint.audit(stray_fp32_layer, x, backend=["hf-eager", "ipex-llm-xpu"])
    assert report.backend == "hf-eager+ipex-llm-xpu"
    with pytest.raises(LoadError, match="defined by more than one of the packs"):
        dtypelint.audit(stray_fp32_layer, x, backend="ipex-llm-xpu", packs=["ipex-llm-xpu"])
