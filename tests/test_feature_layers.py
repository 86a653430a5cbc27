"""`feature_layers`: earlier target layers fused into the drafter's input (EAGLE-3-style), grown from zero."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import make_tiny_target
from drafters import train_on_own_outputs

from clover2_hf import Clover2Config, Clover2ForDrafting
from clover2_hf.generation.capture import PreNormCapture
from clover2_hf.generation.stats import Clover2Stats


def _tiny(arch: str = "llama", layers: int = 3, **overrides):
    return make_tiny_target(arch, num_hidden_layers=layers, **overrides)


@pytest.mark.parametrize("layers", [[], [2], [0, 0], [-1], [True], "0", [0.0]])
def test_feature_layers_are_checked(layers):
    target = _tiny()  # 3 layers: 0 and 1 may be fused; layer 2's output is h_t itself
    with pytest.raises(ValueError, match=r"feature_layers must be distinct target decoder layer indices in \[0, 1\]"):
        Clover2ForDrafting.from_target(target, feature_layers=layers)


def test_capture_reads_the_layer_outputs(one_thread):
    target = _tiny()
    ids = torch.randint(3, 150, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), PreNormCapture(target, [1, 0]) as capture:
        out = target(input_ids=ids, output_hidden_states=True)
    H = target.config.hidden_size
    assert capture.hidden.shape == (2, 9, 3 * H)
    # hidden_states[i + 1] is layer i's output; the last one is post-norm, so h_t is read from the capture alone
    assert torch.equal(capture.hidden[..., H : 2 * H], out.hidden_states[2])
    assert torch.equal(capture.hidden[..., 2 * H :], out.hidden_states[1])
    with torch.no_grad(), PreNormCapture(target) as plain:
        target(input_ids=ids)
    assert torch.equal(capture.hidden[..., :H], plain.hidden)
    assert torch.equal(capture.post_norm, plain.post_norm)


def test_grown_drafter_starts_as_the_drafter_it_continues(tmp_path, one_thread):
    target = _tiny()
    base = Clover2ForDrafting.from_target(target, num_draft_depths=3)
    base.save_pretrained(tmp_path / "base")
    config = Clover2Config.from_pretrained(tmp_path / "base")
    config.feature_layers = [0, 1]
    grown = Clover2ForDrafting.from_pretrained(tmp_path / "base", config=config).attach_target(target)
    assert torch.count_nonzero(grown.feature_fc.weight) == 0
    assert all(torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in grown.feature_norms)
    ids = torch.randint(3, 150, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with PreNormCapture(target) as h_only:
            target(input_ids=ids)
        with PreNormCapture(target, [0, 1]) as fused:
            target(input_ids=ids)
        expected = base.eval()(h_only.hidden, ids, return_logits=True).logits
        got = grown.eval()(fused.hidden, ids, return_logits=True).logits
    assert torch.equal(expected, got)
    # and the fusion does something once it is trained (a weight of 0 would hide a broken input path)
    with torch.no_grad():
        grown.feature_fc.weight.normal_(0, 0.5)
        changed = grown(fused.hidden, ids, return_logits=True).logits
    assert not torch.allclose(changed, expected)
    with pytest.raises(ValueError, match="reads target features of width 192 .* got 64"):
        grown(h_only.hidden, ids)


@functools.cache
def _fused_pair(arch: str):
    """(confident tiny target, drafter fusing its layer 0 trained briefly on its greedy outputs), built once."""
    target = make_tiny_target(arch, seed=1, peaked=True, num_hidden_layers=3)
    return target, train_on_own_outputs(target, steps=40, seqs=16, length=32, seed=0, feature_layers=[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_identical_with_a_trained_feature_layer_drafter(arch, one_thread):
    target, draft = _fused_pair(arch)
    assert torch.count_nonzero(draft.feature_fc.weight) > 0
    prompts = torch.randint(3, 150, (4, 4), generator=torch.Generator().manual_seed(0))
    runs = [dict(), dict(clover2_decoding="chain"), dict(repetition_penalty=1.3),  # device walk, chain, host walk
            dict(tree_budget=8, tree_top_k=3, clover2_static_shapes=True)]
    accepted = 0
    for options in runs:
        for ids in prompts:
            ids = ids[None]
            extra = {k: v for k, v in options.items() if k == "repetition_penalty"}
            expected = target.generate(ids, do_sample=False, max_new_tokens=24, **extra)
            stats = Clover2Stats()
            got = target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=draft, clover2_stats=stats,
                                  **options)
            assert torch.equal(expected, got), options
            accepted += stats.new_tokens - stats.target_forwards
    assert accepted > 0  # drafted tokens were accepted, so the fused features reached the drafts


@pytest.mark.parametrize("walk", [{}, {"repetition_penalty": 1.0001}])  # device walk, host walk
def test_each_draft_reads_the_features_of_its_own_position(walk, one_thread):
    """One drafted token per pass (no lookup path): pass by pass, acceptance must equal the teacher-forced depth-0 hit at the
    position that pass drafts from. A drafter fed the features of a neighbouring row would still decode
    losslessly, but its acceptances would follow other positions' hits."""
    target, draft = _fused_pair("llama")
    draft = copy.deepcopy(draft)  # the cached drafter stays as trained
    with torch.no_grad():
        draft.feature_fc.weight.mul_(4.0)  # let the fused layer weigh in on every draft
    prompts = torch.randint(3, 150, (6, 4), generator=torch.Generator().manual_seed(1))
    outcomes = set()
    for ids in prompts:
        ids = ids[None]
        stats = Clover2Stats()
        got = target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=draft, clover2_stats=stats,
                              tree_budget=1, tree_top_k=1, tree_lookup_tokens=0, **walk)
        assert set(stats.accepted_depths) <= {0, 1}
        with torch.no_grad(), PreNormCapture(target, [0]) as capture:
            target(input_ids=got)
        logits = draft(capture.hidden[:, :-1], got[:, 1:], return_logits=True).logits  # [1, N, T - 1, V]
        drafted = draft.draft_to_target_ids(logits[0, 0, :-1].argmax(-1))
        hits = (drafted == got[0, 2:]).tolist()  # hits[t]: h_t, x_{t+1} -> x_{t+2}
        expected, position = [], ids.shape[1] - 1
        for _ in stats.accepted_depths[:-1]:  # the last pass may be cut by max_new_tokens
            expected.append(int(hits[position]))
            position += 1 + expected[-1]
        assert stats.accepted_depths[:-1] == expected
        outcomes.update(expected)
    assert outcomes == {0, 1}  # both outcomes occurred, so the comparison can tell positions apart


def test_trainer_learns_the_fusion_and_continuing_grows_a_saved_drafter(tmp_path, monkeypatch):
    from test_selfdistill import _stub_training

    from clover2_hf.tools.recipes import TrainRecipe, train

    target = _tiny()
    _stub_training(monkeypatch, target)
    common = {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "warmup_steps": 0, "logging_steps": 1,
              "eval_steps": 100, "save_steps": 100, "num_draft_depths": 2}
    train(TrainRecipe(output_dir=str(tmp_path / "base"), **common))
    saved = Clover2ForDrafting.from_pretrained(tmp_path / "base" / "final")
    assert saved.config.feature_layers is None
    grown = train(TrainRecipe(output_dir=str(tmp_path / "grown"), init_from=str(tmp_path / "base" / "final"),
                              feature_layers=[1], **common))
    assert grown.config.feature_layers == [1]
    assert torch.count_nonzero(grown.feature_fc.weight) > 0  # the zero-initialised fusion received gradients
    reloaded = Clover2ForDrafting.from_pretrained(tmp_path / "grown" / "final")
    assert reloaded.config.feature_layers == [1]
    assert torch.equal(reloaded.feature_fc.weight, grown.feature_fc.weight.detach().cpu())
    with pytest.raises(ValueError, match="--feature-layers 0 \\(the drafter has 1\\)"):
        train(TrainRecipe(output_dir=str(tmp_path / "clash"), init_from=str(tmp_path / "grown" / "final"),
                          feature_layers=[0], **common))
    with pytest.raises(ValueError, match="a feature store holds h_t only"):
        train(TrainRecipe(output_dir=str(tmp_path / "store"), features=str(tmp_path), feature_layers=[1], **common))
    with pytest.raises(ValueError, match="fuses feature layers 1, which a feature store"):  # refused before any work
        train(TrainRecipe(output_dir=str(tmp_path / "store"), features=str(tmp_path),
                          init_from=str(tmp_path / "grown" / "final"), **common))
