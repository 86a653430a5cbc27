"""The device-side greedy tree step (`clover2_hf.generation.device_step`).

Its output must be plain greedy `generate()`'s, token for token, and the host walk's, step for step; it
must stay within its host-read budget (at most 2 per target pass, counted as `scripts/count_host_syncs.py`
counts them); and its tensor programs (candidates, lookup chain, depth-first order, compaction) must
build what their host counterparts build.
"""

from __future__ import annotations


import pytest
import torch
from conftest import make_tiny_target
from drafters import random_pair, trained_pair
from transformers import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicCache
from transformers.generation.stopping_criteria import EosTokenCriteria

from clover2_hf import Clover2Stats
from clover2_hf.generation import cost_model, device_step, tree_step
from clover2_hf.generation.cost_model import DeviceCosts, TreeSizer
from clover2_hf.modeling_clover2 import CACHE_KWARG
from clover2_hf.tools.host_syncs import OpCounter, counting
from clover2_hf.tree import compact_cache

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = {1: 0.10, 2: 0.135, 3: 0.145, 5: 0.16, 9: 0.20, 17: 0.30, 33: 0.5}  # some trees pay, some do not


@pytest.fixture
def given_costs(monkeypatch, tmp_path):
    """`"auto"` sizing over a fixed cost table (no timing: choices are deterministic)."""
    monkeypatch.setenv("CLOVER2_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cost_model, "device_costs",
                        lambda target, cache_dir=None, **kw: DeviceCosts(dict(MIXED), source="given"))


def _three_ways(target, draft, ids, max_new_tokens, **options):
    """(plain greedy, Clover-2 on the device walk, Clover-2 on the host walk), with their stats."""
    plain = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
    device_stats, host_stats = Clover2Stats(), Clover2Stats()
    device = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, assistant_model=draft,
                             clover2_stats=device_stats, **options)
    # returned scores need the processed logits of every emitted token: the host walk
    host = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, assistant_model=draft,
                           clover2_stats=host_stats, return_dict_in_generate=True, output_scores=True,
                           **options).sequences
    assert device_stats.walk == "device" and host_stats.walk == "host"
    return plain, device, host, device_stats, host_stats


@pytest.mark.parametrize("arch", ("llama", "qwen2", "mistral", "gemma2", "qwen3", "gemma"))
@pytest.mark.parametrize("tree", [(6, 3, 0), (25, 10, 0), (4, 2, 8)], ids=["6-3", "25-10", "4-2-lookup"])
def test_device_walk_is_plain_greedy_and_follows_the_host_walk(arch, tree):
    target, draft = random_pair(arch)
    budget, top_k, lookup = tree
    pattern = torch.randint(3, 150, (4,), generator=torch.Generator().manual_seed(3))
    for ids in (torch.randint(3, 150, (1, 7), generator=torch.Generator().manual_seed(1)), pattern.repeat(3)[None]):
        plain, device, host, device_stats, host_stats = _three_ways(
            target, draft, ids, max_new_tokens=20, tree_budget=budget, tree_top_k=top_k, tree_lookup_tokens=lookup)
        assert torch.equal(plain, device)
        assert torch.equal(plain, host)
        if not lookup:  # the same fixed tree: the same nodes verified and the same path accepted, step by step
            assert device_stats.tree_sizes == host_stats.tree_sizes
            assert device_stats.tokens_per_step == host_stats.tokens_per_step


# gemma2 trains a drafter for this module alone (slow); the random-drafter identity test covers it fast
@pytest.mark.parametrize("arch", ("llama", "qwen2", pytest.param("gemma2", marks=pytest.mark.slow)))
def test_device_walk_accepts_paths_and_branches_of_a_trained_drafter(arch):
    target, draft, prompts = trained_pair(arch)
    total_device, total_host = Clover2Stats(), Clover2Stats()
    for i, max_new in enumerate([30, 17, 25, 40]):
        ids = prompts[i : i + 1]
        plain, device, host, device_stats, host_stats = _three_ways(
            target, draft, ids, max_new_tokens=max_new, tree_budget=8, tree_top_k=3, tree_lookup_tokens=0)
        assert torch.equal(plain, device) and torch.equal(plain, host)
        assert device_stats.tokens_per_step == host_stats.tokens_per_step
        total_device.tokens_per_step += device_stats.tokens_per_step
        total_device.branch_switches += device_stats.branch_switches
        total_host.branch_switches += host_stats.branch_switches
    assert total_device.tau > 1.5  # deep paths were accepted, so compaction and the walk were exercised
    assert total_device.branch_switches == total_host.branch_switches > 0  # and paths through later siblings


@pytest.mark.parametrize("arch", ("llama", pytest.param("mistral", marks=pytest.mark.slow)))
def test_automatic_sizing_on_the_device_is_lossless_and_learns(given_costs, arch):
    target, draft, prompts = trained_pair(arch)
    sizes = []
    for i, max_new in enumerate([40, 23, 31]):
        ids = prompts[i : i + 1]
        plain = target.generate(ids, do_sample=False, max_new_tokens=max_new)
        stats = Clover2Stats()
        got = target.generate(ids, do_sample=False, max_new_tokens=max_new, assistant_model=draft, clover2_stats=stats)
        assert torch.equal(plain, got) and stats.walk == "device"
        sizes += stats.tree_sizes
    assert len(set(sizes)) >= 3  # sized step by step
    sizer = TreeSizer.for_pair(draft, target, DeviceCosts(MIXED, source="given"))
    assert sizer.model.device_counts is not None  # what the calls learnt stayed on the device ...
    sizer.model.pull_device_counts()  # ... until a host-walk call reads it
    assert sizer.model.device_counts is None and sum(sizer.model.predicted) > 0
    assert sizer.model.correction(1) != pytest.approx(1.0)


def test_calls_that_need_the_host_take_the_host_walk():
    target, draft = random_pair("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    eos = target.generation_config.eos_token_id

    class Never(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    host_cases = [
        dict(do_sample=True),
        dict(logits_processor=LogitsProcessorList([MinLengthLogitsProcessor(8, eos if eos is not None else 0)])),
        dict(stopping_criteria=StoppingCriteriaList([Never()])),
        dict(return_dict_in_generate=True, output_logits=True),
        dict(tree_type="static"),
    ]
    stats = Clover2Stats()
    target.generate(ids, max_new_tokens=5, assistant_model=draft, clover2_stats=stats)
    assert stats.walk == "device"
    for kwargs in host_cases:
        stats = Clover2Stats()
        target.generate(ids, max_new_tokens=5, assistant_model=draft, clover2_stats=stats, **kwargs)
        assert stats.walk == "host", kwargs


def test_a_user_eos_criterion_stops_the_device_walk_where_plain_decoding_stops():
    target, draft, prompts = trained_pair("llama")
    ids = prompts[:1]
    reference = target.generate(ids, do_sample=False, max_new_tokens=30)
    stop_token = int(reference[0, ids.shape[1] + 9])  # a token plain decoding emits 10th
    criteria = StoppingCriteriaList([EosTokenCriteria(stop_token)])
    plain = target.generate(ids, do_sample=False, max_new_tokens=30, stopping_criteria=criteria)
    stats = Clover2Stats()
    got = target.generate(ids, do_sample=False, max_new_tokens=30, stopping_criteria=criteria, assistant_model=draft,
                          clover2_stats=stats, tree_budget=8, tree_top_k=3)
    assert stats.walk == "device"
    assert torch.equal(plain, got) and got.shape[1] < reference.shape[1]


def _host_reads_per_pass(monkeypatch, target, draft, ids, **kwargs) -> tuple[float, Clover2Stats]:
    """Scalar reads + host copies inside the tree loop (prefill included), per target forward pass."""
    loop_counts = {}

    def counted(loop):
        def run(*args, **kw):
            with counting() as counts:
                result = loop(*args, **kw)
            loop_counts.update(counts)
            return result
        return run

    monkeypatch.setattr(tree_step, "run_device_greedy", counted(device_step.run_device_greedy))
    monkeypatch.setattr(tree_step, "_host_walk", counted(tree_step._host_walk))
    stats = Clover2Stats()
    target.generate(ids, do_sample=False, assistant_model=draft, clover2_stats=stats, **kwargs)
    reads = loop_counts.get("scalar_reads", 0) + loop_counts.get("host_copies", 0)
    return reads / stats.target_forwards, stats


@pytest.mark.parametrize("tree", [dict(tree_budget=8, tree_top_k=3), dict(tree_budget=8, tree_top_k=3,
                                  tree_lookup_tokens=6), dict(tree_budget="auto", tree_top_k="auto")],
                         ids=["fixed", "fixed-lookup", "auto"])
def test_greedy_device_walk_stays_within_two_host_reads_per_pass(monkeypatch, given_costs, tree):
    target, draft, prompts = trained_pair("llama")
    for i in range(3):
        ids = prompts[i : i + 1].repeat(1, 3)  # repeats: the lookup path finds matches
        per_pass, stats = _host_reads_per_pass(monkeypatch, target, draft, ids, max_new_tokens=40, **tree)
        assert stats.walk == "device"
        assert per_pass <= 2.0, (per_pass, stats.target_forwards)
    # the same count over the host walk exceeds the budget: the counter sees what it must
    per_pass, stats = _host_reads_per_pass(monkeypatch, target, draft, prompts[:1], max_new_tokens=40, tree_budget=8,
                                           tree_top_k=3, return_dict_in_generate=True, output_scores=True)
    assert stats.walk == "host" and per_pass > 2.0


class _FakeAcceptance:
    max_depth = 5

    def corrections(self):
        return torch.ones(self.max_depth + 1)


def test_candidates_ancestors_lookup_chain_and_depth_first_order():
    target, draft = random_pair("llama")
    torch.manual_seed(0)
    root_state = torch.randn(target.config.hidden_size)
    root = torch.tensor([7])
    pool = device_step.draft_candidates(draft, root, root_state, top_k=3, depths=3, lookup=[])
    assert pool.num_drafted == 3 + 2 * 9 and pool.size == 1 + pool.num_drafted
    # the lookup chain: the tokens of a depth-2 pool node's path, then two more
    node = int((pool.depths == 2).nonzero()[4])
    parent = int(pool.parents[node])
    lookup = [int(pool.tokens[parent]), int(pool.tokens[node]), 11, 12]
    cand = device_step.draft_candidates(draft, root, root_state, top_k=3, depths=3, lookup=lookup)
    n_pool = pool.size
    assert cand.size == n_pool + 4
    assert cand.dead[n_pool:].tolist() == [True, True, False, False]  # duplicates of the matched pool nodes
    assert int(cand.parents[n_pool + 2]) == node and int(cand.parents[n_pool + 3]) == n_pool + 2
    assert int(cand.depths[n_pool + 2]) == 3 and int(cand.depths[n_pool + 3]) == 4
    assert set(cand.on_lookup.nonzero().flatten().tolist()) == {parent, node, n_pool + 2, n_pool + 3}
    # dead nodes come after every live node, in both orders (fixed tree: scores; "auto": probabilities)
    for values in (device_step.node_values(cand, None, 0.0), device_step.node_values(cand, _FakeAcceptance(), 0.5)):
        assert values[cand.dead].max() < values[~cand.dead].min()
    # every live node's ancestor row is its parent chain
    for i in range(cand.size):
        if cand.dead[i]:
            continue
        expected, v = {i}, i
        while v != 0:
            v = int(cand.parents[v])
            expected.add(v)
        assert set(cand.ancestors[i].nonzero().flatten().tolist()) == expected, i
    # depth-first order: parents first, and the chain of first children right after the root
    live = (~cand.dead).nonzero().flatten()
    order = live[torch.sort(device_step.dfs_keys(cand)[live]).indices].tolist()
    assert order[0] == 0
    position = {v: i for i, v in enumerate(order)}
    assert all(position[int(cand.parents[v])] < position[v] for v in order[1:])
    first_children = [v for v in order[1:4]]
    assert [int(cand.ranks[v]) for v in first_children] == [0, 0, 0]
    assert [int(cand.depths[v]) for v in first_children] == [1, 2, 3]


def test_compaction_moves_nothing_when_the_path_is_already_in_place():
    target = make_tiny_target("llama")

    def compact_ops(keep: list[int]) -> int:
        cache = DynamicCache(config=target.config)
        target(torch.arange(3, 13)[None], use_cache=True, **{CACHE_KWARG: cache})
        counter = OpCounter()
        with counter:
            compact_cache(cache, 5, keep, torch.tensor(keep))
        assert cache.get_seq_length() == 5 + len(keep)
        return counter.counts["ops_without_views"]

    assert compact_ops([0, 1, 2]) == 0  # the first-child chain: only the crop (views)
    assert compact_ops([0, 1, 3]) > 0


@pytest.mark.slow  # ~10 s: the whole script on tiny shapes (CI runs it; the fast loop keeps the sync-budget tests)
def test_gpu_step_check_runs_its_cpu_smoke_mode(tmp_path, monkeypatch):
    """scripts/gpu_step_check.py is the one prepared device run of issue 11: its CPU smoke mode must complete."""
    import sys

    monkeypatch.setenv("CLOVER2_HF_CACHE", str(tmp_path / "cache"))  # its "auto" call calibrates the tiny target
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import gpu_step_check
    finally:
        sys.path.pop(0)
    result = gpu_step_check.main(["--smoke", "--output", str(tmp_path / "smoke.json"), "--threads", "1"])
    # graph capture needs static verification (transformers >= 5.24); older versions run the same calls eagerly
    captured = CACHE_KWARG == "cache"
    assert result["graph_exactness_float32"]["identical"]
    assert all(call["settings"].endswith("compiled") == captured for call in result["graph_exactness_float32"]["calls"])
    tiny = result["shapes"]["tiny"]
    assert "error" not in tiny
    assert tiny["syncs"]["device walk, fixed tree 8/4"]["syncs_per_pass"] <= 2.0
    assert tiny["syncs"]["device walk, auto"]["walk"] == "device"
    assert tiny["syncs"]["host walk, fixed tree 8/4"]["syncs_per_pass"] > 2.0
    assert tiny["phases"]["phases"]["verify.forward"]["ms_per_pass"] > 0
    rows = tiny["oracle"]
    assert all(row["identical"] for name, row in rows.items() if "identical" in row)
    assert rows["clover2 eager, oracle tau 5"]["tau"] >= rows["clover2 eager, oracle tau 2"]["tau"]
    for tau in (2, 5):  # the package's graph path (one lookup width for every tau)
        traced = rows[f"clover2 static shapes traced (eager backend), lookup width 4, oracle tau {tau}"]
        assert "error" not in traced, traced.get("error")
        assert traced["identical"] and traced["settings"].endswith("compiled") == captured
    assert (tmp_path / "smoke.json").exists()


def test_the_walk_never_accepts_a_dead_lookup_node():
    """Padding of a fixed-length lookup chain (static shapes) is dead: even when the target's argmax equals its
    padding token, the walk must stop before it (its bonus token is then the target's own choice)."""
    target, draft = random_pair("llama")
    cand = device_step.draft_candidates(draft, torch.tensor([7]), None, top_k=2, depths=1,
                                        lookup=torch.tensor([5, 0, 0]), lookup_length=torch.tensor([1]))
    assert cand.dead.tolist() == [False, False, True, True]
    step = device_step.verified_tree(cand, torch.tensor([1, 2, 3]))
    logits = torch.zeros(4, 16)
    logits[0, 5] = logits[1, 0] = logits[2, 0] = logits[3, 0] = 1.0  # the target agrees with the padding too
    walk = device_step.walk_on_device(logits, step, cand)
    assert int(walk.accepted) == 1 and int(walk.bonus) == 0  # the live lookup token, then the target's token
