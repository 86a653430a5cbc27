"""Static-shape drafting (`generate(..., clover2_static_shapes=True)`, `clover2_hf.generation.static_step`).

The output must stay plain greedy decoding's on every architecture; every drafting step after the first
must dispatch the same ops on the same shapes whatever the last step accepted; and the step must trace
into one graph without breaks, so that a device can capture it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_tiny_target
from drafters import trained_pair
from torch.utils._python_dispatch import TorchDispatchMode

from clover2_hf import Clover2ForDrafting, Clover2Stats
from clover2_hf.generation import static_step
from clover2_hf.generation.static_step import DraftKV, static_draft_step

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def random_pair(arch: str):
    target = make_tiny_target(arch)
    return target, Clover2ForDrafting.from_target(target).eval()


@pytest.mark.parametrize("arch", ("llama", "qwen2", "mistral", "gemma2", "qwen3", "gemma"))
@pytest.mark.parametrize("tree", [(6, 3, 0), (4, 2, 6)], ids=["6-3", "4-2-lookup"])
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
        assert len(set(stats.tree_sizes)) == 1  # every pass verifies the same number of nodes


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


def test_static_shapes_refuse_calls_that_need_the_host_walk():
    target, draft = random_pair("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="clover2_static_shapes=True needs greedy decoding"):
        target.generate(ids, do_sample=True, max_new_tokens=4, assistant_model=draft, clover2_static_shapes=True)
    with pytest.raises(ValueError, match="static_shapes must be True or False"):
        target.generate(ids, max_new_tokens=4, assistant_model=draft, clover2_static_shapes="yes")
