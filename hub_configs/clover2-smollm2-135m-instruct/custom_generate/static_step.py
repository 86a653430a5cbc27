"""The greedy drafting step with the same tensor shapes at every step, so it can be captured as a graph.

`device_step` already builds, sizes and walks the tree without host reads, but its shapes change from
step to step: the augmenting block reads as many new positions as the last step accepted, its KV cache
grows, the lookup chain has the length of the latest match, and the sizer verifies a different number
of nodes. A captured graph (CUDA graphs, `torch.compile(mode="reduce-overhead")`) replays one shape.
With `static_shapes=True` (a decoding option) the drafting step is instead:

* the augmenting block over A = 1 + (draft depths + lookup tokens) positions every step, the accepted
  ones first and garbage after them, written into a preallocated KV buffer (`DraftKV`) at positions
  start .. start + A - 1 under an explicit causal mask; the next step starts where the accepted ones
  end, so the garbage is overwritten before anything may attend to it;
* every draft depth grown, the lookup chain padded to `tree_lookup_tokens` (padding nodes are dead);
* a fixed tree of min(budget, P - D - L) + L nodes verified (P pool nodes, D depths, L lookup tokens), so
  the verification pass has a constant width too.

`static_draft_step` is that step, from the padded inputs to the verified tree: no host reads, no
data-dependent Python control flow (tests/test_static_step.py checks that its (op, shape) sequence does not
change over 20 steps of different acceptance lengths, and that `torch._dynamo.explain` finds no graph
break). For full-attention targets (transformers >= 5.24) `StaticVerification` runs the target's passes
on a `StaticCache` too, under an explicit mask, with the accepted path compacted in place; other targets
verify on their `DynamicCache` (constant width, growing context).

Graph capture follows plain decoding's rule (`compiled_calls`): when plain `generate()` would compile its
decoding steps on this static cache (on CUDA / XPU and the other devices transformers lists, or with a
`compile_config` whose `_compile_all_devices` is set; never with `disable_compile`), the verification pass runs
as `target.get_compiled_call(generation_config.compile_config)` and every drafting step after the first as
`static_draft_step` under `torch.compile(**compile_config.to_dict())` (`CompileConfig()` when the call has
none: inductor, "reduce-overhead", i.e. CUDA graphs; on TPU / Neuron, where transformers picks the device's own
backend for the target, pass `compile_config=` to give the drafter the same). The prefill and the first
drafting step (over the prompt) stay eager, as plain decoding's prefill does. So `clover2_static_shapes=True`
against `cache_implementation="static"` compares a graph-captured Clover-2 step with a graph-captured plain
step. Targets that verify on their `DynamicCache` (sliding-window layers, transformers < 5.24) compile
nothing.
"""

from __future__ import annotations

import torch
from transformers import CompileConfig

from .modeling_clover2 import CACHE_KWARG, Clover2ForDrafting
from .device_step import (
    VerifiedTree,
    best_first,
    dfs_keys,
    draft_candidates,
    node_values,
    upload,
    verified_tree,
)

__all__ = ["DraftKV", "StaticDrafting", "StaticVerification", "augment_static", "compiled_calls", "static_draft_step",
           "static_node_count", "static_verification_supported"]


class DraftKV:
    """A preallocated KV buffer for the augmenting block, written at explicit positions.

    keys / values [layers, 1, kv_heads, max_length, head_dim]. Before each pass, `positions` ([A] device
    tensor) says where the pass's A entries go. It offers the one method transformers' attention layers
    call on a cache, `update(key_states, value_states, layer_idx, ...)` -> the layer's whole buffer (the
    contract of `Cache.update`; tests/test_static_step.py's identity tests fail if the layers stop
    calling it or need more of the cache)."""

    def __init__(self, draft: Clover2ForDrafting, max_length: int) -> None:
        config = draft._augmenting_config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        shape = (draft.config.num_augmenting_layers, 1, kv_heads, max_length, head_dim)
        weight = draft.fc1.weight
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        self.positions: torch.Tensor | None = None
        self.max_length = max_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.positions, key_states.to(self.keys.dtype))
        self.values[layer_idx].index_copy_(2, self.positions, value_states.to(self.values.dtype))
        return self.keys[layer_idx], self.values[layer_idx]


def augment_static(draft: Clover2ForDrafting, kv: DraftKV, hidden: torch.Tensor, next_ids: torch.Tensor,
                   start: torch.Tensor) -> torch.Tensor:
    """`Clover2ForDrafting.augment` over A positions at start .. start + A - 1 ([1] device tensor) of `kv`.

    hidden [1, A, H] pre-norm target states; next_ids [1, A] the token after each. Returns [1, A, H] c_t."""
    draft._augmenting_config._attn_implementation = draft.config._attn_implementation  # as `augment` does
    width = hidden.shape[1]
    states = draft.input_cell(draft.fuse_features(hidden), draft.embed(next_ids))
    positions = start + torch.arange(width, device=start.device)  # [A]
    kv.positions = positions
    slots = torch.arange(kv.max_length, device=start.device)
    mask = torch.zeros(width, kv.max_length, dtype=states.dtype, device=states.device)
    mask = mask.masked_fill(slots[None, :] > positions[:, None], torch.finfo(states.dtype).min)[None, None]
    position_embeddings = draft.rotary_emb(states, position_ids=positions[None])
    for layer in draft.augmenting_layers:
        states = layer(states, attention_mask=mask, position_ids=positions[None], use_cache=True,
                       **{CACHE_KWARG: kv}, position_embeddings=position_embeddings)
    return draft.augmenting_norm(states)


def static_node_count(draft: Clover2ForDrafting, top_k: int, budget: int, lookup_tokens: int) -> int:
    """Nodes every static step verifies: min(budget, P - D - L) + L, at most P, so never more than the live
    candidates (the P pool nodes are always live; the lookup chain may be all padding)."""
    depths = min(draft.config.num_draft_depths, budget)
    pool = top_k + (depths - 1) * top_k * top_k
    return min(max(min(budget, pool - depths - lookup_tokens), 0) + lookup_tokens, pool)


def static_draft_step(draft: Clover2ForDrafting, kv: DraftKV, hidden: torch.Tensor, next_ids: torch.Tensor,
                      start: torch.Tensor, last: torch.Tensor, root_token: torch.Tensor, chain: torch.Tensor,
                      chain_length: torch.Tensor, top_k: int, budget: int):
    """One drafting step with fixed shapes: (verified tree `VerifiedTree`, its `Candidates`).

    hidden [1, A, H] / next_ids [1, A]: the accepted positions first, then padding; start [1]: the KV
    position of the first; last [1]: the index of the last accepted one (its c_t is the root's state);
    root_token [1]; chain [L] lookup tokens, the first chain_length [1] of them real."""
    augmented = augment_static(draft, kv, hidden, next_ids, start)  # [1, A, H]
    root_state = augmented[0].index_select(0, last)[0]  # [H]
    depths = min(draft.config.num_draft_depths, budget)
    cand = draft_candidates(draft, root_token, root_state, top_k, depths, chain, chain_length)
    order = best_first(node_values(cand, None, 0.0), cand.depths)
    kept = order[1 : static_node_count(draft, top_k, budget, chain.numel()) + 1]
    kept = kept[torch.sort(dfs_keys(cand)[kept]).indices]  # depth-first verification order
    return verified_tree(cand, kept), cand




class StaticDrafting:
    """The drafter's side of a `static_shapes` call: its KV buffer and the padded inputs of the next step.

    Used by `device_step.run_device_greedy`: `begin` with the prompt's states after the prefill, then per
    step `draft_step` (the verified tree) and, after the walk, `accept` (the next step's inputs, on the
    device)."""

    def __init__(self, draft: Clover2ForDrafting, top_k: int, budget: int, lookup_tokens: int,
                 max_length: int) -> None:
        self.draft, self.top_k, self.budget, self.lookup_tokens = draft, top_k, budget, lookup_tokens
        self.width = 1 + min(draft.config.num_draft_depths, budget) + lookup_tokens  # A
        self.kv = DraftKV(draft, max_length + max(self.width, 1))
        device = draft.fc1.weight.device
        self.start = torch.zeros(1, dtype=torch.long, device=device)
        self.hidden = self.next_ids = self.last = None
        self.step_fn = static_draft_step  # the steps after the first (`compiled_calls` may swap in a compiled one)

    def use_compiled(self, step_fn) -> None:
        """Run every drafting step after the first with `step_fn` (`static_draft_step` under `torch.compile`)."""
        # mutated in place by every step: fixed addresses, or inductor skips CUDA graphs for mutated inputs (the
        # StaticCache's own buffers are marked by transformers); only a GPU run shows it (gpu_step_check's rows)
        for buffer in (self.kv.keys, self.kv.values):
            torch._dynamo.mark_static_address(buffer)
        self.step_fn = step_fn

    @property
    def num_nodes(self) -> int:
        return static_node_count(self.draft, self.top_k, self.budget, self.lookup_tokens)

    def begin(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> None:
        """The prompt's positions (the first step reads them all: one step of another width)."""
        self.hidden, self.next_ids = hidden, next_ids
        self.last = torch.full((1,), hidden.shape[1] - 1, dtype=torch.long, device=self.start.device)

    def draft_step(self, root_token: torch.Tensor, lookup: list[int]):
        """(verified tree, candidates) of this step; `lookup` padded to `lookup_tokens` (pinned, non-blocking)."""
        chain = torch.zeros(self.lookup_tokens, dtype=torch.long)
        chain[: len(lookup)] = torch.tensor(lookup, dtype=torch.long)
        length = torch.tensor([len(lookup)], dtype=torch.long)
        chain, length = upload(chain, self.start.device), upload(length, self.start.device)
        # the first step reads the prompt (its own width): eager, like the prefill
        step_fn = self.step_fn if self.hidden.shape[1] == self.width else static_draft_step
        if self.step_fn is not static_draft_step:  # compiled: a new step, whose graph replays may overwrite the
            # last step's outputs (read by now). After this call cudagraph trees start a new generation only at such
            # marks, for the whole process; plain decoding drops its outputs every step, so it is unaffected.
            torch.compiler.cudagraph_mark_step_begin()
        return step_fn(self.draft, self.kv, self.hidden, self.next_ids, self.start, self.last, root_token,
                       chain, length, self.top_k, self.budget)

    def accept(self, tree_hidden: torch.Tensor, step: VerifiedTree, walk) -> None:
        """The next step's padded inputs: the accepted path's states and the token after each (device ops)."""
        device = self.start.device  # the drafter's (the verified tree may sit on the target's)
        index = walk.path_index.to(device)  # [q] path first
        if index.numel() < self.width:
            index = torch.cat([index, index.new_zeros(self.width - index.numel())])
        index = index[: self.width]
        tokens = step.tokens.to(device)[index]  # [A], the root's first
        after = torch.cat([tokens[1:], tokens[:1]])  # the token after each position (the wrap-around is padding)
        slot = torch.arange(self.width, device=index.device)
        accepted = walk.accepted.to(device)
        self.next_ids = torch.where(slot == accepted, walk.bonus.to(device), after)[None]
        self.hidden = tree_hidden.to(device)[:, index]
        self.start = self.start + self.last + 1
        self.last = accepted


def static_verification_supported(target) -> bool:
    """Whether the target can verify on a `StaticCache` here: transformers' static layers that keep their
    length on the device (`StaticLayer.cumulative_length`, transformers >= 5.24, where `cache` is the
    cache keyword) and full attention in every layer (sliding-window and chunked layers are rolling buffers
    in static form; linear-attention layers hold no keys)."""
    config = target.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        full = all(t == "full_attention" for t in layer_types)
    else:
        full = getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None
    return CACHE_KWARG == "cache" and full and not getattr(config, "is_encoder_decoder", False)


class StaticVerification:
    """The target's side of a `static_shapes` call: verification passes of Q tokens over a `StaticCache`.

    The cache holds max_length + Q positions; a pass writes its Q tree tokens after the verified context
    (transformers' `StaticLayer.update` at its `cumulative_length`), attends under an explicit
    [1, 1, Q, max_length + Q] mask (context, then the tree's ancestors), and `compact` moves the accepted
    path to the front of those Q slots and shortens the layers' lengths, all on the device. Relies on
    `StaticLayer.keys` / `.values` / `.cumulative_length` (transformers >= 5.24): caught by
    tests/test_static_step.py's identity tests."""

    def __init__(self, target, max_length: int, num_tokens: int) -> None:
        from transformers.cache_utils import StaticCache

        self.cache = StaticCache(config=target.config, max_cache_len=max_length + num_tokens)
        self.length, self.q = max_length + num_tokens, num_tokens
        self.forward = target  # the verification pass (`compiled_calls` may swap in the compiled call)

    def past_length(self) -> torch.Tensor:
        """[1] verified positions in the cache (device; a copy: the layers' own length grows in place)."""
        return self.cache.layers[0].cumulative_length.reshape(1).clone()

    def mask(self, step: VerifiedTree, past: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, Q, max_length + Q] additive mask: the verified context, then each token's ancestors."""
        slots = torch.arange(self.length, device=past.device)
        offset = slots - past  # a slot's index in this pass's tree (valid in 0 .. Q - 1)
        in_tree = (offset >= 0) & (offset < step.q)
        tree = step.ancestors[:, offset.clamp(0, step.q - 1)] & in_tree[None]  # [Q, S]
        allowed = (slots < past)[None] | tree
        mask = torch.zeros(step.q, self.length, dtype=dtype, device=past.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    def compact(self, past: torch.Tensor, path_index: torch.Tensor, accepted: torch.Tensor) -> None:
        """Keep the accepted path: slots past + path_index ([Q], path first) move to past + 0 .. Q - 1, and
        each layer's length becomes past + accepted + 1 ([1] device tensors; fixed shapes)."""
        src = past + path_index
        dst = past + torch.arange(path_index.numel(), device=past.device)
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))
            layer.values.index_copy_(2, dst, layer.values.index_select(2, src))
            layer.cumulative_length.sub_((self.q - 1 - accepted).reshape(layer.cumulative_length.shape))


_COMPILED_STEPS: dict[tuple, object] = {}  # torch.compile(static_draft_step) per compile setting, like get_compiled_call


def compiled_calls(target, static: StaticDrafting, verification: StaticVerification, generation_config) -> bool:
    """Capture the call's drafting steps and verification passes as graphs when plain decoding would.

    Plain `generate()` compiles its decoding steps when `target._valid_auto_compile_criteria` holds for its
    cache; the same test on this call's `StaticCache` decides here, and the same `compile_config` is used
    (`get_compiled_call`'s for the target; `torch.compile(static_draft_step, **config.to_dict())` for the
    drafter, `CompileConfig()` when the call has none). Returns whether the two were handed to the compiler
    (dynamo may still run a call eagerly, e.g. past its recompile limit).

    Relies on the private `GenerationMixin._valid_auto_compile_criteria(model_kwargs, generation_config)`
    (reading `model_kwargs["cache"]`), the public `get_compiled_call`, and dynamo running the target's
    forward hooks inside the compiled pass onto the hook object of the current call (`PreNormCapture` is
    new per call); caught by tests/test_static_step.py::test_compiled_static_decoding_captures_both_steps_and_stays_exact
    (four calls, no recompile, exact output with outputs overwritten at each replay) and its twin that checks
    nothing compiles on a CPU without a compile config.
    """
    if not target._valid_auto_compile_criteria({CACHE_KWARG: verification.cache}, generation_config):
        return False
    config = generation_config.compile_config or CompileConfig()
    options = config.to_dict()
    key = tuple((name, value if callable(value) else repr(value)) for name, value in sorted(options.items()))
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = torch.compile(static_draft_step, **options)
    verification.forward = target.get_compiled_call(generation_config.compile_config)
    static.use_compiled(_COMPILED_STEPS[key])
    return True
