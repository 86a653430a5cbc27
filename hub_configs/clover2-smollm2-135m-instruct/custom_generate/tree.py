"""Draft token trees: construction by cumulative path probability, tree attention masks, KV compaction.

Pure tensor logic: this module knows nothing of the drafter or of `generate`. A tree for one
verification step has a root (the last verified token, not yet seen by the target) and M draft nodes;
in the target's verification pass the root sits at index 0 and node m at index m + 1 ("verify index").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# Static tree of the reference implementation's shape family (EAGLE-1 style, 25 nodes, depth 5):
# each entry is a path of child ranks from the root, rank 0 being the drafter's most likely token.
STATIC_TREE_PATHS: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,), (4,), (5,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 1, 0),
)


@dataclass
class DraftTree:
    """A draft tree in verification order (parents before children).

    Attributes:
        root_token: the last verified token id (verify index 0).
        tokens: [M] target token ids of the draft nodes (verify indices 1..M).
        parents: [M] verify index of each node's parent (0 = root).
        depths: [M] depth of each node (1 = child of the root).
        scores: [M] cumulative draft log-probability of each node's path.
    """

    root_token: int
    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor
    _children: list[dict[int, int]] | None = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.numel())

    def verify_tokens(self) -> torch.Tensor:
        """[M + 1] token ids fed to the target: root then nodes."""
        root = torch.tensor([self.root_token], dtype=self.tokens.dtype, device=self.tokens.device)
        return torch.cat([root, self.tokens])

    def verify_depths(self) -> torch.Tensor:
        """[M + 1] depth of every token fed to the target: the root (0), then the nodes."""
        return torch.cat([torch.zeros(1, dtype=torch.long, device=self.tokens.device), self.depths.to(self.tokens.device)])

    def children(self) -> list[dict[int, int]]:
        """children()[v] maps token id -> verify index of that child of verify index v."""
        if self._children is None:
            kids: list[dict[int, int]] = [{} for _ in range(self.num_nodes + 1)]
            for m, (tok, parent) in enumerate(zip(self.tokens.tolist(), self.parents.tolist())):
                kids[parent].setdefault(tok, m + 1)
            self._children = kids
        return self._children

    def ancestor_matrix(self) -> torch.Tensor:
        """[M + 1, M + 1] bool: entry (i, j) is True when verify index j is i itself or an ancestor of i."""
        q = self.num_nodes + 1
        anc = torch.eye(q, dtype=torch.bool)
        parents = [0] + self.parents.tolist()
        for i in range(1, q):  # parents precede children, so row parents[i] is complete
            anc[i] |= anc[parents[i]]
        return anc.to(self.tokens.device)


def build_tree(
    root_token: int,
    first_logprobs: torch.Tensor,
    expand: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    root_state: torch.Tensor,
    max_depth: int,
    top_k: int,
    budget: int,
    to_target_ids: Callable[[torch.Tensor], torch.Tensor] = lambda ids: ids,
    static_paths: Sequence[Sequence[int]] | None = None,
) -> DraftTree:
    """Grow a draft tree by cumulative path probability (the dynamic tree), or along `static_paths`.

    Dynamic: at each depth the `top_k` best nodes of that depth (by cumulative log-probability) are
    expanded into their `top_k` most likely children; after `min(max_depth, budget)` depths the
    `budget` best nodes overall are kept. Path scores never increase along a path, and ties are broken by depth,
    so the kept set always contains every kept node's ancestors.

    Args:
        root_token: last verified token id.
        first_logprobs: [V_draft] draft log-probabilities of depth 1 (head depth 0).
        expand: `expand(states [W, H], draft_ids [W]) -> (logprobs [W, V_draft], states [W, H])`, one
            head step for W nodes; `states` are the recurrent states r the nodes' parents produced.
        root_state: [H] the head state that depth-1 nodes continue from (c_t).
        max_depth: number of draft depths N.
        top_k: children per expanded node (and nodes expanded per depth).
        budget: number of nodes kept.
        to_target_ids: maps draft-vocabulary indices to target token ids.
        static_paths: child-rank paths of a fixed tree shape, instead of the dynamic rule.
    """
    device = first_logprobs.device
    # Per depth: draft ids, cumulative scores, index of the parent in the previous depth's arrays.
    k = min(top_k, first_logprobs.numel())
    if static_paths is not None:
        k = max(p[0] for p in static_paths) + 1
    scores, ids = first_logprobs.topk(k)
    levels = [(ids, scores, torch.full_like(ids, -1))]
    states = root_state.unsqueeze(0).expand(k, -1)
    wanted = None if static_paths is None else {tuple(p) for p in static_paths}
    # A kept node at depth d brings its d - 1 ancestors (scores never increase along a path), so no
    # node deeper than `budget` can be kept: growing the dynamic tree stops there.
    last_depth = max_depth if wanted is not None else min(max_depth, max(budget, 1))
    for depth in range(1, last_depth):
        ids, scores, _ = levels[-1]
        if wanted is None:
            width = min(top_k, ids.numel())
            expand_idx = scores.topk(width).indices  # the best nodes of this depth
        else:
            paths = _level_paths(levels, static_paths)
            expand_idx = torch.tensor(
                [i for i, p in enumerate(paths) if any(len(w) > depth and tuple(w[:depth]) == p for w in wanted)],
                dtype=torch.long, device=device,
            )
        if expand_idx.numel() == 0:
            break
        logprobs, child_states = expand(states[expand_idx], ids[expand_idx])  # [W, Vd], [W, H]
        kk = min(top_k if wanted is None else max(len(w) and w[-1] for w in static_paths) + 1, logprobs.shape[-1])
        child_scores, child_ids = logprobs.topk(kk, dim=-1)  # [W, kk]
        child_scores = child_scores + scores[expand_idx, None]
        parent_pos = expand_idx[:, None].expand(-1, kk)
        levels.append((child_ids.flatten(), child_scores.flatten(), parent_pos.flatten()))
        states = child_states.repeat_interleave(kk, dim=0)

    # Flatten all depths and pick the kept nodes.
    flat_depth = torch.cat([torch.full_like(lvl[0], d + 1) for d, lvl in enumerate(levels)])
    flat_scores = torch.cat([lvl[1] for lvl in levels])
    offsets = [0]
    for lvl in levels:
        offsets.append(offsets[-1] + lvl[0].numel())
    flat_parent = torch.cat(
        [torch.where(lvl[2] >= 0, lvl[2] + offsets[d - 1], -1) if d > 0 else lvl[2] for d, lvl in enumerate(levels)]
    )
    flat_ids = torch.cat([lvl[0] for lvl in levels])
    if wanted is None:
        # best `budget` nodes by score, parents first on ties (stable sorts: depth asc, then score desc)
        by_depth = torch.sort(flat_depth, stable=True).indices
        order = by_depth[torch.sort(flat_scores[by_depth], descending=True, stable=True).indices][:budget]
        # verification order: by depth, then score (parents always precede their children)
        order = order[torch.sort(-flat_scores[order], stable=True).indices]
        keep = order[torch.sort(flat_depth[order], stable=True).indices].tolist()
    else:
        paths = [p for lvl_paths in _all_paths(levels, static_paths) for p in lvl_paths]
        keep = [i for i, p in enumerate(paths) if p in wanted]
    position = {node: v + 1 for v, node in enumerate(keep)}  # flat index -> verify index
    parent_list = flat_parent.tolist()
    parents = torch.tensor(
        [0 if parent_list[i] < 0 else position[parent_list[i]] for i in keep], dtype=torch.long, device=device
    )
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    return DraftTree(
        root_token=int(root_token),
        tokens=to_target_ids(flat_ids[keep_t]),
        parents=parents,
        depths=flat_depth[keep_t],
        scores=flat_scores[keep_t],
    )


def lookup_continuation(context: list[int], num_tokens: int, max_ngram: int) -> list[int]:
    """Prompt-lookup guess: the tokens that followed the latest earlier occurrence of the context's tail.

    Tries the last `max_ngram` tokens first, then shorter tails down to 2 tokens (a single-token match
    is mostly noise and would cost verification work); returns up to `num_tokens` tokens, or [].
    """
    length = len(context)
    for n in range(min(max_ngram, length - 1), 1, -1):
        tail = context[-n:]
        for start in range(length - n - 1, -1, -1):  # latest match first; its continuation is non-empty
            if context[start : start + n] == tail:
                return context[start + n : start + n + num_tokens]
    return []


def add_path(tree: DraftTree, path_tokens: Sequence[int]) -> DraftTree:
    """`tree` plus a token path from the root (e.g. a prompt-lookup continuation), merged into it.

    The path follows existing nodes while its tokens match a child's and continues as new nodes
    (appended in path order, so parents still precede children). New nodes get the score -inf: they
    carry no draft probability. Returns `tree` itself when the whole path is already in it.
    """
    children = tree.children()
    node, depth, rest = 0, 0, list(path_tokens)
    while rest and int(rest[0]) in children[node]:
        node = children[node][int(rest.pop(0))]
        depth += 1
    if not rest:
        return tree
    m, device = tree.num_nodes, tree.tokens.device
    new_parents = [node] + [m + 1 + i for i in range(len(rest) - 1)]  # verify indices
    return DraftTree(
        root_token=tree.root_token,
        tokens=torch.cat([tree.tokens, torch.tensor(rest, dtype=tree.tokens.dtype, device=device)]),
        parents=torch.cat([tree.parents, torch.tensor(new_parents, dtype=tree.parents.dtype, device=device)]),
        depths=torch.cat([tree.depths, torch.arange(depth + 1, depth + 1 + len(rest), dtype=tree.depths.dtype,
                                                    device=device)]),
        scores=torch.cat([tree.scores, torch.full((len(rest),), float("-inf"), dtype=tree.scores.dtype,
                                                  device=tree.scores.device)]),
    )


def select_nodes(tree: DraftTree, keep: Sequence[int]) -> DraftTree:
    """The sub-tree of the nodes `keep` (node indices m = verify index - 1, ascending, closed under
    ancestors), in the same verification order with parents re-indexed; `tree` itself when all are kept."""
    keep = list(keep)
    if len(keep) == tree.num_nodes:
        return tree
    position = {m + 1: v + 1 for v, m in enumerate(keep)}  # old verify index -> new verify index
    position[0] = 0
    old_parents = tree.parents.tolist()
    try:
        parents = [position[old_parents[m]] for m in keep]
    except KeyError as exc:
        raise ValueError(f"select_nodes: kept nodes {keep} are not closed under ancestors") from exc
    index = torch.tensor(keep, dtype=torch.long, device=tree.tokens.device)
    return DraftTree(
        root_token=tree.root_token,
        tokens=tree.tokens[index],
        parents=torch.tensor(parents, dtype=tree.parents.dtype, device=tree.parents.device),
        depths=tree.depths[index.to(tree.depths.device)],
        scores=tree.scores[index.to(tree.scores.device)],
    )


def root_only(root_token: int, device: torch.device | str = "cpu") -> DraftTree:
    """A tree without draft nodes: verifying it is a plain decoding step."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return DraftTree(root_token=int(root_token), tokens=empty, parents=empty.clone(), depths=empty.clone(),
                     scores=torch.zeros(0, device=device))


def _level_paths(levels, static_paths) -> list[tuple[int, ...]]:
    return _all_paths(levels, static_paths)[-1]


def _all_paths(levels, static_paths) -> list[list[tuple[int, ...]]]:
    """Child-rank path of every node of every level (ranks follow topk order within each parent)."""
    out: list[list[tuple[int, ...]]] = []
    for d, (ids, _, parent) in enumerate(levels):
        if d == 0:
            out.append([(r,) for r in range(ids.numel())])
            continue
        prev = out[-1]
        counts: dict[int, int] = {}
        paths = []
        for p in parent.tolist():
            rank = counts.get(p, 0)
            counts[p] = rank + 1
            paths.append(prev[p] + (rank,))
        out.append(paths)
    return out


def tree_attention_mask(
    tree: DraftTree,
    past_length: int,
    kv_length: int,
    kv_offset: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive float mask [1, 1, M + 1, kv_length] for one target layer type (`ancestor_attention_mask` of
    the tree's ancestor matrix and depths)."""
    return ancestor_attention_mask(tree.ancestor_matrix(), tree.verify_depths(), past_length, kv_length, kv_offset,
                                   dtype, sliding_window)


def ancestor_attention_mask(
    ancestors: torch.Tensor,
    depths: torch.Tensor,
    past_length: int,
    kv_length: int,
    kv_offset: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive float mask [1, 1, q, kv_length] for a verification pass over q tree tokens.

    `ancestors` [q, q] bool: (i, j) True when tree token j is i itself or an ancestor of i; `depths` [q]
    (root 0). Keys are the layer's visible cached positions `kv_offset .. past_length - 1` followed by
    the q tree tokens; the tree token i has absolute position `past_length + depths[i]`. A query attends a
    cached key when within the sliding window (if any), and a tree key when it is an ancestor (and within
    the window). 0 means attend, `finfo(dtype).min` means blocked: an additive float mask is correct under
    both eager and sdpa attention (a bool mask is silently wrong under eager). Built without host reads.
    """
    q = depths.numel()
    blocked = torch.finfo(dtype).min
    mask = torch.zeros(q, kv_length, dtype=dtype, device=depths.device)
    mask[:, kv_length - q :].masked_fill_(~ancestors.to(depths.device), blocked)
    if sliding_window is not None:
        query_pos = past_length + depths  # [q]
        key_pos = torch.cat([kv_offset + torch.arange(kv_length - q, device=depths.device), query_pos])
        # a path deeper than the window (a long lookup path) must not see its oldest ancestors either
        mask.masked_fill_((query_pos[:, None] - key_pos[None, :]) >= sliding_window, blocked)
    return mask[None, None]


def compact_cache(cache, num_tree_tokens: int, keep: Sequence[int], keep_on_device: torch.Tensor | None = None) -> None:
    """Keep only the verify indices `keep` (ascending, starting with 0) of the last verification pass.

    The cache holds the M + 1 tree tokens as its last `num_tree_tokens` entries; their kept K/V are
    moved to the start of that tail and the rest is cropped, so the cache then equals the one a
    linear pass over the accepted tokens would have produced. Only the entries after the kept prefix
    that already sits in place move: one `index_select` and one `index_copy_` per layer tensor, indexed by
    `keep_on_device` (the same indices as a tensor on the cache's device, when the caller has it: no
    upload). Works for dynamic and (past-recording) sliding-window layers.
    """
    keep = list(keep)
    first_moved = next((i for i, v in enumerate(keep) if v != i), len(keep))
    # writes DynamicCache layers' `keys` / `values` tensors in place and relies on `crop` (cache_utils);
    # caught by tests/test_decoding.py::test_cache_compaction_matches_linear_recomputation (every architecture)
    if first_moved < len(keep):
        moved = keep_on_device[first_moved:] if keep_on_device is not None else torch.tensor(keep[first_moved:])
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            start = keys.shape[-2] - num_tree_tokens
            src = moved.to(keys.device) + start
            dst = torch.arange(start + first_moved, start + len(keep), device=keys.device)
            layer.keys.index_copy_(-2, dst, layer.keys.index_select(-2, src))
            layer.values.index_copy_(-2, dst, layer.values.index_select(-2, src))
    cache.crop(-(num_tree_tokens - len(keep)))
