"""Greedy Clover-2 decoding on the real embedded target (SmolLM2-135M-Instruct) with MT-Bench prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from clover2_hf import Clover2ForDrafting, Clover2Stats, load_default_target
from clover2_hf.tools.bench import load_questions

pytestmark = pytest.mark.slow  # the real SmolLM2-135M target: minutes on a CPU

SHIPPED = Path(__file__).resolve().parents[1] / "hub_configs" / "clover2-smollm2-135m-instruct"


@pytest.fixture(scope="module")
def target_and_draft():
    target, tokenizer = load_default_target()
    if (SHIPPED / "model.safetensors").exists():
        draft = AutoModel.from_pretrained(SHIPPED, dtype=torch.float32).attach_target(target)
    else:  # before the trained drafter is shipped: an untrained one still has to be lossless
        draft = Clover2ForDrafting.from_target(target, draft_vocab_size=8192)
    return target, tokenizer, draft.eval()


def _mt_bench_first_turns(n: int) -> list[str]:
    """The first turn of the first question of each MT-Bench category."""
    return [q.turns[0] for q in load_questions(per_category=1)][:n]


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_smollm2_mt_bench_greedy_identical(target_and_draft, mode):
    target, tokenizer, draft = target_and_draft
    draft.config.decoding = mode
    for prompt in _mt_bench_first_turns(5):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        plain = target.generate(**inputs, max_new_tokens=40, do_sample=False)
        stats = Clover2Stats()
        got = target.generate(**inputs, max_new_tokens=40, do_sample=False, assistant_model=draft, clover2_stats=stats)
        assert torch.equal(plain, got), (prompt, tokenizer.decode(plain[0]), tokenizer.decode(got[0]))
        assert stats.new_tokens == plain.shape[1] - inputs["input_ids"].shape[1]
