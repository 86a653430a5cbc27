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


def test_repeated_prompts_are_answered_once(target_and_tokenizer, tmp_path, one_thread):
    target, tokenizer = target_and_tokenizer
    chats = _chats(4)
    chats[3]["conversations"] = [dict(turn) for turn in chats[1]["conversations"]]  # c3 asks what c1 asks
    chats[3]["conversations"][1]["value"] = "another answer, the same question"
    out = tmp_path / "a.jsonl"
    summary = generate_answers(target, tokenizer, out, chats, max_new_tokens=4, batch_size=2, progress=False)
    assert summary.skipped["duplicate_prompt"] == 1
    assert "c3" not in {json.loads(line)["id"] for line in out.read_text().splitlines()}
    # with two turns the prompts differ (c3's second turn is its own): both are answered
    chats[3]["conversations"][2]["value"] = "a different second question"
    summary = generate_answers(target, tokenizer, tmp_path / "b.jsonl", chats, turns=2, max_new_tokens=4,
                               batch_size=2, progress=False)
    assert summary.skipped["duplicate_prompt"] == 0


def test_long_prompts_are_skipped_and_counted(target_and_tokenizer, tmp_path, one_thread):
    target, tokenizer = target_and_tokenizer
    chats = _chats(3)
    chats[1]["conversations"][0]["value"] = "x" * 500
    summary = generate_answers(target, tokenizer, tmp_path / "a.jsonl", chats, max_prompt_tokens=100,
                               max_new_tokens=4, batch_size=2, progress=False)
    assert summary.skipped["prompt_too_long"] == 1
    assert "c1" not in (tmp_path / "a.jsonl").read_text()


def _greedy_alone(target, tokenizer, messages, max_new_tokens, eos=(2,)):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    alone = target.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    alone = alone[0, ids["input_ids"].shape[1]:].tolist()
    return next((alone[:i] for i, t in enumerate(alone) if t in eos), alone)


def test_every_turn_is_answered_with_the_targets_own_earlier_answers_in_context(target_and_tokenizer, tmp_path,
                                                                                 one_thread, monkeypatch):
    target, tokenizer = target_and_tokenizer
    out = tmp_path / "answers.jsonl"
    chats = _chats(6)
    # the tiny target rarely emits its eos: a token its answers do emit ends answers too, so chats go on
    stop = _greedy_alone(target, tokenizer, [{"role": "user", "content": "hi 0"}], 40)[3]
    monkeypatch.setattr(target.generation_config, "eos_token_id", [2, stop])
    for chat in chats[::2]:  # three conversations get a third user turn
        chat["conversations"] += [{"from": "human", "value": "and a third?"}, {"from": "gpt", "value": "..."}]
    summary = generate_answers(target, tokenizer, out, chats, turns=None, max_new_tokens=40, batch_size=4,
                               progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"] for r in records} <= {f"c{i}#turns=all" for i in range(6)}
    answered, cut_short = 0, 0
    for record in records:
        turns = record["conversations"]
        source = next(c["conversations"] for c in chats if c["id"] == record["id"].split("#")[0])
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert [t["value"] for t in turns[::2]] == [t["value"] for t in source[::2]][: len(turns) // 2]
        messages = []
        for user, answer in zip(turns[::2], turns[1::2]):  # each answer: the target's greedy one given ITS history
            messages.append({"role": "user", "content": user["value"]})
            alone = _greedy_alone(target, tokenizer, messages, 40, eos=(2, stop))
            assert answer["value"] == tokenizer.decode(alone, skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": answer["value"]})
            answered += 1
        more = len(turns) // 2 < len(source) // 2
        assert not more or record["finish"] == "length"  # a chat only stops early after a cut answer
        cut_short += more
    assert answered == sum(summary.finished.values()) > len(records)  # later turns were answered
    assert summary.skipped["after_length_cut"] == cut_short > 0  # and each chat cut short is counted
    # every variant stays on its source conversation's side of the split
    assert all(split_of(r["id"], 0.5) == split_of(r["id"].split("#")[0], 0.5) for r in records)
    # the greedy first-turn variant of the same conversations is a different record: a second run adds it
    more = generate_answers(target, tokenizer, out, chats, max_new_tokens=40, batch_size=4, progress=False)
    assert more.already_done == 0 and more.written == len(records)
    again = generate_answers(target, tokenizer, out, chats, turns=None, max_new_tokens=40, batch_size=4,
                             progress=False)
    assert again.written == 0 and again.already_done == len(records)


def test_sampled_answers_are_seeded_variants(target_and_tokenizer, tmp_path, one_thread):
    target, tokenizer = target_and_tokenizer
    chats = _chats(5)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.jsonl"
        generate_answers(target, tokenizer, out, chats, temperature=1.5, seed=seed, max_new_tokens=10,
                         batch_size=5 if name != "b" else 2, progress=False)
        runs[name] = {json.loads(line)["id"]: json.loads(line)["conversations"][1]["value"]
                      for line in out.read_text().splitlines()}
    # another batching draws other samples but writes the same variants: a resume of either file adds nothing
    assert set(runs["a"]) == set(runs["b"]) == {f"c{i}#T=1.5,seed=0" for i in range(5)}
    again = generate_answers(target, tokenizer, tmp_path / "b.jsonl", chats, temperature=1.5, seed=0,
                             max_new_tokens=10, batch_size=5, progress=False)
    assert again.written == 0 and again.already_done == 5
    assert set(runs["c"]) == {f"c{i}#T=1.5,seed=1" for i in range(5)}
    assert list(runs["a"].values()) != list(runs["c"].values())
    greedy = tmp_path / "greedy.jsonl"
    generate_answers(target, tokenizer, greedy, chats, max_new_tokens=10, batch_size=5, progress=False)
    greedy_answers = [json.loads(line)["conversations"][1]["value"] for line in greedy.read_text().splitlines()]
    assert greedy_answers != list(runs["a"].values())
    # the same seed over the same batches draws the same answers
    rerun = tmp_path / "rerun.jsonl"
    generate_answers(target, tokenizer, rerun, chats, temperature=1.5, seed=0, max_new_tokens=10, batch_size=5,
                     progress=False)
    assert [json.loads(line)["conversations"][1]["value"] for line in rerun.read_text().splitlines()] == list(
        runs["a"].values())


def test_self_distill_cli_rejects_bad_turns_and_temperature(capsys):
    from clover2_hf.tools.cli import main

    for flag, value, expected in (("--turns", "0", "expected 'all' or an integer >= 1"),
                                  ("--turns", "some", "expected 'all' or an integer >= 1"),
                                  ("--temperature", "-1", "expected a number >= 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["self-distill", "--output", "x.jsonl", flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


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
