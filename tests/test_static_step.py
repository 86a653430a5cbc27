"""Static-shape drafting (`generate(..., clover2_static_shapes=True)`, `clover2_hf.generation.static_step`).

The output must stay plain greedy decoding's on every architecture; every drafting step after the first
must dispatch the same ops on the same shapes whatever the last step accepted; and the step must trace
into one graph without breaks, so that a device can capture it.
"""

from __future__ import annotations


import pytest
import torch
from conftest import counting_compile_config, reusing_compile_config
from drafters import random_pair, trained_pair
from torch.utils._python_dispatch import TorchDispatchMode

from clover2_hf import Clover2Stats
from clover2_hf.generation import static_step
from clover2_hf.generation.device_step import VerifiedTree
from clover2_hf.generation.static_step import (
    DraftKV,
    StaticVerification,
    static_draft_step,
    static_verification_supported,
)
from clover2_hf.modeling_clover2 import CACHE_KWARG

pytestmark = pytest.mark.usefixtures("one_thread")

FULL_ATTENTION = ("llama", "qwen2", "qwen3", "gemma")  # the tiny test configs of the others have sliding windows


@pytest.mark.parametrize("arch", ("llama", "qwen2", "mistral", "gemma2", "qwen3", "gemma"))
@pytest.mark.parametrize("tree", [(6, 3, 0), (4, 2, 6), (2, 1, 8)], ids=["6-3", "4-2-lookup", "2-1-lookup-beyond-the-pool"])
def test_static_shapes_decode_exactly_plain_greedy(arch, tree):
    target, draft = random_pair(arch)
    budget, top_k, lookup = tree
    pattern = torch.randint(3, 150, (4,), generator=torch.Generator().manual_seed(3))
    for ids in (torch.randint(3, 150, (1, 7), generator=torch.Generator().manual_seed(1)), pattern.repeat(3)[None]):
        plain = target.generate(ids, do_sample=False, max_new_tokens=20)
        stats = Clover2Stats()
        got = target.generate(ids, do_sample=False, max_new_tokens=20, assistant_model=draft, clover2_stats=stats,
                              tree_budget=budget, tree_top_k=top_k, tree_lookup_tokens=lookup,
                              clover2_static_shapes=True)
        assert torch.equal(plain, got)
        assert stats.walk == "device" and "static shapes" in stats.tree_settings
        both = static_verification_supported(target)
        assert ("(drafting and verification)" in stats.tree_settings) == both
        assert len(set(stats.tree_sizes)) == 1  # every pass verifies the same number of nodes
    # full-attention targets verify on a StaticCache where transformers keeps the length on the device
    assert static_verification_supported(target) == (arch in FULL_ATTENTION and CACHE_KWARG == "cache")


@pytest.mark.parametrize("arch", ("llama", "gemma2"))
def test_static_shapes_with_a_trained_drafter_accept_paths_and_stay_exact(arch):
    target, draft, prompts = trained_pair(arch)
    taus = []
    for i, max_new in enumerate([30, 17, 40]):
        ids = prompts[i : i + 1].repeat(1, 2)
        plain = target.generate(ids, do_sample=False, max_new_tokens=max_new)
        stats = Clover2Stats()
        got = target.generate(ids, do_sample=False, max_new_tokens=max_new, assistant_model=draft, clover2_stats=stats,
                              tree_budget=6, tree_top_k=3, tree_lookup_tokens=4, clover2_static_shapes=True)
        assert torch.equal(plain, got), i
        taus.append(stats.tau)
    assert max(taus) > 1.5  # paths were accepted: the padded inputs carried the right states


class _ShapeRecorder(TorchDispatchMode):
    """Every dispatched op with the shapes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        self.calls.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def test_drafting_steps_dispatch_the_same_ops_on_the_same_shapes(monkeypatch):
    target, draft, prompts = trained_pair("llama")
    records = []

    def recorded(*args, **kwargs):
        recorder = _ShapeRecorder()
        with recorder:
            result = static_draft_step(*args, **kwargs)
        records.append(recorder.calls)
        return result

    monkeypatch.setattr(static_step, "static_draft_step", recorded)
    stats = Clover2Stats()
    ids = prompts[:1].repeat(1, 3)
    target.generate(ids, do_sample=False, max_new_tokens=60, assistant_model=draft, clover2_stats=stats,
                    tree_budget=6, tree_top_k=3, tree_lookup_tokens=4, clover2_static_shapes=True)
    steps = records[1:22]  # the first step reads the whole prompt (another width, once per call)
    assert len(steps) == 21
    assert len(set(stats.accepted_depths[1:22])) >= 3  # the steps followed different acceptance lengths
    assert all(step == steps[0] for step in steps[1:])


@pytest.mark.skipif(CACHE_KWARG != "cache", reason="static verification needs transformers >= 5.24")
def test_verification_passes_dispatch_the_same_ops_on_the_same_shapes():
    target, draft, prompts = trained_pair("llama")
    records = []
    recorder = [None]

    def start(module, args, kwargs):
        recorder[0] = _ShapeRecorder()
        recorder[0].__enter__()

    def stop(module, args, kwargs, output):
        recorder[0].__exit__(None, None, None)
        records.append(recorder[0].calls)

    handles = [target.register_forward_pre_hook(start, with_kwargs=True),
               target.register_forward_hook(stop, with_kwargs=True)]
    try:
        stats = Clover2Stats()
        target.generate(prompts[:1].repeat(1, 3), do_sample=False, max_new_tokens=60, assistant_model=draft,
                        clover2_stats=stats, tree_budget=6, tree_top_k=3, tree_lookup_tokens=4,
                        clover2_static_shapes=True)
    finally:
        for handle in handles:
            handle.remove()
    assert "(drafting and verification)" in stats.tree_settings
    passes = records[1:22]  # after the prefill
    assert len(passes) == 21 and len(set(stats.accepted_depths[:21])) >= 3
    assert all(p == passes[0] for p in passes[1:])


def test_the_drafting_step_traces_into_one_graph_without_breaks():
    target, draft = random_pair("llama")
    torch.manual_seed(0)
    kv = DraftKV(draft, 64)
    width, hidden = 1 + 3 + 4, target.config.hidden_size
    args = (draft, kv, torch.randn(1, width, hidden), torch.randint(3, 100, (1, width)), torch.tensor([5]),
            torch.tensor([2]), torch.tensor([7]), torch.randint(3, 100, (4,)), torch.tensor([3]), 3, 6)
    with torch.no_grad():
        explanation = torch._dynamo.explain(static_draft_step)(*args)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_the_drafting_step_compiles_with_inductor():
    """The real compiler on this machine (C++ code generation on a CPU; ~30 s): same verified tree as eager."""
    target, draft = random_pair("llama")
    torch.manual_seed(0)
    width, hidden = 1 + 3 + 2, target.config.hidden_size
    inputs = (torch.randn(1, width, hidden), torch.randint(3, 100, (1, width)), torch.tensor([5]), torch.tensor([2]),
              torch.tensor([7]), torch.randint(3, 100, (2,)), torch.tensor([1]), 2, 4)
    with torch.no_grad():
        eager, _ = static_draft_step(draft, DraftKV(draft, 64), *inputs)
        compiled, _ = torch.compile(static_draft_step, mode="default")(draft, DraftKV(draft, 64), *inputs)
    for name in ("index", "tokens", "depths", "ancestors", "parents"):
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name


def test_static_shapes_refuse_calls_that_need_the_host_walk():
    target, draft = random_pair("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="clover2_static_shapes=True needs greedy decoding"):
        target.generate(ids, do_sample=True, max_new_tokens=4, assistant_model=draft, clover2_static_shapes=True)
    with pytest.raises(ValueError, match="static_shapes must be True or False"):
        target.generate(ids, max_new_tokens=4, assistant_model=draft, clover2_static_shapes="yes")


@pytest.mark.skipif(CACHE_KWARG != "cache", reason="static verification needs transformers >= 5.24")
def test_the_verification_pass_on_the_static_cache_traces_into_one_graph_without_breaks():
    target, _ = random_pair("llama")
    verification = StaticVerification(target, 40, 5)
    with torch.no_grad():
        target(torch.arange(3, 13)[None], cache=verification.cache, use_cache=True)  # a prompt
        step = VerifiedTree(index=torch.arange(5), tokens=torch.arange(20, 25), depths=torch.tensor([0, 1, 1, 2, 3]),
                     ancestors=torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0],
                                             [1, 1, 0, 1, 1]], dtype=torch.bool),
                     parents=torch.tensor([0, 0, 0, 1, 3]))
        past = verification.past_length()

        def verify(tokens, mask, positions):
            return target(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=verification.cache,
                          use_cache=True).logits

        explanation = torch._dynamo.explain(verify)(step.tokens[None], verification.mask(step, past, target.dtype),
                                                    (past + step.depths)[None])
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.skipif(CACHE_KWARG != "cache", reason="static verification needs transformers >= 5.24")
@pytest.mark.parametrize("arch", ("llama", pytest.param("qwen3", marks=pytest.mark.slow)))
def test_compiled_static_decoding_captures_both_steps_and_stays_exact(arch):
    """With a compile config that plain decoding would honour, the drafting step and the verification pass run
    compiled: one graph each (no breaks), traced on the first call only, outputs exactly plain greedy's, also when
    every graph reuses its output buffers from call to call as a CUDA graph replay does."""
    target, draft, prompts = trained_pair(arch)
    torch._dynamo.reset()
    graphs = []
    config = reusing_compile_config(graphs)
    taus = []
    for i in range(4):
        ids = prompts[i : i + 1].repeat(1, 2)  # same lengths: the graphs of the first call serve them all
        plain = target.generate(ids, do_sample=False, max_new_tokens=30)
        stats = Clover2Stats()
        got = target.generate(ids, do_sample=False, max_new_tokens=30, assistant_model=draft, clover2_stats=stats,
                              tree_budget=4, tree_top_k=2, tree_lookup_tokens=2, clover2_static_shapes=True,
                              compile_config=config)
        assert torch.equal(plain, got)
        assert stats.tree_settings.endswith("static shapes (drafting and verification), compiled")
        assert len(graphs) == 2  # the drafting step and the verification pass
        assert sorted("fc1" in graph.code for graph in graphs) == [False, True]  # one of them reads the drafter
        taus.append(stats.tau)
    assert max(taus) > 1.5  # paths were accepted, so compaction and the next step's inputs ran through the graphs
    # another prompt length and answer length: new shapes, still exact
    ids = prompts[5:6].repeat(1, 3)
    plain = target.generate(ids, do_sample=False, max_new_tokens=23)
    got = target.generate(ids, do_sample=False, max_new_tokens=23, assistant_model=draft, tree_budget=4, tree_top_k=2,
                          tree_lookup_tokens=2, clover2_static_shapes=True, compile_config=config)
    assert torch.equal(plain, got)


@pytest.mark.skipif(CACHE_KWARG != "cache", reason="static verification needs transformers >= 5.24")
def test_static_decoding_compiles_only_where_plain_decoding_would():
    """On a CPU plain decoding compiles nothing unless asked (`_compile_all_devices`), and `disable_compile`
    wins over a compile config: Clover-2's static steps follow the same rule."""
    target, draft = random_pair("llama")
    torch._dynamo.reset()
    graphs = []
    config = counting_compile_config(graphs)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for kwargs in ({}, {"compile_config": config, "disable_compile": True}):
        stats = Clover2Stats()
        target.generate(ids, do_sample=False, max_new_tokens=6, assistant_model=draft, clover2_stats=stats,
                        tree_budget=3, tree_top_k=2, clover2_static_shapes=True, **kwargs)
        assert "compiled" not in stats.tree_settings
    plain_static = target.generate(ids, do_sample=False, max_new_tokens=6, cache_implementation="static",
                                   compile_config=config, disable_compile=True)
    assert graphs == [] and plain_static.shape[1] == 11
