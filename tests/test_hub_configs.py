"""The Hub-ready configs build (on the meta device) with the parameter count the spec implies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

import clover2_hf  # noqa: F401

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"
EXPECTED_TARGETS = {
    # name: (base model, H, intermediate, attention heads, kv heads, vocab, rope theta)
    "clover2-vicuna-7b-v1.5": ("lmsys/vicuna-7b-v1.5", 4096, 11008, 32, 32, 32000, 10000.0),
    "clover2-llama3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", 4096, 14336, 32, 8, 128256, 500000.0),
    "clover2-smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", 576, 1536, 9, 3, 49152, 100000.0),
}


def spec_parameter_count(H: int, intermediate: int, heads: int, kv_heads: int, L: int = 2) -> int:
    """Draft parameters per clover2_spec.md (target lm_head / embedding excluded)."""
    cell = 3 * (H * H + H) + H  # q, k, v with bias + the state RMSNorm
    kv_dim = H // heads * kv_heads
    llama_layer = 2 * H * H + 2 * H * kv_dim + 3 * H * intermediate + 2 * H  # attn + SwiGLU MLP + 2 norms
    fc1 = H * H + H
    fc2 = 2 * H * H + H
    return 2 * cell + L * llama_layer + H + fc1 + fc2 + H  # + augmenting norm + HeadNorm


@pytest.mark.parametrize("name", sorted(EXPECTED_TARGETS))
def test_hub_config_builds_with_spec_parameter_count(name):
    base, H, inter, heads, kv, vocab, theta = EXPECTED_TARGETS[name]
    folder = HUB_CONFIGS / name
    raw = json.loads((folder / "config.json").read_text())
    assert raw["auto_map"]["AutoModel"] == "modeling_clover2.Clover2ForDrafting"
    config = AutoConfig.from_pretrained(folder)
    tc = config.text_config
    assert (config.base_model_name_or_path, tc.hidden_size, tc.intermediate_size) == (base, H, inter)
    assert (tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size) == (heads, kv, vocab)
    assert tc.rope_parameters["rope_theta"] == theta
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == spec_parameter_count(H, inter, heads, kv)
    card = (folder / "README.md").read_text()
    assert f"base_model: {base}" in card and "library_name: transformers" in card
