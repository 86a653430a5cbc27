"""Self-distillation data (`clover2 self-distill`) and continuing a drafter (`clover2 train --init-from`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import BYTE_VOCAB, byte_chat_tokenizer, make_tiny_target

from clover2_hf.data import DataSummary, DistillationData, load_conversations, split_of
from clover2_hf.tools.selfdistill import generate_answers


def _chats(n: int) -> list[dict]:
    return [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": "hi " * (1 + i % 4) + str(i)},
        {"from": "gpt", "value": "an answer written by someone else"},
        {"from": "human", "value": "a second turn that is never answered"},
        {"from": "gpt", "value": "..."},
    ]} for i in range(n)]


@pytest.fixture(scope="module")
def target_and_tokenizer():
    tokenizer = byte_chat_tokenizer()
    target = make_tiny_target("llama", vocab_size=BYTE_VOCAB, peaked=True, eos_token_id=2, pad_token_id=0)
    target.generation_config.eos_token_id = 2
    return target, tokenizer


def test_answers_are_the_targets_own_greedy_answers(target_and_tokenizer, tmp_path, one_thread):
    target, tokenizer = target_and_tokenizer
    out = tmp_path / "answers.jsonl"
    summary = generate_answers(target, tokenizer, out, _chats(7), max_new_tokens=12, batch_size=3, progress=False)
    assert summary.written + summary.skipped["empty_answer"] == 7
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == summary.written > 0
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"]  # first user turn only
        prompt = [{"role": "user", "content": turns[0]["value"]}]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        alone = target.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids["input_ids"].shape[1]:]
        alone = alone[: (alone == 2).nonzero()[0, 0]] if (alone == 2).any() else alone
        # left padding in a mixed-length batch changes nothing
        assert turns[1]["value"] == tokenizer.decode(alone, skip_special_tokens=True).strip()
        assert record["finish"] == ("eos" if len(alone) < 12 else "length")
    # ids are kept, so each answer stays on its source conversation's side of the split
    assert {r["id"] for r in records} <= {f"c{i}" for i in range(7)}
    loaded = load_conversations(out)
    assert [c.id for c in loaded] == [r["id"] for r in records]
    assert all(split_of(c.id) == split_of(c.id) for c in loaded)


def test_resume_skips_answered_ids_and_drops_a_torn_line(target_and_tokenizer, tmp_path, one_thread):
    target, tokenizer = target_and_tokenizer
    out = tmp_path / "answers.jsonl"
    generate_answers(target, tokenizer, out, _chats(4), max_new_tokens=6, batch_size=2, progress=False)
    first = out.read_text().splitlines()
    with out.open("a") as handle:
        handle.write('{"id": "c9", "conversa')  # a run killed mid-write
    summary = generate_answers(target, tokenizer, out, _chats(6), max_new_tokens=6, batch_size=2, progress=False)
    lines = out.read_text().splitlines()
    assert lines[: len(first)] == first
    assert summary.already_done == len(first)
    assert sorted(json.loads(line)["id"] for line in lines) == sorted({json.loads(line)["id"] for line in lines})
    assert all(json.loads(line) for line in lines)


def test_resume_reads_answers_holding_unicode_line_separators(target_and_tokenizer, tmp_path):
    from clover2_hf.tools.selfdistill import _done_ids

    out = tmp_path / "answers.jsonl"
    record = {"id": "u1", "conversations": [{"from": "human", "value": "q"},
                                           {"from": "gpt", "value": "one\u2028two\u2029three\x85four"}]}
    out.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _done_ids(out) == {"u1"}


def test_long_prompts_are_skipped_and_counted(target_and_tokenizer, tmp_path, one_thread):
    target, tokenizer = target_and_tokenizer
    chats = _chats(3)
    chats[1]["conversations"][0]["value"] = "x" * 500
    summary = generate_answers(target, tokenizer, tmp_path / "a.jsonl", chats, max_prompt_tokens=100,
                               max_new_tokens=4, batch_size=2, progress=False)
    assert summary.skipped["prompt_too_long"] == 1
    assert "c1" not in (tmp_path / "a.jsonl").read_text()


def _stub_training(monkeypatch, target):
    import clover2_hf.tools.recipes as recipes_module
    import clover2_hf.tools.targets as targets_module

    tokenizer = SimpleNamespace(pad_token_id=0)
    examples = [{"id": f"e{i}", "input_ids": [(7 * i + j) % 150 + 3 for j in range(24)], "loss_mask": [0] * 8 + [1] * 16}
                for i in range(10)]
    monkeypatch.setattr(targets_module, "load_target", lambda name, dtype=torch.float32: (target.to(dtype), tokenizer))
    summary = DataSummary(records=10, conversations=10, examples=10, train=8, eval=2)
    monkeypatch.setattr(recipes_module, "build_examples",
                        lambda *a, **k: DistillationData(train=examples[:8], eval=examples[8:], summary=summary))


def test_bf16_training_keeps_float32_master_weights_and_init_from_continues(tmp_path, monkeypatch):
    from clover2_hf.modeling_clover2 import Clover2ForDrafting
    from clover2_hf.tools.recipes import TrainRecipe, train

    target = make_tiny_target("llama")
    _stub_training(monkeypatch, target)
    common = dict(max_steps=2, batch_size=2, grad_accum=1, warmup_steps=0, logging_steps=1, eval_steps=100,
                  save_steps=100, num_draft_depths=2, bf16=True)
    first = train(TrainRecipe(output_dir=str(tmp_path / "stage1"), draft_vocab_size=32, **common))
    # an AdamW step of lr 1e-3 on a weight of 1.0 is below bf16's resolution: master weights must be fp32
    assert {p.dtype for p in first.parameters()} == {torch.float32}
    saved = Clover2ForDrafting.from_pretrained(tmp_path / "stage1" / "final")
    # learning rate 0: the continued run must hold exactly the weights it was started from
    second = train(TrainRecipe(output_dir=str(tmp_path / "stage2"), init_from=str(tmp_path / "stage1" / "final"),
                               **{**common, "learning_rate": 0.0}))
    assert torch.equal(second.d2t, saved.d2t)  # the draft vocabulary is kept, not recomputed
    reference = saved.state_dict()
    assert all(torch.equal(p, reference[n]) for n, p in second.state_dict().items())
    fresh = Clover2ForDrafting.from_target(target.float(), num_draft_depths=2)
    assert not torch.equal(fresh.fc1.weight, saved.fc1.weight)  # so the equality above is not the init's
    assert "continued from the drafter" in (tmp_path / "stage2" / "final" / "README.md").read_text()
    # sizes not given again are taken from the drafter being continued (it has 2 depths, not the default 5)
    third = train(TrainRecipe(output_dir=str(tmp_path / "stage2b"), init_from=str(tmp_path / "stage1" / "final"),
                              **{k: v for k, v in common.items() if k != "num_draft_depths"}))
    assert third.config.num_draft_depths == 2
    with pytest.raises(ValueError, match="--num-draft-depths 3 .*has 2"):
        train(TrainRecipe(output_dir=str(tmp_path / "stage3"), init_from=str(tmp_path / "stage1" / "final"),
                          **{**common, "num_draft_depths": 3}))


def test_clover2_evaluate_scores_the_held_out_split(tmp_path, monkeypatch, capsys):
    from clover2_hf.tools.recipes import evaluate_drafter

    from clover2_hf.tools.cli import main
    from clover2_hf.tools.recipes import TrainRecipe, train

    target = make_tiny_target("llama")
    _stub_training(monkeypatch, target)
    train(TrainRecipe(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, grad_accum=1, warmup_steps=0,
                      logging_steps=1, eval_steps=100, save_steps=100, num_draft_depths=2))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--draft", str(tmp_path / "run" / "final"), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"eval_top1_0", "eval_top1_1", "eval_top5_0", "eval_loss"} <= set(metrics)
    assert 0.0 <= metrics["eval_top1_0"] <= metrics["eval_top5_0"] <= 1.0
    printed = capsys.readouterr().out
    assert "top1" in printed and f"{metrics['eval_top1_1']:.3f}" in printed
    with pytest.raises(ValueError, match="no held-out conversations"):
        evaluate_drafter(str(tmp_path / "run" / "final"), max_eval_examples=0)
