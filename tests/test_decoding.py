"""Clover-2 decoding in generate(): token-identical greedy output, lossless sampling, cache compaction."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tiny_target
from drafters import random_pair, trained_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from clover2_hf import Clover2ForDrafting, Clover2Stats
from clover2_hf.generation.tree_step import lookup_continuation
from clover2_hf.tree import DraftTree, add_path, compact_cache, tree_attention_mask
from clover2_hf.modeling_clover2 import CACHE_KWARG

MODES = ("tree", "chain")
LOSSLESS_ARCHS = ("llama", "qwen2", "mistral", "gemma2")


# The drafters of `drafters.random_pair` / `drafters.trained_pair` are shared by every test module of a process
# (and, under pytest-xdist, by whichever tests a worker runs): tests pass decoding options per call and never
# change those drafters.
FIXED_TREE = {"tree_type": "dynamic", "tree_budget": 25, "tree_top_k": 10}  # a drafted tree at every step


def _generate_both(target, draft, mode, ids, options: dict | None = None, **kwargs):
    """Plain greedy and Clover-2 greedy (`mode` "tree" or "chain", Clover-2 keywords `options`): (plain, got, stats)."""
    expected = target.generate(ids, do_sample=False, **kwargs)
    stats = Clover2Stats()
    got = target.generate(ids, do_sample=False, assistant_model=draft, clover2_stats=stats, clover2_decoding=mode,
                          **(options or {}), **kwargs)
    return expected, got, stats


def _sample_both(target, draft, ids, seed: int, options: dict | None = None, **kwargs):
    """Plain seeded sampling and Clover-2 sampling (with the Clover-2 keywords `options`) from the same seed:
    (plain, got, stats)."""
    torch.manual_seed(seed)
    plain = target.generate(ids, do_sample=True, **kwargs)
    torch.manual_seed(seed)
    stats = Clover2Stats()
    got = target.generate(ids, do_sample=True, assistant_model=draft, clover2_stats=stats, **(options or {}), **kwargs)
    return plain, got, stats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", LOSSLESS_ARCHS + ("qwen3", "gemma"))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.integers(3, 159), min_size=1, max_size=12),
    max_new_tokens=st.integers(1, 24),
    tree=st.sampled_from([("dynamic", 25, 10), ("dynamic", 6, 3), ("static", 25, 10)]),
)
def test_greedy_identical_random_drafter(arch, mode, prompt, max_new_tokens, tree):
    target, draft = random_pair(arch)
    options = dict(zip(("tree_type", "tree_budget", "tree_top_k"), tree))
    ids = torch.tensor([prompt])
    expected, got, stats = _generate_both(target, draft, mode, ids, options, max_new_tokens=max_new_tokens)
    assert torch.equal(expected, got)
    assert stats.new_tokens == got.shape[1] - ids.shape[1]


@pytest.mark.parametrize("mode", MODES)
# mistral trains a drafter of its own for this test alone (slow); the random-drafter test covers it fast
@pytest.mark.parametrize("arch", ("llama", "qwen2", pytest.param("mistral", marks=pytest.mark.slow)))
def test_greedy_identical_trained_drafter_exercises_paths(arch, mode):
    target, draft, prompts = trained_pair(arch)
    total = Clover2Stats()
    for i, max_new in enumerate([40, 23, 31, 17, 40, 29, 36, 13]):
        ids = prompts[i : i + 1]
        expected, got, stats = _generate_both(target, draft, mode, ids, FIXED_TREE, max_new_tokens=max_new)
        assert torch.equal(expected, got), (i, expected, got)
        total.tokens_per_step += stats.tokens_per_step
        total.branch_switches += stats.branch_switches
        total.stopped_in_path += stats.stopped_in_path
        total.target_forwards += stats.target_forwards
        total.new_tokens += stats.new_tokens
    assert max(total.tokens_per_step) >= 4, "multi-token acceptance was not exercised"
    assert total.tau > 2.0
    assert total.target_forwards < total.new_tokens / 2
    if mode == "tree":
        assert total.branch_switches > 0, "no accepted node was a non-top child (branch switching)"
        assert total.stopped_in_path > 0, "max_new_tokens never landed inside an accepted path"


@pytest.mark.parametrize("mode", MODES)
def test_eos_inside_accepted_path(mode, monkeypatch):
    target, draft, prompts = trained_pair("llama")
    monkeypatch.setattr(target.generation_config, "eos_token_id", None)  # only the eos ids passed below
    hits = 0
    for i in range(6):
        ids = prompts[i : i + 1]
        plain = target.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:]
        eos = [int(plain[12]), int(plain[20])]  # several eos ids, which occur mid-answer
        expected, got, stats = _generate_both(target, draft, mode, ids, FIXED_TREE, max_new_tokens=30,
                                              eos_token_id=eos)
        assert torch.equal(expected, got)
        assert int(got[0, -1]) in eos and got.shape[1] < ids.shape[1] + 30
        hits += stats.stopped_in_path
    if mode == "tree":
        assert hits > 0, "eos never fell inside an accepted path"


class _StopAfterToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_logits_processors_and_custom_stopping_criteria_tree():
    target, draft, prompts = trained_pair("qwen2")
    for i in range(4):
        ids = prompts[i : i + 1]
        plain = target.generate(ids, max_new_tokens=25, do_sample=False)[0, ids.shape[1]:]
        stop = StoppingCriteriaList([_StopAfterToken(int(plain[9]))])
        kwargs = dict(max_new_tokens=25, repetition_penalty=1.3, stopping_criteria=stop)
        expected, got, _ = _generate_both(target, draft, "tree", ids, **kwargs)
        assert torch.equal(expected, got)


@pytest.mark.parametrize("mode", MODES)
def test_streamer_and_return_dict(mode):
    target, draft, prompts = trained_pair("llama")
    ids = prompts[:1]

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = target.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=draft, clover2_decoding=mode,
                          streamer=streamer, return_dict_in_generate=True, output_scores=True)
    plain = target.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, plain.sequences)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == plain.sequences[0, ids.shape[1]:].tolist()
    assert len(out.scores) == len(plain.scores) == 20
    for a, b in zip(out.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- sampling


def _processed_probs(target, seqs: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """[n, T] ids -> [n, T, V] the exact next-token distribution plain sampling uses at every position."""
    with torch.no_grad():
        logits = target(seqs).logits.double() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _martingale_chi_square_p_value(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of categorical draws, each from its own known distribution.

    observed, probs: [n, C] one-hot draws and the distributions they should come from (each given
    everything drawn before it). If every draw follows its distribution, O - E = sum(observed - probs)
    is a martingale with covariance S = sum(diag(p) - p p^T), so (O - E)^T S^+ (O - E) is chi-square
    with rank(S) degrees of freedom (martingale central limit theorem).
    """
    diff = (observed - probs).sum(0)
    cov = torch.diag(probs.sum(0)) - probs.T @ probs
    dof = int(torch.linalg.matrix_rank(cov, hermitian=True))
    stat = diff @ torch.linalg.pinv(cov, hermitian=True) @ diff
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.7, 4)])
def test_sampling_matches_target_distribution(mode, temperature, top_k):
    """Every sampled token is tested against the target's exact distribution given the tokens before it.

    60 generations of 20 tokens from a fixed prompt (1200 draws, about 600 of them accepted drafts);
    the exact conditional of each draw comes from one teacher-forced target pass over the generated
    sequences. Two chi-square statistics: counts per token id, and per rank of the drawn token in its
    distribution. Fixed seed; if the sampler is exact the false-alarm rate is 1e-3 (5e-4 each).
    Checked against broken samplers: always following a drafted child, sampling tree nodes without
    temperature / top-k, drafting the chain greedily, or handing the chain's acceptance test flat draft
    logits each fail it (p < 1e-14 or a zero-probability token). A quarter of the CPU time of the
    exact 3-token joint chi-square it replaced (1500 generate calls per test).
    """
    V = 6
    target = make_tiny_target("llama", seed=3, vocab_size=V, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        target.lm_head.weight.mul_(12.0)  # confident enough that drafts get accepted
    draft = Clover2ForDrafting.from_target(target, tree_top_k=2, tree_budget=6, num_draft_depths=3).eval()
    draft.config.decoding = mode
    prompt = torch.tensor([[1, 4, 2]])
    torch.manual_seed(1234)
    outs, accepted = [], 0
    for _ in range(60):
        stats = Clover2Stats()
        out = target.generate(prompt, do_sample=True, max_new_tokens=20, temperature=temperature, top_k=top_k,
                              top_p=None, assistant_model=draft, clover2_stats=stats)
        assert out.shape[1] == prompt.shape[1] + 20
        outs.append(out[0])
        accepted += sum(stats.accepted_depths)
    assert accepted > 300, "drafts were rarely accepted: the test would not check the acceptance rule"
    seqs = torch.stack(outs)
    n = prompt.shape[1]
    probs = _processed_probs(target, seqs[:, :-1], temperature, top_k)[:, n - 1 :].reshape(-1, V)
    drawn = torch.nn.functional.one_hot(seqs[:, n:].reshape(-1), V).double()
    assert (probs[drawn.bool()] > 0).all(), "a token outside top-k (probability 0) was emitted"
    assert _martingale_chi_square_p_value(drawn, probs) > 5e-4
    order = probs.argsort(dim=-1, descending=True, stable=True)
    assert _martingale_chi_square_p_value(drawn.gather(1, order), probs.gather(1, order)) > 5e-4


# ----------------------------------------------------------------------------- KV cache compaction


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_cache_compaction_matches_linear_recomputation(arch):
    """After a tree pass + compaction, the next-step logits equal a plain linear run (sliding windows crossed)."""
    target = make_tiny_target(arch)
    prompt = torch.randint(3, 160, (1, 11), generator=torch.Generator().manual_seed(0))
    # root token 7, nodes: 1:a(d1) 2:b(d1) 3:c(d2, parent 1) 4:d(d2, parent 2) 5:e(d3, parent 4)
    tree = DraftTree(
        root_token=7,
        tokens=torch.tensor([11, 12, 13, 14, 15]),
        parents=torch.tensor([0, 0, 1, 2, 4]),
        depths=torch.tensor([1, 1, 2, 2, 3]),
        scores=torch.zeros(5),
    )
    from transformers import DynamicCache

    from clover2_hf.generation.cpu_kernels import target_mask_kwargs as _target_mask_kwargs

    cache = DynamicCache(config=target.config)
    cache.activate_past_recording()
    with torch.no_grad():
        target(prompt, use_cache=True, **{CACHE_KWARG: cache})
        past = cache.get_seq_length()
        mask = _target_mask_kwargs(target, cache, tree.ancestor_matrix(), tree.verify_depths(), past, target.dtype)
        depths = torch.tensor([0, 1, 1, 2, 2, 3])
        tree_out = target(tree.verify_tokens()[None], attention_mask=mask, position_ids=(past + depths)[None],
                          use_cache=True, **{CACHE_KWARG: cache}).logits[0]
        path = [0, 2, 4, 5]  # root -> b -> d -> e
        linear_ids = torch.cat([prompt, torch.tensor([[7, 12, 14, 15]])], dim=1)
        linear = target(linear_ids).logits[0]
        # tree logits along the path equal the linear logits at those positions
        torch.testing.assert_close(tree_out[path], linear[-4:], atol=1e-5, rtol=1e-5)
        compact_cache(cache, 6, path)
        assert cache.get_seq_length() == linear_ids.shape[1]
        nxt = target(torch.tensor([[9]]), use_cache=True, **{CACHE_KWARG: cache},
                     position_ids=torch.tensor([[linear_ids.shape[1]]])).logits[0, -1]
        ref = target(torch.cat([linear_ids, torch.tensor([[9]])], dim=1)).logits[0, -1]
    torch.testing.assert_close(nxt, ref, atol=1e-5, rtol=1e-5)


def test_tree_mask_is_additive_float():
    tree = DraftTree(7, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1, 2]), torch.zeros(2))
    mask = tree_attention_mask(tree, past_length=4, kv_length=7, kv_offset=0, dtype=torch.float32)
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 3, 7)
    blocked = mask[0, 0] != 0
    assert blocked.tolist() == [
        [False] * 4 + [False, True, True],
        [False] * 4 + [False, False, True],
        [False] * 4 + [False, False, False],
    ]


def test_tree_mask_applies_the_sliding_window_inside_a_deep_path():
    tree = DraftTree(7, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                     torch.tensor([], dtype=torch.long), torch.zeros(0))
    tree = add_path(tree, list(range(20, 30)))  # a 10-deep chain, as a long lookup path makes
    mask = tree_attention_mask(tree, past_length=5, kv_length=16, kv_offset=0, dtype=torch.float32,
                               sliding_window=4)
    visible = (mask[0, 0] == 0).tolist()
    # query at verify index i sits at position 5 + i and sees keys at positions > 5 + i - 4
    for i in range(11):
        expected = [5 + i - p < 4 for p in range(5)] + [j <= i and i - j < 4 for j in range(11)]
        assert visible[i] == expected, i


@pytest.mark.parametrize("arch", ("mistral", "gemma2"))
def test_lookup_path_deeper_than_the_sliding_window_is_lossless(arch):
    """The tiny configs' window is 8 tokens; lookup paths of up to 12 tokens reach past it."""
    target = make_tiny_target(arch, seed=1, peaked=True)
    draft = Clover2ForDrafting.from_target(target).eval()
    draft.config.tree_budget, draft.config.tree_top_k, draft.config.tree_lookup_tokens = 2, 2, 12
    deep = 0
    for seed in range(4):
        ids = torch.randint(3, 150, (1, 5), generator=torch.Generator().manual_seed(seed))
        expected, got, stats = _generate_both(target, draft, "tree", ids, max_new_tokens=60)
        assert torch.equal(expected, got), seed
        deep += sum(size >= 2 + 9 for size in stats.tree_sizes)  # a lookup chain of >= 9 tokens
    assert deep > 0, "no lookup path reached past the window"


# ----------------------------------------------------------------------------- bad input & stock paths


def test_batch_of_two_is_rejected():
    target, draft = random_pair("llama")
    with pytest.raises(ValueError, match="batch size 1"):
        target.generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=3, assistant_model=draft)


def test_empty_prompt_is_rejected():
    target, draft = random_pair("llama")
    with pytest.raises(ValueError, match="non-empty prompt"):
        target.generate(torch.ones(1, 0, dtype=torch.long), max_new_tokens=3, assistant_model=draft)


def test_vocabulary_mismatch_is_rejected():
    _, draft = random_pair("llama")
    other = make_tiny_target("llama", vocab_size=170)
    with pytest.raises(ValueError, match="vocabulary 170"):
        other.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, assistant_model=draft)
    draft.attach_target(random_pair("llama")[0])


def test_unsupported_options_are_rejected():
    target, draft = random_pair("llama")
    with pytest.raises(ValueError, match="num_beams"):
        target.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, num_beams=2, assistant_model=draft)


def test_unattached_loaded_drafter_attaches_to_the_generating_target(tmp_path):
    from transformers import AutoModel

    target, draft = random_pair("llama")
    draft.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert not loaded.is_attached
    ids = torch.tensor([[5, 6, 7]])
    loaded.config.decoding = "tree"
    assert torch.equal(target.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=loaded),
                       target.generate(ids, max_new_tokens=8, do_sample=False))
    assert loaded.is_attached


def test_other_assistants_behave_as_stock():
    target, _ = random_pair("llama")
    small = make_tiny_target("llama", seed=5)
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = target.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(target.generate(ids, max_new_tokens=10, do_sample=False, assistant_model=small), plain)
    assert torch.equal(target.generate(ids, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3), plain)
    with pytest.raises(ValueError, match="clover2_stats"):
        target.generate(ids, max_new_tokens=2, clover2_stats=Clover2Stats())


def test_tree_sampling_reproduces_plain_sampling_with_the_same_seed():
    """The tree walk draws exactly one target sample per emitted token, in plain sampling's order."""
    target, draft, prompts = trained_pair("llama")
    tree = {"clover2_decoding": "tree", "tree_budget": 8, "tree_top_k": 4}  # fixed: drafted trees at every step
    for i in range(4):
        plain, got, stats = _sample_both(target, draft, prompts[i : i + 1], i, tree, max_new_tokens=30,
                                         temperature=0.8, top_k=20)
        assert torch.equal(plain, got)
        assert stats.target_forwards < stats.new_tokens


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_identical_across_attention_kernels_and_dtypes(attn, dtype, mode):
    """Tree masks are additive floats, so eager (which adds the mask) and sdpa agree; bf16 and fp16 too."""
    target = make_tiny_target("llama", seed=7, peaked=True).to(dtype)
    target.set_attn_implementation(attn)
    draft = Clover2ForDrafting.from_target(target).eval()
    assert draft.dtype == dtype
    for seed in range(3):
        ids = torch.randint(3, 160, (1, 6), generator=torch.Generator().manual_seed(seed))
        expected, got, _ = _generate_both(target, draft, mode, ids, max_new_tokens=20)
        assert torch.equal(expected, got)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_drafter_of_a_float32_target_is_lossless(mode):
    """Only the drafter's precision changes (the CPU default on bf16 hardware): output stays the target's."""
    target, draft, prompts = trained_pair("llama")
    low = Clover2ForDrafting.from_target(target)
    low.load_state_dict(draft.state_dict())
    low = low.to(torch.bfloat16).eval()
    forwards = []
    for i in range(6):
        expected, got, stats = _generate_both(target, low, mode, prompts[i : i + 1], max_new_tokens=24)
        assert torch.equal(expected, got)
        forwards.append(stats.target_forwards < stats.new_tokens)
    assert any(forwards)  # its drafts are accepted too


def test_cpu_verify_linears_compute_the_same_products_and_are_restored(monkeypatch):
    from clover2_hf.generation.cpu_kernels import CpuVerifyLinears as _CpuVerifyLinears
    from clover2_hf.generation.cpu_kernels import wide_linear_forward as _wide_linear_forward

    layer = torch.nn.Linear(24, 40)
    for q in (1, 2, 5, 17):
        x = torch.randn(1, q, 24)
        torch.testing.assert_close(_wide_linear_forward(layer, x), layer(x), rtol=1e-5, atol=1e-6)
    target, draft, prompts = trained_pair("llama")
    monkeypatch.setenv("CLOVER2_HF_WIDE_LINEAR", "1")  # forced on (by default only where calibration measured it faster)
    seen = []
    monkeypatch.setattr(
        "clover2_hf.generation.cpu_kernels.wide_linear_forward",
        lambda self, x: seen.append(x.shape[-2]) or torch.nn.functional.linear(x, self.weight, self.bias),
    )
    expected, got, _ = _generate_both(target, draft, "tree", prompts[:1], FIXED_TREE, max_new_tokens=12)
    assert torch.equal(expected, got)
    assert seen and min(seen) > 1  # the verification passes (q > 1 tokens) went through it
    assert not any("forward" in m.__dict__ for m in target.modules())  # restored after generate
    # a forward already replaced on the instance (accelerate's hooks do that) is neither used nor removed
    layer = target.lm_head
    hooked = layer.forward = lambda x: torch.nn.functional.linear(x, layer.weight, layer.bias)
    with _CpuVerifyLinears(target, enabled=True):
        assert layer.forward is hooked
    assert layer.__dict__["forward"] is hooked
    del layer.forward
    assert _CpuVerifyLinears(target, enabled=True).modules
    monkeypatch.setenv("CLOVER2_HF_WIDE_LINEAR", "0")
    assert _CpuVerifyLinears(target, enabled=True).modules == []
    monkeypatch.delenv("CLOVER2_HF_WIDE_LINEAR")
    assert _CpuVerifyLinears(target).modules == []  # off unless enabled


def test_cpu_masked_gqa_keeps_outputs_sets_the_switch_only_inside_and_respects_the_user(monkeypatch):
    from clover2_hf.generation.cpu_kernels import FORCE_GQA_ENV as _FORCE_GQA_ENV
    from clover2_hf.generation.cpu_kernels import CpuMaskedGqa as _CpuMaskedGqa

    monkeypatch.delenv(_FORCE_GQA_ENV, raising=False)
    target, draft, prompts = trained_pair("llama")  # 4 query heads over 2 key/value heads
    assert target.config._attn_implementation == "sdpa"
    switch_seen = []
    forward = target.model.layers[0].self_attn.forward

    def spy(*args, **kwargs):
        switch_seen.append(os.environ.get(_FORCE_GQA_ENV))
        return forward(*args, **kwargs)

    monkeypatch.setattr(target.model.layers[0].self_attn, "forward", spy)
    for i in range(2):
        expected, got, _ = _generate_both(target, draft, "tree", prompts[i : i + 1], FIXED_TREE, max_new_tokens=12)
        assert torch.equal(expected, got)
    assert "1" in switch_seen and None in switch_seen  # on in verification passes, off in plain decoding
    assert _FORCE_GQA_ENV not in os.environ  # restored after generate
    # the masked GQA call gives the logits the repeated-heads call gives
    ids = prompts[:1]
    mask = torch.tril(torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool))[None, None]
    with torch.no_grad():
        plain_logits = target(input_ids=ids, attention_mask=mask).logits
        with _CpuMaskedGqa(target):
            gqa_logits = target(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(gqa_logits, plain_logits, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(_FORCE_GQA_ENV, "0")  # a value the user set is left alone
    with _CpuMaskedGqa(target):
        assert os.environ[_FORCE_GQA_ENV] == "0"
    assert os.environ[_FORCE_GQA_ENV] == "0"
    monkeypatch.setenv("CLOVER2_HF_CPU_GQA", "0")
    assert not _CpuMaskedGqa(target).enabled


def test_lookup_continuation_takes_the_latest_match_of_the_longest_tail():
    context = [5, 6, 7, 1, 2, 5, 6, 7, 3, 4, 9, 6, 7]
    assert lookup_continuation(context, 3, max_ngram=3) == [3, 4, 9]  # tail (6, 7): latest earlier match
    assert lookup_continuation([1, 2, 3, 1, 2, 3], 10, max_ngram=3) == [1, 2, 3]  # tail (1, 2, 3) at 0
    assert lookup_continuation([1, 2, 3, 4], 5, max_ngram=3) == []  # no repeat of >= 2 tokens
    assert lookup_continuation([4, 1, 4], 5, max_ngram=3) == []  # single-token matches are ignored
    assert lookup_continuation([8, 9, 1, 8, 9], 2, max_ngram=2) == [1, 8]


@pytest.mark.parametrize("arch", ("llama", "qwen2", "gemma2"))
def test_lookup_path_is_lossless_and_accepted_on_repetitive_text(arch):
    """An untrained drafter plus the lookup path: a confident target's greedy output falls into a loop,
    which the lookup path finds in the context."""
    target = make_tiny_target(arch, seed=1, peaked=True)
    draft = Clover2ForDrafting.from_target(target).eval()
    draft.config.tree_type, draft.config.tree_budget, draft.config.tree_top_k = "dynamic", 3, 2
    ids = torch.randint(3, 150, (1, 6), generator=torch.Generator().manual_seed(5))
    draft.config.tree_lookup_tokens = 8
    expected, got, with_lookup = _generate_both(target, draft, "tree", ids, max_new_tokens=60)
    assert torch.equal(expected, got)
    draft.config.tree_lookup_tokens = 0
    _, got_plain_tree, without = _generate_both(target, draft, "tree", ids, max_new_tokens=60)
    assert torch.equal(expected, got_plain_tree)
    assert max(with_lookup.tree_sizes) > 3  # the lookup path was added to the drafted 3 nodes
    assert max(without.tree_sizes) == 3
    assert with_lookup.tau > without.tau


def test_lookup_path_keeps_seeded_sampling_identical():
    target, draft = random_pair("llama")
    tree = {"clover2_decoding": "tree", "tree_type": "dynamic", "tree_budget": 3, "tree_top_k": 2}
    pattern = torch.randint(3, 150, (5,), generator=torch.Generator().manual_seed(6))
    ids = pattern.repeat(5)[None]
    used = 0
    for seed in range(3):
        plain, got, stats = _sample_both(target, draft, ids, seed, tree, max_new_tokens=30, temperature=0.3)
        assert torch.equal(plain, got)
        used += max(stats.tree_sizes) > 3
    assert used, "the lookup path was never added"
