"""The dynamic draft tree: which nodes are kept, and how much of the tree is grown."""

from __future__ import annotations

import pytest
import torch

from clover2_hf.tree import add_path, build_tree

V, H = 30, 8


def _expand_counter():
    """A deterministic stand-in for the drafter's head: log-probs depend on the state and the token."""
    calls = []
    proj = torch.randn(H, V, generator=torch.Generator().manual_seed(0))
    embed = torch.randn(V, H, generator=torch.Generator().manual_seed(1))

    def expand(states, ids):
        calls.append(ids.numel())
        new_states = torch.tanh(states + embed[ids])
        return torch.log_softmax(3 * new_states @ proj, dim=-1), new_states

    return expand, calls


def _paths(tree) -> dict[tuple[int, ...], float]:
    """token path from the root -> cumulative score, for every node of the tree."""
    parents = [0] + tree.parents.tolist()
    tokens = [tree.root_token] + tree.tokens.tolist()
    out = {}
    for node in range(1, tree.num_nodes + 1):
        path, i = [], node
        while i != 0:
            path.append(tokens[i])
            i = parents[i]
        out[tuple(reversed(path))] = float(tree.scores[node - 1])
    return out


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("budget", [1, 2, 3, 4, 6, 12])
def test_kept_nodes_are_the_best_and_ancestor_closed_and_depth_is_capped(budget, top_k):
    root_state = torch.randn(H, generator=torch.Generator().manual_seed(2))
    first = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(3)), dim=-1)
    depths = 5
    expand, _ = _expand_counter()
    full = _paths(build_tree(7, first, expand, root_state, depths, top_k, budget=10_000))
    expand, calls = _expand_counter()
    tree = build_tree(7, first, expand, root_state, depths, top_k, budget=budget)
    kept = _paths(tree)
    # the best `budget` nodes of the fully grown tree (parents first on equal scores)
    best = sorted(full, key=lambda p: (-full[p], len(p)))[:budget]
    assert set(kept) == set(best)
    assert all(path[:-1] in kept or len(path) == 1 for path in kept)  # ancestor-closed
    # no depth beyond the budget is grown: depths 2..min(N, budget) need one head step each
    assert len(calls) == min(depths, budget) - 1
    assert int(tree.depths.max()) <= min(depths, budget)


def test_add_path_follows_matching_nodes_and_appends_the_rest():
    root_state = torch.randn(H, generator=torch.Generator().manual_seed(2))
    first = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(3)), dim=-1)
    expand, _ = _expand_counter()
    tree = build_tree(7, first, expand, root_state, 5, 2, budget=6)
    before = _paths(tree)
    existing = max(before, key=len)  # a drafted path: adding it (or a prefix) changes nothing
    assert add_path(tree, existing) is tree and add_path(tree, existing[:1]) is tree
    bigger = add_path(tree, [*existing, 29, 28])  # runs along the drafted path, then 2 new nodes
    after = _paths(bigger)
    assert bigger.num_nodes == tree.num_nodes + 2
    assert {p: s for p, s in after.items() if p in before} == before  # old nodes untouched
    assert set(after) - set(before) == {(*existing, 29), (*existing, 29, 28)}
    assert after[(*existing, 29, 28)] == float("-inf")
    assert bigger.depths[-1] == len(existing) + 2
    parents = bigger.parents.tolist()
    assert all(parent <= node for node, parent in enumerate(parents))  # parents precede children
    fresh = add_path(tree, [27, 26])  # no drafted first token matches: a new branch at the root
    assert set(_paths(fresh)) - set(before) == {(27,), (27, 26)}
    assert add_path(tree, []) is tree
