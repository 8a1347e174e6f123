"""Build the tiny example Llama checkpoint shipped in ``examples/tiny-llama``.

hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 256; float16 safetensors and a config.json with the
classic keys, so transformers 4.37 (ipex-llm's pin) and transformers 5 both load it. Loaded with
``dtype=torch.float16`` it reproduces the seed's state: float16 parameters, float32 ``inv_freq``
(a non-persistent buffer the checkpoint cannot hold).

    python examples/build_tiny_llama.py [OUTPUT_DIR]

With ``--low-bit``, in the ipex-llm environment, it also writes ``examples/tiny-llama-low-bit``: the
same model quantized by ipex-llm (``from_pretrained(load_in_4bit=True)``) and saved with
``save_low_bit``, which ``load_low_bit`` loads as in the seed report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}


def build(output: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"}))
    output.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, output / "model.safetensors", metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    return output


def build_low_bit(source: Path, output: Path) -> Path:
    from ipex_llm.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), load_in_4bit=True)
    model.config._name_or_path = source.name  # not the absolute path of the machine that built it
    model.save_low_bit(str(output))
    return output


if __name__ == "__main__":
    arguments = [argument for argument in sys.argv[1:] if argument != "--low-bit"]
    target = Path(arguments[0]) if arguments else Path(__file__).parent / "tiny-llama"
    print(build(target))
    if "--low-bit" in sys.argv:
        print(build_low_bit(target, target.with_name(target.name + "-low-bit")))
