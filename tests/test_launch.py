"""`accelerate launch` runs the training example unchanged: 2 CPU processes (DDP over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from clover2_hf.tools.embedded import default_target_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two subprocesses under accelerate launch
def test_accelerate_launch_ddp_two_processes(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(default_target_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    target_dir = tmp_path / "target"
    LlamaForCausalLM(config).save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    chats = tmp_path / "chats.jsonl"
    with chats.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"id": f"c{i}", "conversations": [
                {"from": "human", "value": f"Question {i}: what is {i} plus {i}?"},
                {"from": "gpt", "value": f"The answer is {2 * i}. " * (1 + i % 3)},
            ]}) + "\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "examples" / "train_clover2.py"),
        "--output-dir", str(out), "--target", str(target_dir), "--data", str(chats),
        "--max-steps", "3", "--grad-accum", "1", "--max-length", "64", "--save-steps", "3", "--eval-steps", "3",
        "--max-eval-examples", "2", "--num-draft-depths", "2", "--logging-steps", "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (out / "final" / "model.safetensors").exists()
    # two processes of one example each: the Trainer reports a distributed batch of 2
    # 2 processes x 1 example x 3 steps out of <= 24 training examples; one process would reach 3 / 22
    assert state["epoch"] >= 6 / 24
    assert result.stderr.count("saved drafter to") == 1  # only the main process writes the drafter
