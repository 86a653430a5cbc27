"""Distillation loss values and masking, and a few Trainer steps: loss falls, save, resume, reload, decode."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_target
from transformers import AutoModel, TrainingArguments

from clover2_hf import Clover2ForDrafting
from clover2_hf.data import ConversationCollator
from clover2_hf.training import Clover2Trainer, distillation_loss, target_features


def _loss_case(seed: int = 0, **config):
    target = make_tiny_target("llama", seed=seed)
    draft = Clover2ForDrafting.from_target(target, num_draft_depths=3, **config).eval()
    g = torch.Generator().manual_seed(seed)
    B, T, H = 2, 7, 64
    head_states = torch.randn(B, 3, T, H, generator=g)
    post_norm = torch.randn(B, T, H, generator=g)
    loss_mask = torch.ones(B, T, dtype=torch.long)
    return target, draft, head_states, post_norm, loss_mask


def _reference_loss(target, draft, head_states, post_norm, loss_mask, vocab=None, renormalise=False):
    """Plain loops over (b, depth, t), straight from the spec. `vocab`: a truncated draft vocabulary (target
    ids, in head order): the draft scores those rows only, and the target's full-vocabulary probabilities are
    read at those ids (rescaled to sum to 1 only with `renormalise`, which the spec'd loss does not do)."""
    cfg = draft.config
    B, N, T, H = head_states.shape
    W = target.lm_head.weight
    vocab = torch.arange(W.shape[0]) if vocab is None else vocab
    total = 0.0
    for i in range(N):
        reg, ce, n = 0.0, 0.0, 0
        for b in range(B):
            for t in range(T):
                if t + 2 + i >= T or not loss_mask[b, t + 2 + i]:
                    continue
                label = post_norm[b, t + 1 + i]
                reg += F.smooth_l1_loss(head_states[b, i, t], label)
                p = torch.softmax(label @ W.T, -1)[vocab]
                q = torch.log_softmax(head_states[b, i, t] @ W[vocab].T, -1)
                if renormalise:
                    p = p / p.sum()
                ce += -(p * q).sum()
                n += 1
        if n:
            total += cfg.depth_decay**i * (cfg.regression_loss_weight * reg / n + cfg.distillation_loss_weight * ce / n)
    return total


def test_loss_matches_hand_computation():
    target, draft, head_states, post_norm, loss_mask = _loss_case()
    loss_mask[1, 4] = 0
    with torch.no_grad():
        loss, metrics = distillation_loss(draft, head_states, post_norm, loss_mask)
        expected = _reference_loss(target, draft, head_states, post_norm, loss_mask)
    torch.testing.assert_close(loss, torch.as_tensor(expected, dtype=loss.dtype), rtol=1e-5, atol=1e-5)
    assert metrics["valid_0"] == 2 * 5 - 1 and metrics["valid_2"] == 2 * 3 - 1


def test_tiny_loss_value_by_hand():
    """One position, one depth, H = 2: the numbers can be checked on paper."""
    target, draft, _, _, _ = _loss_case()
    draft.config.num_draft_depths = 1
    o = torch.zeros(1, 1, 3, 64)
    g = torch.zeros(1, 3, 64)
    g[0, 1, 0] = 2.0  # label of position 0 is g[1]; SmoothL1(0, 2) = 2 - 0.5 on one of 64 dims
    mask = torch.tensor([[0, 0, 1]])
    with torch.no_grad():
        loss, _ = distillation_loss(draft, o, g, mask)
        p = torch.softmax(g[0, 1] @ target.lm_head.weight.T, -1)
        ce = -(p * torch.log_softmax(torch.zeros(160), -1)).sum()  # o = 0 -> uniform draft
    expected = 10.0 * (1.5 / 64) + 1.0 * float(ce)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(ce) == pytest.approx(torch.log(torch.tensor(160.0)).item(), rel=1e-6)


def test_masked_positions_contribute_nothing():
    target, draft, head_states, post_norm, loss_mask = _loss_case(seed=1)
    loss_mask[0, 5:] = 0
    with torch.no_grad():
        base, _ = distillation_loss(draft, head_states, post_norm, loss_mask)
        noisy = head_states.clone()
        noisy[0, 0, 3:] += 100.0  # depth 0 at t >= 3 predicts x_{t+2}, masked for t + 2 >= 5
        noisy[0, 1, 2:] += 100.0
        changed, _ = distillation_loss(draft, noisy, post_norm, loss_mask)
    assert torch.equal(base, changed)


def test_depth_i_uses_the_target_at_t_plus_1_plus_i():
    target, draft, head_states, post_norm, loss_mask = _loss_case(seed=2)
    loss_mask[:] = 0
    loss_mask[0, 5] = 1  # only x_5 is scored: depth i at t = 3 - i, label position t + 1 + i = 4
    with torch.no_grad():
        base, metrics = distillation_loss(draft, head_states, post_norm, loss_mask)
        assert [metrics[f"valid_{i}"] for i in range(3)] == [1, 1, 1]
        moved = post_norm.clone()
        moved[0, [0, 1, 2, 3, 5, 6]] += 5.0  # everything except position 4
        same, _ = distillation_loss(draft, head_states, moved, loss_mask)
        moved[0, 4] += 5.0
        different, _ = distillation_loss(draft, head_states, moved, loss_mask)
    assert torch.equal(base, same) and not torch.equal(base, different)


def test_truncated_vocabulary_reads_target_probabilities_at_draft_ids():
    target, draft, head_states, post_norm, loss_mask = _loss_case(seed=3, draft_vocab_size=20)
    W = target.lm_head.weight
    with torch.no_grad():
        # row 0 drafts exactly the target's labels at depth 0 and the vocabulary holds the target's choices
        # there, so top-1 hits there and (mostly) misses on row 1: the metric must map draft rows to target ids
        head_states[0, 0, :-1] = post_norm[0, 1:]
        chosen = (post_norm[0, 1:] @ W.T).argmax(-1).unique()
        others = torch.tensor([i for i in range(W.shape[0]) if i not in chosen.tolist()])
        others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(0))]
    vocab = torch.cat([chosen, others[: 20 - len(chosen)]]).flip(0)  # head order != id order
    draft.set_draft_vocab(vocab)
    loss_mask[1, 3] = 0
    with torch.no_grad():
        loss, metrics = distillation_loss(draft, head_states, post_norm, loss_mask)
        expected = _reference_loss(target, draft, head_states, post_norm, loss_mask, vocab=vocab)
        # not renormalised: the loss with the draft ids' probabilities rescaled to sum to 1 is another number
        renormalised = _reference_loss(target, draft, head_states, post_norm, loss_mask, vocab=vocab, renormalise=True)
        # top-1 metric of depth 0: the draft's best row mapped to its target id vs the target's full argmax
        valid = [(b, t) for b in range(2) for t in range(7) if t + 2 < 7 and loss_mask[b, t + 2]]
        hits = [int(vocab[(head_states[b, 0, t] @ W[vocab].T).argmax()] == (post_norm[b, t + 1] @ W.T).argmax())
                for b, t in valid]
    torch.testing.assert_close(loss, torch.as_tensor(expected, dtype=loss.dtype), rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(renormalised)) > 0.1 * float(loss)
    assert metrics["valid_0"] == len(valid)
    assert metrics["top1_0"] == pytest.approx(sum(hits) / len(hits))
    assert 0 < metrics["top1_0"] < 1


def _examples(target, n: int = 12, length: int = 24):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, target.config.vocab_size, (length - i % 5,), generator=g).tolist()
        mask = [0] * 6 + [1] * (len(ids) - 6)
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def _trainer(target, draft, out_dir, max_steps, data):
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
        save_strategy="steps", save_steps=4, logging_steps=1, remove_unused_columns=False, report_to=[],
        use_cpu=True, seed=0, lr_scheduler_type="constant",
    )
    return Clover2Trainer(model=draft, args=args, train_dataset=data, eval_dataset=data[:4],
                          data_collator=ConversationCollator(pad_token_id=0), target=target)


def test_trainer_reduces_loss_saves_resumes_and_reloads(tmp_path):
    target = make_tiny_target("qwen2", peaked=True)
    data = _examples(target)
    draft = Clover2ForDrafting.from_target(target, num_draft_depths=3)
    trainer = _trainer(target, draft, tmp_path, max_steps=8, data=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before
    assert trainer.state.global_step == 8
    checkpoint = tmp_path / "checkpoint-8"
    assert (checkpoint / "model.safetensors").exists()
    # the checkpoint holds drafter tensors only
    from safetensors.torch import load_file

    assert not any("lm_head" in k or "embed" in k for k in load_file(checkpoint / "model.safetensors"))

    # resume in a new trainer: continues from step 8 to 12
    resumed_draft = Clover2ForDrafting.from_target(target, num_draft_depths=3)
    resumed = _trainer(target, resumed_draft, tmp_path, max_steps=12, data=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 12
    history = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h][:1] == [1] and history[-1]["step"] == 12

    # the saved checkpoint reloads with AutoModel and decodes losslessly
    loaded = AutoModel.from_pretrained(tmp_path / "checkpoint-12").eval()
    ids = torch.tensor([data[0]["input_ids"][:6]])
    assert torch.equal(target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=loaded),
                       target.generate(ids, max_new_tokens=12, do_sample=False))


def test_target_features_are_pre_and_post_norm():
    target = make_tiny_target("llama")
    ids = torch.randint(3, 160, (1, 9))
    feats = target_features(target, ids)
    torch.testing.assert_close(target.model.norm(feats.hidden), feats.post_norm)
    with torch.no_grad():
        logits = target(ids).logits
    torch.testing.assert_close(target.lm_head(feats.post_norm), logits, atol=1e-5, rtol=1e-5)
