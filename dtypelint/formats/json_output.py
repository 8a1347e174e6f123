"""``json``: ``Report.to_dict()``, indented, every text exact::

    {
      "model": "LlamaForCausalLM",           # class name of the audited model
      "backend": "hf-eager",                 # name of the rule pack in use
      "mode": "value" | "meta",
      "compute_dtype": "float16",
      "steps": 2,                            # calls traced: the prompt and decode steps (--steps)
      "model_source": "config.architectures",  # where the class name came from (or "--model-class",
                                               # a task mapping); only for a checkpoint or config
      "inputs": [{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}],  # what dtypelint made;
                                               # only for a checkpoint or config
      "summary": {"error": 2, "warning": 1, "info": 0},
      "graph": {"ops": 123, "tensors": 456}, # size of the traced dtype graph
      "notes": ["..."],                      # what the audit could not do or assumed
      "findings": [
        {
          "code": "DT101",                   # rule code (`dtypelint explain DT101`)
          "category": "mixed-input",         # one of dtypelint.CATEGORIES
          "severity": "error" | "warning" | "info",
          "location": "model.layers.0.mlp",  # module path; "" for the model itself
          "tensor": "head.weight" | null,    # parameter / buffer / input at fault
          "op": "aten.addmm" | null,         # the op concerned
          "dtypes": ["float16", "float32"],
          "message": "...",
          "fix": null | {"tensors": ["head.weight"], "to_dtype": "float16",
                         "safety": "safe" | "unsafe", "description": "..."},
          "pack": "cuda" | null                # the backend pack of a kernel contract; null: generic
        }
      ],
      "groups": [                            # findings that differ only in layer indices, as the text
        {                                    # formats list them; every finding stays in "findings"
          "code": "CUDA102", "location": "model.layers.{0..79}.self_attn", "count": 80,
          "message": "...", "findings": [0, 1, 2]   # indices into "findings"
        }
      ],
      "fix": {                               # only after --fix / --diff: formats.fix.fix_dict
        "applied": true, "rolled_back": false, "reason": null,
        "outcome": "cast 1 tensor; re-audit: ...",
        "changes": [{"tensor": "head.weight", "from_dtype": "float32", "to_dtype": "float16", ...}],
        "output_change": {"DT105": [0.0012, 0.004]}, "rope_error": {}, "unread": [], "notes": [],
        "saved": null,
        "after": {"summary": {...}, "findings": [...]}   # the re-audit; null when it did not run
      }
    }

After ``--fix`` the top level is the audit the fix started from, as in every format. The keys are stable;
new keys may be added.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from dtypelint.formats.base import FormatContext, audited
from dtypelint.formats.fix import fix_dict

if TYPE_CHECKING:
    from dtypelint.report import Report


def render_json(report: Report, context: FormatContext) -> str:
    data = audited(report, context).to_dict()
    if context.fix is not None:
        data["fix"] = fix_dict(context.fix)
    return json.dumps(data, indent=2)
