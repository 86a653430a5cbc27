"""Which target a tool runs on, and on which device: shared by train, features and self-distill."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = ["RANDOM_SHAPES", "load_target", "local_device", "random_target"]

#: Real models' shapes for targets with random weights (loop-cost measurements without a download).
RANDOM_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
}


def load_target(name_or_path: str | None, dtype: torch.dtype = torch.float32, device_map=None):
    """(model, tokenizer) for a Hub id / local dir, or the embedded SmolLM2 target when None."""
    if name_or_path is None:
        from .embedded import load_default_target

        return load_default_target(dtype=dtype, device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, device_map=device_map)
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)


def local_device() -> torch.device:
    """This process's device under `accelerate launch` (or the only device without it)."""
    from accelerate import PartialState

    return PartialState().device


def random_target(shape: str | dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A Llama causal LM with random weights in `shape` (a `RANDOM_SHAPES` name or config values), built
    directly on `device` in `dtype`. It never stops early (no eos): every call generates its full length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = RANDOM_SHAPES[shape] if isinstance(shape, str) else shape
    torch.manual_seed(0)
    config = LlamaConfig(**values, max_position_embeddings=4096, rms_norm_eps=1e-5, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
