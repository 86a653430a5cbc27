"""Automatic tree settings: the device cost table, the per-step `TreeSizer`, and decoding with them.

Every tree the sizer picks must still give plain `generate()`'s tokens; the sizer must pick plain steps
where no tree pays and full trees where verification is nearly free; explicit settings and the
drafter's config are never overwritten.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import make_tiny_target
from drafters import trained_pair

from clover2_hf import Clover2ForDrafting, Clover2Stats
from clover2_hf.generation import cost_model
from clover2_hf.generation.cost_model import (
    DeviceCosts,
    TreeSizer,
    auto_tree_settings,
    device_costs,
)
from clover2_hf.tree import DraftTree, add_path, root_only, select_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

FLAT = {1: 0.010, 2: 0.0101, 9: 0.0102, 17: 0.0103, 65: 0.011}  # a GPU: passes of 1..65 tokens cost alike
STEEP = {1: 0.010, 2: 0.030, 5: 0.036, 9: 0.045, 17: 0.060}  # worse than this project's CPU


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Calibrations and tuning records go to a throw-away cache root."""
    monkeypatch.setenv("CLOVER2_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cost_model, "_COSTS", {})


def _with_costs(monkeypatch, table: dict[int, float]) -> None:
    """Make every target's cost table `table` (no timing: the choices become deterministic)."""
    monkeypatch.setattr(cost_model, "device_costs",
                        lambda target, cache_dir=None, **kw: DeviceCosts(dict(table), source="given"))


def _tree(scores: list[float], parents: list[int]) -> DraftTree:
    n = len(scores)
    depths = []
    for p in parents:
        depths.append(1 if p == 0 else depths[p - 1] + 1)
    return DraftTree(root_token=5, tokens=torch.arange(10, 10 + n), parents=torch.tensor(parents),
                     depths=torch.tensor(depths), scores=torch.tensor(scores))


# --------------------------------------------------------------------------- the cost table


def test_cost_table_interpolates_and_never_decreases():
    costs = DeviceCosts({1: 1.0, 3: 3.0, 5: 2.0, 9: 5.0})
    assert costs.verify_time(2) == pytest.approx(2.0)
    assert costs.verify_time(5) == pytest.approx(3.0)  # a noisy dip is lifted to the running maximum
    assert costs.verify_time(7) == pytest.approx(4.0)
    assert costs.verify_time(13) == pytest.approx(5.0 + 0.5 * 4)  # the last slope carries on
    assert DeviceCosts(FLAT).max_useful_tokens() == 65
    assert DeviceCosts(STEEP).max_useful_tokens() == 1  # even one draft token costs 3 plain steps
    with pytest.raises(ValueError, match="q = 1"):
        DeviceCosts({2: 1.0})


class _Usage:
    """Stands in for `CpuUsage`: reports a fixed CPU load of other processes."""

    other = 0.0

    def __enter__(self):
        self.other_cores = self.other
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("busy", [False, True])
def test_first_use_calibration_is_cached_only_when_quiet(monkeypatch, busy):
    monkeypatch.setattr(_Usage, "other", 1.0 if busy else 0.0)
    monkeypatch.setattr(cost_model, "CpuUsage", _Usage)
    monkeypatch.setattr(cost_model, "timing_spread", lambda samples: 0.0)
    target = make_tiny_target("llama")
    costs = device_costs(target)
    assert costs.source == "calibration" and 1 in costs.verify_s and set(costs.verify_s) <= set(cost_model.CALIBRATION_TOKENS)
    assert all(t > 0 for t in costs.verify_s.values())
    assert device_costs(target) is costs  # measured once per process
    assert cost_model.calibration_file().is_file() is not busy
    cost_model._COSTS.clear()  # a new process reads the file instead of timing again
    again = device_costs(target, calibrate=False)
    if busy:
        assert again is None  # a busy machine's timings are not kept for later processes
    else:
        assert again is not None and again.verify_s == costs.verify_s


def test_sizer_corrects_the_table_with_observed_pass_times():
    sizer = TreeSizer(DeviceCosts({1: 0.010, 5: 0.020}))
    assert sizer.verify_time(1) == pytest.approx(0.010) and sizer.verify_time(5) == pytest.approx(0.020)
    for _ in range(50):  # the table was measured with 1-token passes slowed down 3x by another process
        sizer.observe_verify(1, 0.0033)
        sizer.observe_verify(5, 0.020)
    assert sizer.verify_time(1) == pytest.approx(0.0033, rel=0.15)
    assert sizer.verify_time(5) == pytest.approx(0.020)


# --------------------------------------------------------------------------- the per-step choice


def test_sizer_verifies_everything_when_passes_cost_alike():
    tree = _tree([math.log(0.9), math.log(0.5), math.log(0.8), math.log(0.3)], [0, 0, 1, 3])
    sizer = TreeSizer(DeviceCosts(FLAT))
    kept, expected = sizer.choose(tree, tree.num_nodes, drafted=True)
    assert kept == [0, 1, 2, 3] and expected == pytest.approx(1 + 0.9 + 0.5 + 0.8 + 0.3)


def test_sizer_takes_plain_steps_and_backs_off_where_drafting_does_not_pay():
    tree = _tree([math.log(0.3), math.log(0.2)], [0, 1])
    sizer = TreeSizer(DeviceCosts(STEEP))
    skips = []
    for _ in range(12):  # each drafting step costs a fifth of a plain step and finds nothing worth verifying
        assert sizer.should_draft()
        kept, expected = sizer.choose(tree, tree.num_nodes, drafted=True)
        assert kept == [] and expected == 1.0  # the root alone: a plain step
        sizer.finish_step(drafted=True, tokens=1, draft_seconds=0.002, q=1)
        skips.append(sizer.skip)
        while not sizer.should_draft():
            pass
    # the prior carries the first misses; then drafting is skipped for longer and longer
    assert skips[:3] == [0, 0, 0] and skips[3:] == [1, 2, 4, 8, 16, 16, 16, 16, 16]
    sizer.finish_step(drafted=True, tokens=9, draft_seconds=0.002, q=9)  # 8 extra tokens: it paid
    assert sizer.backoff == 0 and sizer.skip == 0


def test_sizer_judges_drafting_by_what_it_brought_not_by_catch_up_or_jitter():
    sizer = TreeSizer(DeviceCosts(STEEP))
    for _ in range(30):  # one drafted step in two gains a token for a 5-token pass (3.6 plain steps' time)
        sizer.finish_step(drafted=True, tokens=2, draft_seconds=0.001, q=5)
        sizer.finish_step(drafted=True, tokens=1, draft_seconds=0.001, q=5)
    assert sizer.backoff > 0  # 0.5 tokens for 2.7 plain steps' extra time: it does not pay
    sizer = TreeSizer(DeviceCosts(FLAT))
    for _ in range(30):  # the same on a device where passes cost alike: it pays
        sizer.finish_step(drafted=True, tokens=2, draft_seconds=0.001, q=5)
        sizer.finish_step(drafted=True, tokens=1, draft_seconds=0.001, q=5)
        assert sizer.backoff == 0
    sizer.finish_step(drafted=False, tokens=1, draft_seconds=5.0, q=1)  # a step that did not draft is not judged
    assert sizer.backoff == 0


def test_sizer_prefix_is_closed_under_ancestors_and_learns_its_correction():
    g = torch.Generator().manual_seed(0)
    costs = DeviceCosts({1: 0.01, 2: 0.012, 5: 0.013, 9: 0.016, 17: 0.025, 33: 0.04})
    for trial in range(30):
        n = int(torch.randint(1, 20, (1,), generator=g))
        parents = [int(torch.randint(0, m + 1, (1,), generator=g)) for m in range(n)]
        scores = []
        for m, p in enumerate(parents):  # path scores never increase along a path
            step = float(torch.rand(1, generator=g)) * 3
            scores.append((scores[p - 1] if p else 0.0) - step)
        tree = _tree(scores, parents)
        kept, _ = TreeSizer(costs).choose(tree, n, drafted=True)
        sub = select_nodes(tree, kept)  # raises when a kept node's parent is missing
        assert sub.num_nodes == len(kept)
    sizer = TreeSizer(costs)
    tree = _tree([math.log(0.5)] * 4, [0, 0, 0, 0])
    for _ in range(20):  # the drafter says 0.5 each, but nothing is ever accepted
        sizer.update(tree, 4, [])
    assert sizer.correction < 0.2


def test_lookup_nodes_get_the_running_lookup_rate():
    drafted = _tree([math.log(0.4)], [0])
    tree = add_path(drafted, [10, 77, 78])  # follows drafted node 1 (token 10), then two new nodes
    sizer = TreeSizer(DeviceCosts(FLAT))
    probs = sizer.node_probabilities(tree, 1)
    rho = sizer.lookup_rate
    assert probs == pytest.approx([max(0.4, rho), rho ** 2, rho ** 3])
    sizer.update(tree, 1, [0, 1, 2])  # all three accepted: the rate rises
    assert sizer.lookup_rate > rho
    kept, _ = sizer.choose(root_only(5), 0, drafted=False)
    assert kept == []


def test_select_nodes_reindexes_parents():
    tree = _tree([-0.1, -0.2, -0.3, -0.4], [0, 1, 0, 3])
    sub = select_nodes(tree, [0, 2, 3])
    assert sub.parents.tolist() == [0, 0, 2] and sub.tokens.tolist() == [10, 12, 13]
    with pytest.raises(ValueError, match="ancestors"):
        select_nodes(tree, [1])


# --------------------------------------------------------------------------- settings resolution


def test_explicit_settings_win_and_the_config_is_never_changed(monkeypatch):
    target = make_tiny_target("llama")
    draft = Clover2ForDrafting.from_target(target).eval()
    assert (draft.config.tree_budget, draft.config.tree_top_k) == ("auto", "auto")
    _with_costs(monkeypatch, FLAT)
    auto = auto_tree_settings(draft, target)
    assert auto.adaptive and auto.budget == 64 and auto.source == "device cost model"
    draft.config.tree_budget, draft.config.tree_top_k = 25, 10
    fixed = auto_tree_settings(draft, target)
    assert (fixed.adaptive, fixed.budget, fixed.top_k, fixed.source) == (False, 25, 10, "explicit value")
    before = draft.config.to_dict()
    target.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=5, assistant_model=draft)
    assert draft.config.to_dict() == before


def test_generate_keywords_override_the_drafter_defaults_for_one_call(monkeypatch):
    """tree_budget= / tree_top_k= / tree_lookup_tokens= / clover2_decoding= apply to one call only."""
    _with_costs(monkeypatch, FLAT)
    target, draft, prompts = trained_pair("llama")
    before = draft.config.to_dict()
    ids = prompts[:1]
    expected = target.generate(ids, do_sample=False, max_new_tokens=24)
    stats = Clover2Stats()
    got = target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=draft, clover2_stats=stats,
                          tree_budget=3, tree_top_k=2, tree_lookup_tokens=0)
    assert torch.equal(expected, got)
    assert stats.tree_settings.startswith("tree_budget=3, tree_top_k=2 (explicit values)")
    assert max(stats.tree_sizes) <= 3 and stats.mode == "tree"
    default = Clover2Stats()  # the next call without keywords is back on the drafter's defaults ("auto")
    target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=draft, clover2_stats=default)
    assert "device cost model" in default.tree_settings
    chain = Clover2Stats()
    got = target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=draft, clover2_stats=chain,
                          clover2_decoding="chain")
    assert torch.equal(expected, got) and chain.mode == "chain"
    assert draft.config.to_dict() == before


def test_explicit_keywords_beat_a_tuning_record(monkeypatch):
    target = make_tiny_target("llama")
    draft = Clover2ForDrafting.from_target(target).eval()
    record = {"tree_budget": 7, "tree_top_k": 3, "verify_time_s": {"1": 0.01, "8": 0.02}}
    monkeypatch.setattr(cost_model, "load_tuned_settings", lambda *a, **k: dict(record))
    _with_costs(monkeypatch, FLAT)
    from clover2_hf.generation.options import DecodingOptions

    tuned = auto_tree_settings(draft, target)
    assert tuned.source == "tuning file" and tuned.budget == 7 and tuned.top_k == 3
    mixed = auto_tree_settings(draft, target, options=DecodingOptions.resolve(draft.config, {"tree_top_k": 5}))
    assert (mixed.budget, mixed.top_k) == (7, 5)  # only the "auto" value is filled in
    fixed = auto_tree_settings(draft, target, options=DecodingOptions.resolve(draft.config, {"tree_budget": 4}))
    assert (fixed.adaptive, fixed.budget, fixed.top_k) == (False, 4, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"tree_budget": 0}, "tree_budget must be an integer >= 1"),
    ({"tree_top_k": "many"}, "tree_top_k must be an integer >= 1 or \"auto\""),
    ({"clover2_decoding": "beam"}, "decoding must be one of"),
    ({"tree_lookup_ngram": 1}, "tree_lookup_ngram must be an integer >= 2"),
])
def test_bad_option_keywords_fail_before_decoding(kwargs, message):
    target = make_tiny_target("llama")
    draft = Clover2ForDrafting.from_target(target).eval()
    with pytest.raises(ValueError, match=message):
        target.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, assistant_model=draft, **kwargs)


def test_option_keywords_without_a_clover2_assistant_are_rejected_by_transformers():
    target = make_tiny_target("llama")
    with pytest.raises(ValueError, match="tree_budget"):
        target.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, tree_budget=4)


# --------------------------------------------------------------------------- decoding with automatic sizing

# Tables for decoding tests are in tenths of seconds, so that the real drafting time of a tiny drafter
# (milliseconds) hardly counts against them.
MIXED = {1: 0.10, 2: 0.135, 3: 0.145, 5: 0.16, 9: 0.20, 17: 0.30, 33: 0.5}  # some trees pay, some do not
SLOW_FLAT = {q: 10 * t for q, t in FLAT.items()}


@pytest.mark.parametrize("arch", ("llama", "mistral", "gemma2"))
@pytest.mark.parametrize("table", [SLOW_FLAT, MIXED, STEEP], ids=["flat", "mixed", "steep"])
def test_greedy_identical_with_automatic_sizing(monkeypatch, arch, table):
    _with_costs(monkeypatch, table)
    target, draft, prompts = trained_pair(arch)
    total = Clover2Stats()
    for i, max_new in enumerate([40, 23, 31, 17, 36, 29]):
        ids = prompts[i : i + 1]
        expected = target.generate(ids, do_sample=False, max_new_tokens=max_new)
        stats = Clover2Stats()
        got = target.generate(ids, do_sample=False, max_new_tokens=max_new, assistant_model=draft, clover2_stats=stats)
        assert torch.equal(expected, got), (i, expected, got)
        assert "device cost model" in stats.tree_settings
        total.tokens_per_step += stats.tokens_per_step
        total.tree_sizes += stats.tree_sizes
        total.plain_steps += stats.plain_steps
    steps = len(total.tree_sizes)
    if table is SLOW_FLAT:
        assert total.plain_steps == 0 and total.tau > 2.0  # a free tree is always worth verifying
    elif table is STEEP:
        assert total.plain_steps > 0.5 * steps  # a 2-token pass costs 3 plain steps: mostly plain
    else:
        assert len(set(total.tree_sizes)) >= 3  # sized step by step


@pytest.mark.parametrize("sampling", [False, True], ids=["device walk", "host walk"])
def test_drafting_is_judged_without_the_augmenting_blocks_update(monkeypatch, sampling):
    """The augmenting block's update (a catch-up after skipped steps included) must run before any later draft, so
    it is not charged to drafting: here it takes twice a plain step, and drafting is judged without it."""
    _with_costs(monkeypatch, SLOW_FLAT)  # a plain step: 0.1 s
    target, draft, prompts = trained_pair("llama")
    augment = draft.augment

    def slow_augment(*args, **kwargs):
        time.sleep(0.2)
        return augment(*args, **kwargs)

    monkeypatch.setattr(draft, "augment", slow_augment)
    judged = []
    finish_step = TreeSizer.finish_step

    def spy(self, drafted, tokens, draft_seconds, q):
        if drafted:
            judged.append(draft_seconds)
        return finish_step(self, drafted, tokens, draft_seconds, q)

    monkeypatch.setattr(TreeSizer, "finish_step", spy)
    torch.manual_seed(0)
    stats = Clover2Stats()
    target.generate(prompts[:1], do_sample=sampling, max_new_tokens=10, assistant_model=draft, clover2_stats=stats)
    assert judged and max(judged) < 0.2, judged
    assert stats.draft_time_s >= 0.2 * len(judged)  # the update did run, and was timed as drafting in the stats


def test_seeded_sampling_identical_with_automatic_sizing(monkeypatch):
    _with_costs(monkeypatch, MIXED)
    target, draft, prompts = trained_pair("llama")
    for seed in range(4):
        ids = prompts[seed : seed + 1]
        torch.manual_seed(seed)
        plain = target.generate(ids, do_sample=True, temperature=0.7, max_new_tokens=24)
        torch.manual_seed(seed)
        stats = Clover2Stats()
        got = target.generate(ids, do_sample=True, temperature=0.7, max_new_tokens=24, assistant_model=draft,
                              clover2_stats=stats)
        assert torch.equal(plain, got), seed


def test_hopeless_depth_one_skips_growing_the_tree():
    sizer = TreeSizer(DeviceCosts(STEEP, source="given"))
    flat = torch.log_softmax(torch.zeros(100), dim=-1)  # 1% each: nothing could pay
    assert not sizer.worth_growing(flat, top_k=4)
    sure = torch.log_softmax(torch.tensor([12.0] + [0.0] * 99), dim=-1)  # one token at ~99.9%
    assert sizer.worth_growing(sure, top_k=4)


def test_what_a_call_learnt_carries_to_the_next_call_of_the_pair():
    target = make_tiny_target("llama")
    draft = Clover2ForDrafting.from_target(target).eval()
    costs = DeviceCosts(FLAT, source="given")
    first = TreeSizer.for_pair(draft, target, costs)
    tree = _tree([math.log(0.5)] * 4, [0, 0, 0, 0])
    for _ in range(10):
        first.update(tree, 4, [])  # nothing the drafter proposes is accepted
    second = TreeSizer.for_pair(draft, target, costs)
    assert second.model is first.model and second.correction < 0.5  # decayed, not forgotten
    other = TreeSizer.for_pair(draft, make_tiny_target("qwen2"), costs)
    assert other.correction == pytest.approx(1.0)  # another target starts afresh


def test_trees_grow_one_depth_beyond_what_was_last_kept():
    sizer = TreeSizer(DeviceCosts(STEEP, source="given"))
    weak = _tree([math.log(0.3), math.log(0.2)], [0, 1])  # worth nothing on this device
    sizer.choose(weak, 2, drafted=True)
    assert sizer.depth_cap == 1  # only depth 1 is grown next time
    sure = _tree([8 * i * math.log(0.999) for i in range(1, 9)], list(range(8)))
    sizer.choose(sure, 8, drafted=True)
    assert sizer.depth_cap == 9  # the whole chain was kept: grow deeper again


def test_timings_ignore_the_kernel_override_and_record_what_ran(monkeypatch):
    from clover2_hf.generation.cpu_kernels import CpuVerifyLinears

    target = make_tiny_target("llama")
    monkeypatch.setenv("CLOVER2_HF_WIDE_LINEAR", "1")
    assert CpuVerifyLinears(target).modules  # decoding honours the user's override ...
    assert CpuVerifyLinears(target, honour_env=False).modules == []  # ... a timing of the stock kernel does not
    assert cost_model._cpu_model() in cost_model.device_key("cpu")  # two kinds of CPU never share a table
