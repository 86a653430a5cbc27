"""Regenerate the Hub-ready `config.json` + model card folders under hub_configs/.

Run from the repository root: `python hub_configs/make_hub_configs.py`. The target dimensions are
those of the public checkpoints' own config.json files; no weights are read or written here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig

from clover2_hf import Clover2Config, Clover2ForDrafting

HERE = Path(__file__).resolve().parent

TARGETS = {
    "clover2-vicuna-7b-v1.5": (
        "lmsys/vicuna-7b-v1.5",
        LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        ),
    ),
    "clover2-llama3-8b-instruct": (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False,
        ),
    ),
    "clover2-smollm2-135m-instruct": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        ),
    ),
}


def build_config(name: str) -> Clover2Config:
    base, target_config = TARGETS[name]
    return Clover2Config(text_config=target_config.to_dict(), base_model_name_or_path=base)


def main() -> None:
    for name in TARGETS:
        out = HERE / name
        if (out / "model.safetensors").exists():
            print("kept", out, "(trained weights: its config and card come from the training run)")
            continue
        out.mkdir(exist_ok=True)
        config = build_config(name)
        config.architectures = ["Clover2ForDrafting"]
        # The code files that `trust_remote_code` loading needs are added by save_pretrained /
        # push_to_hub when weights exist; they are not duplicated into this source tree.
        config.auto_map = {
            "AutoConfig": "configuration_clover2.Clover2Config",
            "AutoModel": "modeling_clover2.Clover2ForDrafting",
        }
        config.to_json_file(out / "config.json")
        with torch.device("meta"):
            model = Clover2ForDrafting(config)
        note = (
            "**This folder is a Hub-ready configuration; no weights for this target have been trained "
            "by the project yet.**"
        )
        model.model_card(extra_text=note).save(out / "README.md")
        print("wrote", out)


if __name__ == "__main__":
    main()
