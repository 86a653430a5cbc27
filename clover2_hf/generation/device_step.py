"""Greedy tree decoding with the tree built, sized and walked on the device: two small host reads per step.

The general loop (`tree_step.clover2_tree_decode`'s host walk) reads the tree to the host to grow, size,
merge and walk it: on an accelerator every such read waits for the device, and the waits, not the
target, dominated a step. For greedy decoding with the default stopping criteria (maximum length, eos)
and no logits processor, this module does the same step with fixed-size tensor programs instead:

1. **Candidates.** The drafter grows its candidate pool: depth 1 holds head depth 0's `top_k` tokens,
   each further depth the `top_k` children of that depth's `top_k` best nodes (k + (D - 1) k^2 nodes,
   as `tree.build_tree` grows them), with parents, depths, cumulative scores, sibling ranks and the
   ancestor matrix built by gathers. The prompt-lookup guess (`tree.lookup_continuation`, read on
   the host from the host's copy of the emitted tokens) becomes a chain of nodes that hangs from the
   deepest pool node matching its prefix; chain nodes that duplicate pool nodes are marked dead.
2. **Choice.** Every node gets a value: with a fixed tree its draft score (lookup-path nodes first);
   with `"auto"` sizing the `TreeSizer`'s predicted acceptance probability (per-depth corrected path
   probability, the lookup rate on the lookup path, capped by the parent's). The best prefix of the
   nodes ordered by value is kept: with `"auto"` the prefix maximising predicted tokens per second of
   verification (as `TreeSizer.choose`), else the `tree_budget` best plus the lookup tokens. **Host
   read 1**: the prefix length and the next step's depth cap (two integers; not needed for a fixed tree,
   whose size the host knows, nor for a step where the sizer skips drafting: the lookup chain's values
   are known on the host).
3. **Verification** of the kept nodes in depth-first order (a node's first child right after it, so a
   path of first children sits contiguously after the root and needs no cache compaction), with the
   additive tree mask built from the ancestor matrix.
4. **Walk on the device.** A node is accepted when every node on its path equals the target's argmax
   at its parent; the deepest accepted node ends the path (the same path the host walk follows: sibling
   tokens are distinct). **Host read 2**: one tensor with the accepted count, the target's bonus token,
   the path's tokens and verify indices. The host checks the stopping criteria token by token on it.
5. The target cache keeps the accepted path (`index_copy_` per layer, only when the path is not already
   contiguous), the drafter's input queue gets the path's hidden states by one gather, and the sizer's
   acceptance statistics are updated on the device.

Which tokens are emitted is exactly plain greedy decoding's: every emitted token is the target's argmax
given the emitted prefix (tests/test_device_step.py compares token for token against `generate()` and
against the host walk). Only which nodes are verified differs from the host walk's policy in details (the
pool is chosen from directly, and a drafted tree is always grown; the sizer's back-off skips drafting).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
)

from ..modeling_clover2 import CACHE_KWARG, Clover2ForDrafting
from ..tree import compact_cache, lookup_continuation
from .cost_model import TreeSizer
from .cpu_kernels import target_mask_kwargs

__all__ = ["Candidates", "DeviceAcceptance", "VerifiedTree", "Walk", "best_first", "device_greedy_supported",
           "dfs_keys", "draft_candidates", "node_values", "run_device_greedy", "upload", "verified_tree",
           "walk_on_device"]

_INT64_MAX = torch.iinfo(torch.int64).max


def device_greedy_supported(generation_config, logits_processor, stopping_criteria, tree_type: str) -> bool:
    """Whether a call can take the device-side greedy loop (else the host walk runs, with the same output).

    Greedy, no logits processor (each would need the emitted prefix per tree node), only the maximum-length
    and eos criteria (checked on the host from the transferred tokens), no per-token scores or logits
    returned, the dynamic tree."""
    gc = generation_config
    if gc.do_sample or len(logits_processor) > 0 or tree_type != "dynamic":
        return False
    if gc.return_dict_in_generate and (gc.output_scores or gc.output_logits):
        return False
    return all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in stopping_criteria)


def _host_stopping(stopping_criteria, generation_config) -> tuple[int, set[int]]:
    """(maximum length, eos ids) of the default criteria.

    The eos criterion transformers builds holds `generation_config._eos_token_tensor`, made from
    `generation_config.eos_token_id` (`GenerationMixin._prepare_special_tokens`): its ids are then read from
    the config, not from the device; any other eos criterion is read once."""
    max_length, eos = _INT64_MAX, set()
    configured = generation_config.eos_token_id
    for criterion in stopping_criteria:
        if type(criterion) is MaxLengthCriteria:
            max_length = min(max_length, int(criterion.max_length))
        elif (criterion.eos_token_id is getattr(generation_config, "_eos_token_tensor", None)
              and isinstance(configured, (int, list))):
            eos.update([configured] if isinstance(configured, int) else configured)
        else:
            eos.update(criterion.eos_token_id.flatten().tolist())
    return max_length, eos


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for it (pinned memory, non-blocking, on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidates:
    """A drafted pool plus the lookup chain, all on the device. Index 0 is the root; n = 1 + P + L.

    tokens [n] target ids; parents [n] (the root is its own parent); depths [n] (root 0); scores [n]
    cumulative draft log-probabilities (lookup-only nodes -inf); ranks [n] sibling rank (0 = the
    drafter's best child); ancestors [n, n] bool, (i, j) True when j is i or an ancestor of i;
    drafted / on_lookup / dead [n] bool: a pool node / a node of the lookup path (chain nodes and the
    pool nodes the chain hangs from) / a chain node that duplicates a pool node (never verified).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor
    ranks: torch.Tensor
    ancestors: torch.Tensor
    drafted: torch.Tensor
    on_lookup: torch.Tensor
    dead: torch.Tensor
    num_drafted: int  # P
    num_lookup: int  # L
    max_rank: int  # the largest sibling rank
    depths_grown: int  # depths of the drafted pool

    @property
    def size(self) -> int:
        return 1 + self.num_drafted + self.num_lookup

    @property
    def max_depth(self) -> int:
        """A bound on any node's depth."""
        return self.num_lookup + self.depths_grown


def draft_candidates(draft: Clover2ForDrafting, root_token: torch.Tensor, root_state: torch.Tensor | None,
                     top_k: int, depths: int, lookup: list[int] | torch.Tensor,
                     lookup_length: torch.Tensor | None = None) -> Candidates:
    """The candidate pool of one step (see the module docstring, step 1).

    root_token: [1] the last verified token (device); root_state: [H] c_t, or None to draft nothing (a step
    with the lookup chain only); depths: depths to grow (>= 1); lookup: the prompt-lookup tokens (a host
    list, or a device tensor [L] whose first `lookup_length` ([1] device tensor) entries are the tokens:
    the fixed-shape form of `static_step`)."""
    device = root_token.device
    tokens, parents, dep, scores, ranks = [root_token], [torch.zeros(1, dtype=torch.long, device=device)], \
        [torch.zeros(1, dtype=torch.long, device=device)], [torch.zeros(1, device=device)], \
        [torch.zeros(1, dtype=torch.long, device=device)]
    num_drafted, k, grown, level_sizes = 0, 0, 0, []
    if root_state is not None:
        head0, _ = draft.head_step(root_state[None])
        first = torch.log_softmax(draft.head_logits(head0).float(), dim=-1)[0]  # [V_draft]
        k = min(top_k, first.numel())
        level_scores, level_ids = first.topk(k)  # depth 1
        level_parents = torch.zeros(k, dtype=torch.long, device=device)
        level_ranks = torch.arange(k, device=device)
        states = root_state[None].expand(k, -1)
        offset = 1  # pool index of the level's first node
        for depth in range(1, depths + 1):
            tokens.append(draft.draft_to_target_ids(level_ids))
            parents.append(level_parents)
            dep.append(torch.full((level_ids.numel(),), depth, dtype=torch.long, device=device))
            scores.append(level_scores)
            ranks.append(level_ranks)
            level_sizes.append(level_ids.numel())
            grown = depth
            if depth == depths:
                break
            width = min(k, level_ids.numel())
            expand = level_scores.topk(width).indices  # the level's best nodes, [w]
            out, child_states = draft.head_step(states[expand], draft.draft_to_target_ids(level_ids[expand]))
            logprobs = torch.log_softmax(draft.head_logits(out).float(), dim=-1)  # [w, V_draft]
            child_scores, child_ids = logprobs.topk(k, dim=-1)  # [w, k]
            level_scores = (child_scores + level_scores[expand, None]).flatten()
            level_ids = child_ids.flatten()
            level_parents = (offset + expand)[:, None].expand(-1, k).flatten()
            level_ranks = torch.arange(k, device=device).repeat(width)
            states = child_states.repeat_interleave(k, dim=0)
            offset += tokens[-1].numel()
        num_drafted = offset - 1 + tokens[-1].numel()
    tokens, parents, dep = torch.cat(tokens), torch.cat(parents), torch.cat(dep)
    scores, ranks = torch.cat(scores), torch.cat(ranks)
    n_pool = 1 + num_drafted
    # ancestors by gathers, level by level (parents precede children): row i = row parent(i) | {i}
    # uint8, not bool: torch 2.13's inductor fails to generate C++ for the fused bool `eye | gather` on a CPU
    # (VecMask<int> against VecMask<float>); tests/test_static_step.py::test_the_drafting_step_compiles_with_inductor
    anc = torch.eye(n_pool, dtype=torch.uint8, device=device)
    start = 1
    for size in level_sizes:
        anc[start : start + size] |= anc[parents[start : start + size]]
        start += size
    anc = anc.bool()
    drafted = torch.ones(n_pool, dtype=torch.bool, device=device)
    drafted[0] = False
    cand = Candidates(tokens, parents, dep, scores, ranks, anc, drafted, on_lookup=torch.zeros_like(drafted),
                      dead=torch.zeros_like(drafted), num_drafted=num_drafted, num_lookup=0, max_rank=max(k - 1, 0),
                      depths_grown=grown)
    if isinstance(lookup, torch.Tensor):
        return _with_lookup(cand, lookup, lookup_length) if lookup.numel() else cand
    return _with_lookup(cand, upload(torch.tensor(lookup, dtype=torch.long), device), None) if lookup else cand


def _with_lookup(cand: Candidates, chain: torch.Tensor, chain_length: torch.Tensor | None) -> Candidates:
    """`cand` plus the lookup chain [L]: node j (depth j + 1) hangs from the deepest pool node on the chain's
    prefix when j is that node's depth, else from chain node j - 1; the chain nodes above it are dead, and
    so are those at or beyond `chain_length` (padding)."""
    device = cand.tokens.device
    n_pool, length = cand.size, chain.numel()
    valid = chain_length if chain_length is not None else length  # [1] tensor or int
    j = torch.arange(length, device=device)
    # a pool node matches when its token is the chain's token at its depth, and so do all its ancestors
    depth_index = (cand.depths - 1).clamp(0, length - 1)
    matches = (cand.tokens == chain[depth_index]) & (cand.depths <= valid)
    matches[0] = True
    on_prefix = ~(cand.ancestors & ~matches[None]).any(1)  # [n_pool]
    # (one-element index tensors throughout: indexing with a 0-d tensor would read it on the host)
    hang = torch.argmax(cand.depths * on_prefix).reshape(1)  # the deepest matching node (0: the root)
    hang_depth = cand.depths[hang]  # [1]
    alive = (j >= hang_depth) & (j < valid)  # [L]
    chain_index = n_pool + j
    chain_parents = torch.where(j == hang_depth, hang, chain_index - 1)
    # ancestors: the hanging node's, then the live chain nodes up to j
    pool_part = cand.ancestors[hang].expand(length, -1)  # [L, n_pool]
    chain_part = alive[None, :] & (j[None, :] <= j[:, None])  # [L, L]
    n = n_pool + length
    anc = torch.zeros(n, n, dtype=torch.bool, device=device)
    anc[:n_pool, :n_pool] = cand.ancestors
    anc[n_pool:, :n_pool] = pool_part
    anc[n_pool:, n_pool:] = chain_part | torch.eye(length, dtype=torch.bool, device=device)
    on_lookup = torch.cat([cand.ancestors[hang][0], alive])
    on_lookup[0] = False
    return Candidates(
        tokens=torch.cat([cand.tokens, chain]),
        parents=torch.cat([cand.parents, chain_parents]),
        depths=torch.cat([cand.depths, j + 1]),
        scores=torch.cat([cand.scores, torch.full((length,), float("-inf"), device=device)]),
        ranks=torch.cat([cand.ranks, torch.where(j == hang_depth, cand.max_rank + 1, 0)]),
        ancestors=anc,
        drafted=torch.cat([cand.drafted, torch.zeros(length, dtype=torch.bool, device=device)]),
        on_lookup=on_lookup,
        dead=torch.cat([cand.dead, ~alive]),
        num_drafted=cand.num_drafted, num_lookup=length, max_rank=cand.max_rank + 1, depths_grown=cand.depths_grown,
    )


# --------------------------------------------------------------------------- the sizer's statistics on the device


class DeviceAcceptance:
    """The sizer's per-depth acceptance counts, kept on the device across calls (`AcceptanceModel.device_counts`).

    counts [2, D + 1]: per depth (index = depth), the summed path probabilities of verified drafted nodes and
    how many of them were accepted. The lookup counts stay on the host (each step's transfer carries them)."""

    PRIOR = 2.0

    def __init__(self, sizer: TreeSizer, max_depth: int, device: torch.device) -> None:
        model = sizer.model
        counts = model.device_counts
        if counts is None or counts.device != device or counts.shape[1] != max_depth + 1:
            model.pull_device_counts()
            pad = lambda values: [0.0] + list(values[:max_depth]) + [0.0] * (max_depth - len(values[:max_depth]))
            counts = torch.tensor([pad(model.predicted), pad(model.accepted)], dtype=torch.float32).to(device)
            model.device_counts = counts
        self.counts, self.max_depth = counts, max_depth

    def corrections(self) -> torch.Tensor:
        """[D + 1] accepted / predicted per depth from a prior of 1 (as `AcceptanceModel.correction`)."""
        predicted, accepted = self.counts[0], self.counts[1]
        return ((accepted + self.PRIOR) / (predicted + self.PRIOR)).clamp(0.05, 3.0)


def node_values(cand: Candidates, acceptance: DeviceAcceptance | None, lookup_rate: float) -> torch.Tensor:
    """[n] the order in which nodes are kept (higher first; ties: shallower first). Root: +inf; dead: -inf.

    Fixed tree (`acceptance` None): the lookup path, then the draft scores. `"auto"`: the predicted
    acceptance probabilities of `TreeSizer.node_probabilities`, capped by every ancestor's."""
    if acceptance is None:
        values = torch.where(cand.on_lookup, torch.inf, cand.scores)
    else:
        corrections = acceptance.corrections()[cand.depths.clamp(max=acceptance.max_depth)]
        probs = torch.where(cand.drafted, (corrections * cand.scores.exp()).clamp(max=1.0), 0.0)
        probs = torch.where(cand.on_lookup, torch.maximum(probs, lookup_rate ** cand.depths.float()), probs)
        probs[0] = torch.inf
        # capped by every ancestor's value, so that the best-first prefix is always a tree
        values = torch.where(cand.ancestors, probs[None], torch.inf).amin(1)
    values = torch.where(cand.dead, -torch.inf, values)  # after every live node, whatever its score
    values[0] = torch.inf
    return values


def best_first(values: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """[n] node indices by value descending, shallower first on ties (the root first)."""
    by_depth = torch.sort(depths, stable=True).indices
    return by_depth[torch.sort(values[by_depth], descending=True, stable=True).indices]


def dfs_keys(cand: Candidates) -> torch.Tensor:
    """[n] int64 keys whose order is the depth-first (pre-order) order, first children first."""
    base = cand.max_rank + 2
    depth = max(cand.max_depth, 1)
    if depth * math.log2(base) > 62:  # too deep to encode: breadth-first (still parents before children)
        return cand.depths * (cand.size + 1) + torch.arange(cand.size, device=cand.depths.device)
    powers = base ** (depth - cand.depths).clamp(min=0)
    weights = torch.where(cand.depths > 0, (cand.ranks + 1) * powers, 0)  # [n]
    return (cand.ancestors.long() * weights[None]).sum(1)


# --------------------------------------------------------------------------- the loop


@dataclass
class VerifiedTree:
    """The verified tree of one step, on the device, in verification order (q = 1 + kept nodes)."""

    index: torch.Tensor  # [q] candidate index of each verified token (root first)
    tokens: torch.Tensor  # [q]
    depths: torch.Tensor  # [q]
    ancestors: torch.Tensor  # [q, q]
    parents: torch.Tensor  # [q] verify index of each token's parent (root: 0)

    @property
    def q(self) -> int:
        return self.index.numel()


def verified_tree(cand: Candidates, kept: torch.Tensor) -> VerifiedTree:
    """The verified tree from the candidates `kept` ([b] indices, parents before children, root excluded)."""
    index = torch.cat([torch.zeros(1, dtype=torch.long, device=kept.device), kept])
    position = torch.zeros(cand.size, dtype=torch.long, device=kept.device)
    position[index] = torch.arange(index.numel(), device=kept.device)
    return VerifiedTree(index=index, tokens=cand.tokens[index], depths=cand.depths[index],
                 ancestors=cand.ancestors[index][:, index], parents=position[cand.parents[index]])


@dataclass
class Walk:
    """The accepted path of one verified step, found on the device.

    packet [5 + 2q]: accepted draft tokens a, the bonus token, accepted nodes that were not first children,
    lookup-only nodes reached and accepted, then the verified tokens and verify indices ordered path
    first (root, the a accepted nodes, then the rest): what the host reads. bonus [1] the target's token
    after the path; on_path [q] bool; path_index [q] verify indices, path first."""

    packet: torch.Tensor
    bonus: torch.Tensor
    on_path: torch.Tensor
    path_index: torch.Tensor
    accepted: torch.Tensor  # [1]


def walk_on_device(logits: torch.Tensor, step: VerifiedTree, cand: Candidates) -> Walk:
    """The deepest verified node whose every node on the path equals the target's argmax at its parent
    (`logits` [q, V] of the verification pass): the path the host walk follows, without host reads."""
    argmax = logits.argmax(-1).to(step.tokens.device)  # [q] (the head may sit on another device)
    ok = (step.tokens == argmax[step.parents]) & ~cand.dead[step.index]  # a dead (padding) node is never accepted
    ok[0] = True
    best = torch.argmax(step.depths * ~(step.ancestors & ~ok[None]).any(1)).reshape(1)  # [1]
    on_path = step.ancestors[best][0]  # [q]
    path_index = torch.sort((~on_path).to(torch.uint8), stable=True).indices  # the path first, in order
    switches = ((cand.ranks[step.index] > 0) & on_path).sum()
    lookup_only = cand.on_lookup[step.index] & ~cand.drafted[step.index]
    reached = lookup_only & on_path[step.parents]  # lookup tokens whose parent was accepted
    packet = torch.cat([step.depths[best], argmax[best], torch.stack([switches, reached.sum(), (reached & on_path).sum()]),
                        step.tokens[path_index], path_index])
    return Walk(packet=packet, bonus=argmax[best], on_path=on_path, path_index=path_index, accepted=step.depths[best])


def run_device_greedy(model, draft: Clover2ForDrafting, input_ids: torch.Tensor, cache, stopping_criteria,
                      generation_config, *, settings, sizer: TreeSizer | None, options, capture, verify_kernels, stats,
                      streamer, static=None, static_verify=None) -> torch.Tensor:
    """The greedy tree loop of this module (after `clover2_tree_decode`'s checks and set-up): the new sequence.

    `settings`: the call's `TreeSettings`; `sizer`: the `TreeSizer` when sizing per step; `verify_kernels`: the
    context managers the tree passes run under; `static`: a `static_step.StaticDrafting` for fixed-shape
    drafting steps (with a fixed tree); `static_verify`: a `static_step.StaticVerification` whose cache is
    `cache`, for fixed-shape verification passes. Host reads per call: the prompt and the prefill's token, then per
    step the choice (step 2 of the module docstring; not for a fixed tree, nor when the sizer skips
    drafting) and the walk's result."""
    device, draft_device = input_ids.device, draft.fc1.weight.device
    max_length, eos = _host_stopping(stopping_criteria, generation_config)
    context = input_ids[0].tolist()  # the host's copy of the sequence (lookup, stopping)
    num_depths = draft.config.num_draft_depths
    acceptance = DeviceAcceptance(sizer, num_depths, device) if sizer is not None else None
    verify_table = None
    if sizer is not None:  # pass costs for q = 1 .. the largest candidate set
        q_limit = 2 + options.tree_lookup_tokens + settings.top_k + (settings.top_k ** 2) * num_depths
        verify_table = upload(torch.tensor([sizer.costs.verify_time(q) for q in range(1, q_limit + 1)]), device)
    draft_cache = draft.new_cache()

    # prefill: the target reads the prompt and picks the first new token itself
    out = model(input_ids=input_ids, position_ids=torch.arange(input_ids.shape[1], device=device)[None],
                use_cache=True, **{CACHE_KWARG: cache}, logits_to_keep=1)
    stats.target_forwards += 1
    pending_hidden = capture.hidden  # [1, n, H] pre-norm states whose next token is known
    token = out.logits[0, -1].argmax().reshape(1).to(device)  # [1] on the device of the inputs
    sequence = torch.cat([input_ids[0], token])  # [length] on the device
    host_token = token.tolist()[0]
    if static is not None:
        static.begin(pending_hidden.to(draft_device), sequence[1:][None].to(draft_device))

    def emit(tok: int) -> bool:
        context.append(tok)
        stats.new_tokens += 1
        if streamer is not None:
            streamer.put(torch.tensor([tok]))
        return tok in eos or len(context) >= max_length

    while not emit(host_token):
        t_step = time.perf_counter()  # the step: drafting, choice, verification and walk (as the host walk times it)
        # ---- draft: feed verified positions to the augmenting block, grow the candidates, choose the tree
        drafting = sizer is None or sizer.should_draft()
        room = max_length - len(context)
        lookup = (lookup_continuation(context, min(options.tree_lookup_tokens, room), options.tree_lookup_ngram)
                  if options.tree_lookup_tokens and room > 0 else [])
        if static is None and not drafting and not lookup:  # nothing to verify but the root: a plain step
            token, host_token, hidden = _plain_step(model, cache, token, capture, sizer, stats, t_step)
            sequence = torch.cat([sequence, token])
            pending_hidden = hidden if pending_hidden is None else torch.cat([pending_hidden, hidden], dim=1)
            continue
        t_augmented = t_step  # when the drafter's augmenting-block update ended (finish_step does not charge it)
        if static is not None:
            step, cand = static.draft_step(token.to(draft_device), lookup)
        else:
            root_state = None
            if drafting:
                next_ids = sequence[-pending_hidden.shape[1] :]  # the token after each pending position
                augmented = draft.augment(pending_hidden.to(draft_device), next_ids[None].to(draft_device),
                                          cache=draft_cache)  # [1, n, H]
                pending_hidden = None
                root_state = augmented[0, -1]
                t_augmented = time.perf_counter()  # (on a GPU the update's kernels may still be queued here)
            step, cand = _choose_tree(draft, token.to(draft_device), root_state, lookup, settings, sizer, acceptance,
                                      verify_table, drafting, device)
        if static is not None and draft_device != device:
            cand = _moved(cand, device)
            step = VerifiedTree(*(t.to(device) for t in (step.index, step.tokens, step.depths, step.ancestors,
                                                        step.parents)))
        t_chosen = time.perf_counter()
        stats.draft_time_s += t_chosen - t_step

        # ---- verify
        past_length = static_verify.past_length() if static_verify is not None else cache.get_seq_length()
        if static_verify is not None:  # Q tokens over the whole static cache, under an explicit mask
            with verify_kernels[0], verify_kernels[1]:
                out = static_verify.forward(input_ids=step.tokens[None],
                                            attention_mask=static_verify.mask(step, past_length, model.dtype),
                                            position_ids=(past_length + step.depths)[None], use_cache=True,
                                            **{CACHE_KWARG: cache})
        elif step.q == 1:  # a plain decoding step, run as plain decoding runs it
            stats.plain_steps += 1
            out = model(input_ids=step.tokens[None], position_ids=(past_length + step.depths)[None],
                        use_cache=True, **{CACHE_KWARG: cache})
        else:
            with verify_kernels[0], verify_kernels[1]:
                out = model(input_ids=step.tokens[None],
                            attention_mask=target_mask_kwargs(model, cache, step.ancestors, step.depths, past_length,
                                                              model.dtype),
                            position_ids=(past_length + step.depths)[None], use_cache=True, **{CACHE_KWARG: cache})
        stats.target_forwards += 1
        stats.tree_sizes.append(step.q - 1)
        tree_hidden = capture.hidden  # [1, q, H]

        walk = walk_on_device(out.logits[0], step, cand)
        packet = walk.packet
        if acceptance is not None:
            _learn(acceptance, cand, step, walk.on_path)
        head = packet.tolist()  # the step's transfer to the host
        t_read = time.perf_counter()
        stats.verify_time_s += t_read - t_chosen
        accepted, host_bonus, switched, lookup_reached, lookup_accepted = head[:5]
        path = head[5 + step.q : 5 + step.q + accepted + 1]
        stats.branch_switches += switched

        emitted, finished = 0, False
        for tok in head[6 : 6 + accepted]:  # the path's tokens after the root
            emitted += 1
            if emit(tok):
                finished = True
                stats.stopped_in_path += 1
                break
        sequence = torch.cat([sequence, packet[6 : 6 + emitted]])
        stats.accepted_depths.append(emitted)
        stats.tokens_per_step.append(emitted + (0 if finished else 1))
        if sizer is not None:
            sizer.model.lookup_reached += lookup_reached
            sizer.model.lookup_accepted += lookup_accepted
            sizer.observe_verify(step.q, t_read - t_chosen)
            sizer.finish_step(drafting, emitted + 1, t_chosen - t_augmented, step.q)
        path_device = packet[5 + step.q : 5 + step.q + accepted + 1]
        if static_verify is not None:
            static_verify.compact(past_length, walk.path_index, walk.accepted)
        else:
            compact_cache(cache, step.q, path, path_device)
        if finished:
            break
        token = walk.bonus
        sequence = torch.cat([sequence, token])
        host_token = host_bonus
        if static is not None:
            static.accept(tree_hidden.to(draft_device), step, walk)
            continue
        accepted_hidden = tree_hidden[:, path_device.to(tree_hidden.device)]  # [1, accepted + 1, H]
        pending_hidden = (accepted_hidden if pending_hidden is None
                          else torch.cat([pending_hidden, accepted_hidden], dim=1))
    return sequence[None]


def _plain_step(model, cache, token: torch.Tensor, capture, sizer: TreeSizer, stats, t_step: float):
    """A plain decoding step where the sizer skips drafting and no lookup matched: the target's pass over the
    root token [1] alone, without building candidates. Returns (its argmax [1], the same on the host (the
    step's one host read), the root's hidden state [1, 1, H])."""
    position = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=token.device)
    out = model(input_ids=token[None], position_ids=position, use_cache=True, **{CACHE_KWARG: cache})
    bonus = out.logits[0, -1].argmax().reshape(1).to(token.device)
    host_bonus = bonus.tolist()[0]
    t_read = time.perf_counter()
    stats.verify_time_s += t_read - t_step
    stats.target_forwards += 1
    stats.plain_steps += 1
    stats.tree_sizes.append(0)
    stats.accepted_depths.append(0)
    stats.tokens_per_step.append(1)
    sizer.record_choice(0, False, 0)
    sizer.observe_verify(1, t_read - t_step)
    return bonus, host_bonus, capture.hidden


def _moved(cand: Candidates, device: torch.device) -> Candidates:
    """`cand` with its tensors on `device` (the target's, when the drafter sits on another device)."""
    if cand.tokens.device == device:
        return cand
    fields = ("tokens", "parents", "depths", "scores", "ranks", "ancestors", "drafted", "on_lookup", "dead")
    return dataclasses.replace(cand, **{name: getattr(cand, name).to(device) for name in fields})


def _choose_tree(draft: Clover2ForDrafting, root_token: torch.Tensor, root_state: torch.Tensor | None,
                 lookup: list[int], settings, sizer: TreeSizer | None, acceptance: DeviceAcceptance | None,
                 verify_table: torch.Tensor | None, drafting: bool,
                 device: torch.device) -> tuple[VerifiedTree, Candidates]:
    """Steps 1-2 of the module docstring: the candidates (moved to the target's `device`) and the verified
    tree chosen from them."""
    num_depths = draft.config.num_draft_depths
    depths = min(num_depths, max(settings.budget, 1), sizer.depth_cap if sizer is not None else num_depths)
    cand = _moved(draft_candidates(draft, root_token, root_state, settings.top_k, depths, lookup), device)
    values = node_values(cand, acceptance, sizer.lookup_rate if sizer is not None else 0.0)
    order = best_first(values, cand.depths)  # [n], root first
    if sizer is None:  # a fixed tree: the budget's best drafted nodes, plus the lookup tokens
        # (where lookup tokens repeat drafted nodes, the next-best drafted nodes take their places)
        b = min(settings.budget, cand.num_drafted - (cand.depths_grown if lookup else 0)) + len(lookup)
    elif drafting:
        b, depth_cap = _choose(cand, values, order, sizer, verify_table, min(settings.budget + len(lookup),
                                                                             cand.size - 1))
        sizer.record_choice(b, drafting, depth_cap)
    else:  # only the lookup chain: its values rho^d are known on the host
        b = _choose_chain(sizer, len(lookup))
        sizer.record_choice(b, drafting, 0)
    kept = order[1 : b + 1]
    kept = kept[torch.sort(dfs_keys(cand)[kept]).indices]  # depth-first verification order
    return verified_tree(cand, kept), cand


def _choose(cand: Candidates, values: torch.Tensor, order: torch.Tensor, sizer: TreeSizer,
            verify_table: torch.Tensor, cap: int) -> tuple[int, int]:
    """(nodes to verify, next depth cap): the best-first prefix maximising predicted tokens per second of
    verification, as `TreeSizer.choose` (at most `cap` nodes); one host read."""
    values = values[order[1:]]  # [n - 1] best first
    gain = 1.0 + torch.cumsum(values.clamp(min=0.0), 0)
    plain_scale, tree_scale = sizer.time_scales()
    rates = gain / (verify_table[1 : values.numel() + 1] * tree_scale)  # b nodes: a pass over q = b + 1
    rates[cap:] = -torch.inf
    rates = torch.cat([sizer.margin / (verify_table[:1] * plain_scale), rates])  # b = 0: a plain step
    b = torch.argmax(rates)  # the first best: a longer prefix must be strictly better
    kept = torch.zeros(cand.size, dtype=torch.bool, device=order.device)
    kept[order[1:]] = torch.arange(values.numel(), device=order.device) < b
    depth_cap = (cand.depths * (kept & cand.drafted)).max() + 1
    b_host, cap_host = torch.stack([b, depth_cap]).tolist()
    return b_host, cap_host


def _choose_chain(sizer: TreeSizer, length: int) -> int:
    """`_choose` for a step without drafting: the lookup chain's node d has value rho^d (on the host)."""
    return sizer.best_prefix([sizer.lookup_rate ** d for d in range(1, length + 1)])[0]


def _learn(acceptance: DeviceAcceptance, cand: Candidates, step: VerifiedTree, on_path: torch.Tensor) -> None:
    """Add one verified step's drafted nodes to the device counts (as `TreeSizer.update`)."""
    drafted = cand.drafted[step.index]  # [q]
    probs = torch.where(drafted, cand.scores[step.index].exp(), 0.0)
    depth = step.depths.clamp(max=acceptance.max_depth)
    acceptance.counts[0].index_add_(0, depth, probs)
    acceptance.counts[1].index_add_(0, depth, (on_path & drafted).float())
