"""Attack table: the API and the pytest plugin given values of the wrong type or shape. Each is one
``UsageError``/``LoadError`` line (a failed test with that line, for the plugin), never a raw
exception, and the model is left as it was."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_unchanged, snapshot

import dtypelint
from dtypelint import FixPlan
from dtypelint.errors import DtypelintError
from dtypelint.plan import Change

pytest_plugins = ["pytester"]


def _change(tensor: object = "model.layers.0.self_attn.rotary_emb.inv_freq", to_dtype: object = "float16") -> Change:
    return Change(tensor, "float32", to_dtype, "IPX101", "a reason", "unsafe")  # type: ignore[arg-type]


def _nested(depth: int) -> str:
    return '{"version": 1, "changes": ' + "[" * depth + "]" * depth + "}"


PLAN_ROWS = [
    # (id, the plan: a FixPlan, or JSON text written to a file, or "{dir}"; what the one line says)
    ("name-not-a-string", FixPlan("m", [_change(tensor=5)]), "a change must be a Change of strings"),
    ("dtype-not-a-string", FixPlan("m", [_change(to_dtype=torch.float16)]), "a change must be a Change of strings"),
    ("not-a-change", FixPlan("m", [{"tensor": "x"}]), "a change must be a Change of strings"),  # type: ignore[list-item]
    ("cast-twice", FixPlan("m", [_change(), _change(to_dtype="bfloat16")]),
     "model.layers.0.self_attn.rotary_emb.inv_freq is cast twice, to float16 and to bfloat16"),
    ("unknown-dtype", FixPlan("m", [_change(to_dtype="float99")]), "unknown dtype 'float99'"),
    ("many-unknown-names", FixPlan("m", [_change(tensor=f"no.such.t{i}") for i in range(100_000)]),
     "the fix plan names 100000 tensor(s) the model lacks: no.such.t0, no.such.t1, no.such.t2 and 99997 more"),
    ("a-directory", "{dir}", "is a directory; dtypelint reads regular files only"),
    ("nested-json", _nested(100_000), "not valid JSON: nested too deeply"),
    ("not-an-object", "[1, 2]", "is malformed: version None, expected 1"),
    ("changes-not-a-list", '{"version": 1, "changes": 5}', "is malformed: 'changes' must be a list"),
    ("entry-with-extra-keys", json.dumps({"version": 1, "changes": [{"tensor": "x", "x": 1}]}), "is malformed"),
    ("entry-name-a-number", json.dumps({"version": 1, "changes": [{**_change().__dict__, "tensor": 5}]}),
     "a change must be a Change of strings"),
]


@pytest.mark.parametrize(("plan", "message"), [row[1:] for row in PLAN_ROWS], ids=[row[0] for row in PLAN_ROWS])
def test_apply_plan_refuses_a_bad_plan_in_one_line(plan, message, tmp_path, tiny_llama_fp16):
    if isinstance(plan, str):
        file = tmp_path / "plan.json"
        if plan == "{dir}":
            file.mkdir()
        else:
            file.write_text(plan)
        plan = file
    before = snapshot(tiny_llama_fp16)
    with pytest.raises(DtypelintError) as raised:
        dtypelint.apply_plan(tiny_llama_fp16, plan)
    text = str(raised.value)
    assert "\n" not in text and len(text) < 500 and message in text, text
    assert_unchanged(tiny_llama_fp16, before)


def test_a_plan_naming_the_same_cast_twice_is_one_cast(tiny_llama_fp16):
    """Not a contradiction: applied once, all or nothing."""
    name = next(name for name, _ in tiny_llama_fp16.named_buffers() if name.endswith("inv_freq"))
    assert [c.tensor for c in dtypelint.apply_plan(tiny_llama_fp16, FixPlan("m", [_change(name), _change(name)]))]
    assert tiny_llama_fp16.get_buffer(name).dtype == torch.float16


MARKER_ROWS = [
    # (the marker's keywords, what the failed test's one line says)
    ("backend=5", "dtypelint: @pytest.mark.dtypelint: backend takes a string or a list of strings, not 5"),
    ("backend=[5]", "backend takes a string or a list of strings, not [5]"),
    ("per_location_ignores=[1]", "dtypelint: per_location_ignores maps module globs to lists of codes, not [1]"),
    ("per_location_ignores={'x': 'DT101'}", "per_location_ignores maps module globs to lists of codes"),
    ("severity=['DT101']", "dtypelint: severity maps codes to severities, not ['DT101']"),
    ("select=''", "select names no rule"),
    ("attn_implementation='flash_attention2'", "unknown attn_implementation 'flash_attention2'"),
]


@pytest.mark.parametrize(("keywords", "message"), MARKER_ROWS, ids=[row[0] for row in MARKER_ROWS])
def test_a_marker_with_wrong_types_fails_its_test_with_one_line(keywords, message, pytester):
    pytester.makepyfile(f"""
        import pytest, torch

        @pytest.mark.dtypelint({keywords})
        def test_marked(dtypelint):
            dtypelint.audit(torch.nn.Linear(2, 2), torch.ones(1, 2))
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert message in output and "Traceback" not in output and "TypeError" not in output, output

