"""Clover2ForDrafting: shapes, initialisation rules, train/incremental equivalence, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_target, tiny_target_config
from transformers import AutoModel

from clover2_hf import Clover2Config, Clover2ForDrafting
from clover2_hf.modeling_clover2 import Clover2RegressiveAttention

B, T, N = 2, 13, 5  # T > the tiny sliding windows (8)


def _inputs(target, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, target.config.hidden_size, generator=g)
    ids = torch.randint(0, target.config.vocab_size, (B, T), generator=g)
    return hidden, ids


def test_output_shapes(arch):
    target = make_tiny_target(arch)
    draft = Clover2ForDrafting.from_target(target).eval()
    H, V = target.config.hidden_size, target.config.vocab_size
    hidden, ids = _inputs(target)
    out = draft(hidden, ids, return_logits=True)
    assert out.head_states.shape == (B, N, T, H)
    assert out.logits.shape == (B, N, T, V)
    assert out.augmented_states.shape == (B, T, H)
    assert draft(hidden, ids).logits is None

    cache = draft.new_cache()
    c = draft.augment(hidden[:, :4], ids[:, :4], cache=cache)
    assert c.shape == (B, 4, H) and cache.get_seq_length() == 4
    # head calls accept any leading shape (tree nodes)
    nodes = c[:, -1:].expand(B, 7, H)
    o0, r0 = draft.head_step(nodes)
    assert o0.shape == (B, 7, H) and torch.equal(r0, nodes)
    o1, r1 = draft.head_step(r0, torch.zeros(B, 7, dtype=torch.long))
    assert o1.shape == r1.shape == (B, 7, H)
    assert draft.head_logits(o1).shape == (B, 7, V)


def test_initialisation_rules(arch):
    target = make_tiny_target(arch)
    draft = Clover2ForDrafting.from_target(target, init_noise=0.01)
    H = target.config.hidden_size
    last = target.model.layers[-1].state_dict()
    for layer in draft.augmenting_layers:
        for name, tensor in layer.state_dict().items():
            assert torch.equal(tensor, last[name]), name
    final_norm = target.model.norm.weight
    assert torch.equal(draft.augmenting_norm.weight, final_norm)
    assert torch.equal(draft.head_norm.weight, final_norm)

    eye = torch.eye(H)

    def within_noise(weight, base):
        delta = weight.detach() - base
        return bool((delta >= 0).all() and (delta < 0.01).all() and delta.std() > 0)

    assert within_noise(draft.fc1.weight, eye)
    assert within_noise(draft.fc2.weight, torch.cat([eye, torch.zeros(H, H)], dim=1))
    for cell in (draft.input_cell, draft.head_cell):
        assert within_noise(cell.q_proj.weight, eye)
        assert within_noise(cell.k_proj.weight, eye)
        assert within_noise(cell.v_proj.weight, torch.zeros(H, H))
        for proj in (cell.q_proj, cell.k_proj, cell.v_proj):
            assert torch.equal(proj.bias, torch.zeros(H))
        assert torch.equal(cell.norm.weight, torch.ones(H))
    for bias in (draft.fc1.bias, draft.fc2.bias):
        assert torch.equal(bias, torch.zeros(H))
    # Random-init norms of the target's type start at the identity scale (Gemma: zeros, (1 + w)).
    fresh = Clover2ForDrafting(draft.config)
    x = torch.randn(3, H)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + draft.config.text_config.rms_norm_eps)
    torch.testing.assert_close(fresh.head_norm(x), normed)


def test_regressive_attention_cell_matches_definition():
    torch.manual_seed(0)
    H, n = 8, 2
    cell = Clover2RegressiveAttention(H, n, eps=1e-6)
    for p in cell.parameters():
        torch.nn.init.normal_(p)
    x, y = torch.randn(3, H), torch.randn(3, H)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * cell.norm.weight
    q, k, v = cell.q_proj(xn), cell.k_proj(y), cell.v_proj(y)
    expected = x.clone()
    for j in range(n):
        sl = slice(j * H // n, (j + 1) * H // n)
        a = (q[:, sl] * k[:, sl]).sum(-1) / (q[:, sl].norm(dim=-1) * k[:, sl].norm(dim=-1))
        expected[:, sl] += a[:, None] * v[:, sl]
    torch.testing.assert_close(cell(x, y), expected)


def test_training_forward_equals_incremental(arch):
    target = make_tiny_target(arch)
    draft = Clover2ForDrafting.from_target(target, init_noise=0.05).eval()
    hidden, ids = _inputs(target)
    with torch.no_grad():
        full = draft(hidden, ids)
        cache = draft.new_cache()
        for t in range(T):
            c = draft.augment(hidden[:, t : t + 1], ids[:, t : t + 1], cache=cache)  # [B, 1, H]
            torch.testing.assert_close(c, full.augmented_states[:, t : t + 1], atol=1e-5, rtol=1e-5)
            o, state = draft.head_step(c)
            torch.testing.assert_close(o, full.head_states[:, 0, t : t + 1], atol=1e-5, rtol=1e-5)
            for depth in range(1, N):
                if t + depth >= T:
                    break
                o, state = draft.head_step(state, ids[:, t + depth : t + depth + 1])
                torch.testing.assert_close(o, full.head_states[:, depth, t : t + 1], atol=1e-5, rtol=1e-5)


def test_padding_mask_leaves_real_positions_unchanged():
    target = make_tiny_target("llama")
    draft = Clover2ForDrafting.from_target(target).eval()
    hidden, ids = _inputs(target)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0  # right padding on the second row
    with torch.no_grad():
        padded = draft(hidden, ids, attention_mask=mask)
        short = draft(hidden[1:, :9], ids[1:, :9])
    # depth 0 at real positions only depends on real positions
    torch.testing.assert_close(padded.head_states[1, 0, :9], short.head_states[0, 0], atol=1e-5, rtol=1e-5)


def test_unattached_drafter_errors():
    config = Clover2Config(text_config=tiny_target_config("llama").to_dict())
    draft = Clover2ForDrafting(config)
    hidden = torch.randn(1, 3, 64)
    with pytest.raises(RuntimeError, match="attach_target"):
        draft(hidden, torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("override", "message"),
    [({"hidden_size": 96}, "hidden size 96"), ({"vocab_size": 130}, "vocabulary 130")],
)
def test_mismatched_target_errors(override, message):
    draft = Clover2ForDrafting.from_target(make_tiny_target("llama"))
    other = make_tiny_target("llama", **override)
    with pytest.raises(ValueError, match=message):
        draft.attach_target(other)


def test_unsupported_architecture_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"Unsupported|cannot build.*'gpt2'.*llama.*mistral.*qwen2"):
        Clover2ForDrafting.from_target(gpt2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_draft_depths", 0),
        ("num_augmenting_layers", 0),
        ("depth_decay", 0.0),
        ("decoding", "beam"),
        ("tree_type", "random"),
        ("tree_budget", 0),
        ("draft_vocab_size", 10_000),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Clover2Config(text_config=tiny_target_config("llama").to_dict(), **{field: value})


def test_truncated_draft_vocabulary_maps_back_to_target_ids():
    target = make_tiny_target("llama")
    draft = Clover2ForDrafting.from_target(target, draft_vocab_size=16).eval()
    vocab = torch.arange(100, 116).flip(0)
    draft.set_draft_vocab(vocab)
    hidden, ids = _inputs(target)
    with torch.no_grad():
        out = draft(hidden, ids, return_logits=True)
        full_logits = torch.nn.functional.linear(out.head_states, target.lm_head.weight)
    assert out.logits.shape[-1] == 16
    torch.testing.assert_close(out.logits, full_logits[..., vocab])
    assert torch.equal(draft.draft_to_target_ids(torch.tensor([0, 15])), torch.tensor([115, 100]))
    with pytest.raises(ValueError, match="distinct"):
        draft.set_draft_vocab(torch.zeros(16, dtype=torch.long))


def test_automodel_builds_from_config():
    config = Clover2Config(text_config=tiny_target_config("qwen2").to_dict(), num_draft_depths=3)
    model = AutoModel.from_config(config)
    assert isinstance(model, Clover2ForDrafting)


def test_head_runs_in_the_lower_precision_of_drafter_and_target():
    target = make_tiny_target("llama")  # float32
    draft = Clover2ForDrafting.from_target(target, draft_vocab_size=40).eval()
    draft.set_draft_vocab(torch.arange(100, 140))
    states = torch.randn(3, target.config.hidden_size)
    reference = draft.head_logits(states)
    assert reference.dtype == torch.float32
    draft.to(torch.bfloat16)  # a bf16 drafter of a float32 target scores with a bf16 copy of the head rows
    low = draft.head_logits(states)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.05, rtol=0.05)
    assert target.lm_head.weight.dtype == torch.float32  # the target is untouched
    # a float32 drafter (training master weights) of a bf16 target reads the bf16 head as is: no float32 copy
    target16 = make_tiny_target("llama").to(torch.bfloat16)
    trainee = Clover2ForDrafting.from_target(target16).to(torch.float32)
    assert trainee.head_logits(states).dtype == torch.bfloat16
    assert trainee._draft_head_weight is None


def test_default_draft_dtype(monkeypatch):
    import clover2_hf.tools.tune as tune

    monkeypatch.setattr(tune, "cpu_has_bf16_matmul", lambda: True)
    assert tune.default_draft_dtype("cpu", torch.float32) == torch.bfloat16
    assert tune.default_draft_dtype("cuda", torch.float32) == torch.float32
    assert tune.default_draft_dtype("cpu", torch.float16) == torch.float16
    monkeypatch.setattr(tune, "cpu_has_bf16_matmul", lambda: False)
    assert tune.default_draft_dtype("cpu", torch.float32) == torch.float32


def test_load_state_dict_refreshes_the_cached_draft_head_rows():
    """The gathered head rows lm_head.weight[d2t] are cached; loading another d2t must not score with stale rows."""
    target = make_tiny_target("llama")
    draft = Clover2ForDrafting.from_target(target, draft_vocab_size=16).eval()
    draft.set_draft_vocab(torch.arange(100, 116))
    other = Clover2ForDrafting.from_target(target, draft_vocab_size=16).eval()
    other_vocab = torch.arange(20, 36).flip(0)
    other.set_draft_vocab(other_vocab)
    states = torch.randn(3, target.config.hidden_size)
    with torch.no_grad():
        draft.head_logits(states)  # fills the cache with the rows of ids 100..115
        draft.load_state_dict(other.state_dict())
        assert torch.equal(draft.d2t, other_vocab)
        torch.testing.assert_close(draft.head_logits(states), torch.nn.functional.linear(states, target.lm_head.weight[other_vocab]))
        torch.testing.assert_close(draft.head_logits(states), other.head_logits(states))
    # a bf16 drafter (cast cache) after loading a float32 state dict with another vocabulary
    draft.to(torch.bfloat16)
    draft.set_draft_vocab(torch.arange(100, 116))
    draft.head_logits(states)
    draft.load_state_dict(other.state_dict())
    expected = torch.nn.functional.linear(states.bfloat16(), target.lm_head.weight[other_vocab].bfloat16())
    torch.testing.assert_close(draft.head_logits(states), expected)
