"""Which target a tool runs on, and on which device: shared by train, features and self-distill."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = ["load_target", "local_device"]


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
