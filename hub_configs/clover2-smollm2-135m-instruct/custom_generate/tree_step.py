"""Clover-2 tree decoding: the loop `generate(assistant_model=<Clover2ForDrafting>)` runs in tree mode.

Each step the drafter grows a dynamic token tree (`clover2_hf.tree.build_tree`), the target verifies
all of it in ONE forward pass with an additive 4D tree mask and positions = context length + depth,
the longest accepted path plus the target's own next ("bonus") token is emitted, the target KV cache is
compacted to the accepted path, and the accepted tokens' pre-norm hidden states are fed into the
drafter's augmenting-block cache. Our addition (not in the paper): when the context's last
`tree_lookup_ngram`..2 tokens occurred earlier, the tokens that followed them (`lookup_continuation`,
up to `tree_lookup_tokens`) are merged into the tree as one more path (`clover2_hf.tree.add_path`); it
is verified like any drafted path, so it changes only how many tokens a step may accept, never which.
How much of the tree is verified is decided per step by `TreeSizer` when the tree settings are "auto"
(`cost_model`). The loop is a `generate(custom_generate=...)` callable (routing.py hands it over).

Two walks run this method. Greedy calls with the default stopping criteria and no logits processor take
`device_step.run_device_greedy`: the tree built, sized and walked with tensor programs on the device,
two small host reads per step. Every other call (sampling, logits processors, custom stopping criteria,
returned scores, the static tree) takes `_host_walk` below, which reads the tree to the host and walks
it token by token with the processed logits. Both emit exactly plain decoding's tokens.

Acceptance, per emitted token, is exactly what plain decoding would do:
* greedy: follow the child whose token equals the target's (processed) argmax at each node;
* sampling: draw the target's token x ~ p (processed logits at the node, the same draw plain
  sampling makes) and follow the child with token x if there is one. This is multi-candidate
  speculative sampling (SpecInfer, Miao et al. 2024, Alg. 2 "multi-step speculative sampling")
  with deterministic (point-mass) proposals: for a candidate c with q = delta_c the acceptance
  probability min(1, p(c) / q(c)) is p(c) and the residual norm(max(p - q, 0)) is p with c removed,
  so the scheme picks candidate c_i with probability p(c_i) and otherwise samples from p restricted
  to the non-candidates: the emitted token is distributed exactly as p. Because top-k children are
  deterministic this is also the best possible acceptance for the given children.
* stopping criteria (max length, eos ids, user criteria) are checked after EVERY emitted token, so
  eos inside an accepted path or `max_new_tokens` landing mid-path stop exactly where plain
  decoding stops.

Relies on transformers' `custom_generate` callable contract (called with the prepared
`logits_processor`, `stopping_criteria`, `generation_config` and the model kwargs holding `cache`) and
on `DynamicCache` layers that `compact_cache` can cut (tests/test_decoding.py's identity tests over six
architectures fail if either changes).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .modeling_clover2 import CACHE_KWARG, Clover2ForDrafting
from .tree import (
    STATIC_TREE_PATHS,
    DraftTree,
    add_path,
    build_tree,
    compact_cache,
    lookup_continuation,
    root_only,
    select_nodes,
)
from .capture import PreNormCapture
from .cost_model import TreeSizer, auto_tree_settings, sync_device
from .cpu_kernels import CpuMaskedGqa, CpuVerifyLinears, target_mask_kwargs
from .device_step import device_greedy_supported, run_device_greedy
from .options import DecodingOptions, pop_decoding_options
from .static_step import (
    StaticDrafting,
    StaticVerification,
    compiled_calls,
    static_verification_supported,
)
from .stats import Clover2Stats

__all__ = ["check_generate_arguments", "check_supported", "prepare_call", "run_tree_decoding", "choose_token", "clover2_tree_decode", "depth0_logprobs", "grow_tree",
           "lookup_continuation"]


# --------------------------------------------------------------------------- shared helpers


def _draft_logprobs(draft: Clover2ForDrafting, head_states: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(draft.head_logits(head_states).float(), dim=-1)


def check_generate_arguments(arguments: dict) -> None:
    """Clear errors, before any work, for `generate()` arguments Clover-2 decoding does not support.

    `arguments`: the keyword arguments of `generate` (inputs / input_ids, num_beams, ...). The generation
    config transformers prepares later is checked again by the tree loop (`check_supported`).
    """
    inputs = arguments.get("inputs")
    if inputs is None:
        inputs = arguments.get("input_ids")
    if inputs is not None and inputs.dim() == 2 and inputs.shape[0] != 1:
        raise ValueError(f"Clover-2 decoding supports batch size 1 only, got a batch of {inputs.shape[0]}.")
    if inputs is not None and inputs.shape[-1] == 0:
        raise ValueError("Clover-2 decoding needs a non-empty prompt (input_ids has length 0).")
    for unsupported in ("num_beams", "num_return_sequences"):
        if (arguments.get(unsupported) or 1) != 1:
            raise ValueError(f"Clover-2 decoding does not support {unsupported} > 1.")


def prepare_call(draft: Clover2ForDrafting, arguments: dict) -> tuple[Clover2Stats, DecodingOptions]:
    """Take Clover-2's own keywords out of `generate()` arguments and check the rest: (stats, options).

    `arguments`: the keyword arguments of `generate`, changed in place (`clover2_stats=` and the option
    keywords removed). Shared by the package's generate hook and the Hub entry point.
    """
    stats = arguments.pop("clover2_stats", None) or Clover2Stats()
    options = DecodingOptions.resolve(draft.config, pop_decoding_options(arguments))
    check_generate_arguments(arguments)
    return stats, options


def run_tree_decoding(stock_generate, target, draft: Clover2ForDrafting, arguments: dict, stats: Clover2Stats,
                      options: DecodingOptions):
    """Stock `generate` (`stock_generate`) with `clover2_tree_decode` as its decoding loop.

    Transformers prepares the generation config, logits processors, stopping criteria and cache exactly as for
    plain decoding and calls the loop with them (its `custom_generate` callable contract)."""
    return stock_generate(
        target,
        custom_generate=clover2_tree_decode,
        clover2_draft=draft,
        clover2_streamer=arguments.get("streamer"),
        clover2_stats=stats,
        clover2_options=options,
        **arguments,
    )


def check_supported(target, input_ids: torch.Tensor, generation_config, model_kwargs: dict) -> None:
    """Clear errors for what Clover-2 decoding does not do (raised before any decoding work)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"Clover-2 decoding supports batch size 1 only, got a batch of {input_ids.shape[0]}.")
    if input_ids.shape[1] == 0:
        raise ValueError("Clover-2 decoding needs a non-empty prompt (input_ids has length 0).")
    if getattr(target.config, "is_encoder_decoder", False):
        raise ValueError("Clover-2 decoding supports decoder-only targets only.")
    gc = generation_config
    if gc.num_beams != 1 or gc.num_return_sequences != 1:
        raise ValueError("Clover-2 decoding does not support beam search or num_return_sequences > 1.")
    if gc.output_attentions or gc.output_hidden_states:
        raise ValueError("Clover-2 decoding does not return attentions or hidden states.")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("Clover-2 decoding does not support padded prompts (attention_mask with zeros).")


# --------------------------------------------------------------------------- tree mode


def _expand_fn(draft: Clover2ForDrafting):
    def expand(states: torch.Tensor, draft_ids: torch.Tensor):
        out, new_states = draft.head_step(states, draft.draft_to_target_ids(draft_ids))
        return _draft_logprobs(draft, out), new_states

    return expand


def grow_tree(draft: Clover2ForDrafting, root_token: int, root_state: torch.Tensor, top_k: int, budget: int,
               static_paths=None, first_logprobs: torch.Tensor | None = None,
               max_depth: int | None = None) -> DraftTree:
    """Head depth 0 + `build_tree` from an augmented state c_t [H]: the tree of one drafting phase.

    `first_logprobs` [V_draft]: head depth 0's log-probabilities when the caller computed them already;
    `max_depth`: grow at most this many depths (default: all of the drafter's)."""
    if first_logprobs is None:
        first_logprobs = depth0_logprobs(draft, root_state)
    return build_tree(
        root_token=root_token,
        first_logprobs=first_logprobs,
        expand=_expand_fn(draft),
        root_state=root_state,
        max_depth=min(max_depth or draft.config.num_draft_depths, draft.config.num_draft_depths),
        top_k=top_k,
        budget=budget,
        to_target_ids=draft.draft_to_target_ids,
        static_paths=static_paths,
    )


def depth0_logprobs(draft: Clover2ForDrafting, root_state: torch.Tensor) -> torch.Tensor:
    """[V_draft] log-probabilities of head depth 0 from an augmented state c_t [H]."""
    head0, _ = draft.head_step(root_state[None])
    return _draft_logprobs(draft, head0)[0]


@torch.no_grad()
def clover2_tree_decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    clover2_draft: Clover2ForDrafting = None,
    clover2_streamer=None,
    clover2_stats: Clover2Stats | None = None,
    clover2_options: DecodingOptions | None = None,
    **model_kwargs,
):
    """Clover-2 tree decoding as a `generate(custom_generate=...)` callable (batch size 1).

    `clover2_options`: this call's options (default: the drafter config's, `DecodingOptions.resolve`).
    """
    draft = clover2_draft
    options = clover2_options if clover2_options is not None else DecodingOptions.resolve(draft.config)
    stats = clover2_stats if clover2_stats is not None else Clover2Stats()
    stats.mode = "tree"
    check_supported(model, input_ids, generation_config, model_kwargs)
    cache = model_kwargs.get(CACHE_KWARG)
    if cache is None:
        cache = DynamicCache(config=model.config)
    if not isinstance(cache, DynamicCache) or cache.get_seq_length() != 0:
        raise ValueError("Clover-2 tree decoding needs a fresh DynamicCache (no static or pre-filled cache).")
    # sliding-window layers keep their tail until compaction (cache_utils); caught by
    # tests/test_decoding.py::test_lookup_path_deeper_than_the_sliding_window_is_lossless
    cache.activate_past_recording()
    gc = generation_config
    keep_scores = gc.return_dict_in_generate and gc.output_scores
    keep_logits = gc.return_dict_in_generate and gc.output_logits
    scores, raw_logits = [], []
    settings = auto_tree_settings(draft, model, options=options)  # explicit config values as they are; "auto" resolved
    walk = "device" if device_greedy_supported(gc, logits_processor, stopping_criteria, options.tree_type) else "host"
    static = static_verify = None
    if options.static_shapes:
        if walk != "device":
            raise ValueError("clover2_static_shapes=True needs greedy decoding with the dynamic tree, no logits "
                             "processor, no custom stopping criteria and no returned scores or logits.")
        if settings.adaptive:  # a fixed shape: the largest tree the device cost model would verify
            settings = dataclasses.replace(settings, adaptive=False)
        static = StaticDrafting(draft, settings.top_k, settings.budget, options.tree_lookup_tokens, gc.max_length)
        if static_verification_supported(model):  # the target's passes on a StaticCache too
            static_verify = StaticVerification(model, gc.max_length, static.num_nodes + 1)
            cache = static_verify.cache
    compiled = static_verify is not None and compiled_calls(model, static, static_verify, gc)
    sizer = TreeSizer.for_pair(draft, model, settings.costs) if settings.adaptive else None
    stats.tree_settings = settings.describe() + (
        "" if static is None else ", static shapes" + (" (drafting and verification)" if static_verify else " (drafting)")
        + (", compiled" if compiled else ""))
    stats.prompt_tokens = input_ids.shape[1]
    t_start = time.perf_counter()

    capture = PreNormCapture(model, draft.config.feature_layers)
    verify_linears, verify_gqa = CpuVerifyLinears(model, enabled=settings.wide_linear), CpuMaskedGqa(model)
    try:
        stats.walk = walk
        if walk == "device":
            input_ids = run_device_greedy(
                model, draft, input_ids, cache, stopping_criteria, gc, settings=settings, sizer=sizer, options=options,
                capture=capture, verify_kernels=(verify_linears, verify_gqa), stats=stats, streamer=clover2_streamer, static=static,
                static_verify=static_verify)
        else:
            input_ids = _host_walk(
                model, draft, input_ids, cache, logits_processor, stopping_criteria, gc, settings=settings,
                sizer=sizer, options=options, capture=capture, verify_linears=verify_linears, verify_gqa=verify_gqa,
                stats=stats, clover2_streamer=clover2_streamer, scores=scores, raw_logits=raw_logits)
    finally:
        capture.remove()
        if clover2_streamer is not None:
            clover2_streamer.end()
        stats.total_time_s += time.perf_counter() - t_start

    if gc.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=input_ids,
            scores=tuple(scores) if keep_scores else None,
            logits=tuple(raw_logits) if keep_logits else None,
            **{CACHE_KWARG: cache},
        )
    return input_ids


def _host_walk(model, draft: Clover2ForDrafting, input_ids: torch.Tensor, cache, logits_processor, stopping_criteria,
               generation_config, *, settings, sizer: TreeSizer | None, options: DecodingOptions, capture,
               verify_linears, verify_gqa, stats: Clover2Stats, clover2_streamer, scores: list, raw_logits: list):
    """The general tree loop: tree grown, sized and walked on the host (any logits processor, sampling,
    stopping criterion, returned scores). Returns the new sequence; appends to `scores` / `raw_logits`."""
    gc = generation_config
    do_sample = bool(gc.do_sample)
    keep_scores = gc.return_dict_in_generate and gc.output_scores
    keep_logits = gc.return_dict_in_generate and gc.output_logits
    static_paths = STATIC_TREE_PATHS if options.tree_type == "static" else None
    device = input_ids.device
    draft_device = draft.fc1.weight.device
    if sizer is not None:
        sizer.model.pull_device_counts()  # what earlier device-side greedy calls learnt
    # Prefill: the target reads the prompt and picks the first new token itself.
    out = model(
        input_ids=input_ids,
        position_ids=torch.arange(input_ids.shape[1], device=device)[None],
        use_cache=True,
        **{CACHE_KWARG: cache},
        logits_to_keep=1,
    )
    stats.target_forwards += 1
    pending_hidden = capture.hidden  # [1, n, H] pre-norm states whose next token is known
    raw = out.logits[:, -1].float()  # [1, V]
    processed = logits_processor(input_ids, raw.clone())
    token = choose_token(processed, do_sample)  # the target's own token: root of the first tree
    draft_cache = draft.new_cache()
    finished = False

    def emit(token: torch.Tensor, processed: torch.Tensor, raw: torch.Tensor) -> bool:
        """Append one token as plain decoding would; True when a stopping criterion fires."""
        nonlocal input_ids
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        stats.new_tokens += 1
        if keep_scores:
            scores.append(processed)
        if keep_logits:
            raw_logits.append(raw)
        if clover2_streamer is not None:
            clover2_streamer.put(token.cpu())
        return bool(stopping_criteria(input_ids, processed).any())

    while True:
        # ---- emit the target's own token (prefill choice or the bonus token of the last pass)
        if emit(token, processed, raw):
            break

        # ---- draft: feed verified positions to the augmenting block, then grow the tree
        sync_device(device)
        t0 = time.perf_counter()
        drafting = sizer is None or sizer.should_draft()  # skipped: the drafter reads those positions later
        tree, t_augmented = None, t0
        if drafting:
            n_pending = pending_hidden.shape[1]
            next_ids = input_ids[:, -n_pending:].to(draft_device)
            augmented = draft.augment(pending_hidden.to(draft_device), next_ids, cache=draft_cache)  # [1, n, H]
            pending_hidden = None
            sync_device(draft_device)  # (the read of depth 0 below would wait for the update anyway)
            t_augmented = time.perf_counter()
            first = depth0_logprobs(draft, augmented[0, -1])  # [V_draft]
            # (with a sizer, no tree is grown when not even the drafter's most confident chain could pay)
            if sizer is None or sizer.worth_growing(first, settings.top_k):
                tree = grow_tree(draft, int(token), augmented[0, -1], settings.top_k, settings.budget,
                                  static_paths, first_logprobs=first,
                                  max_depth=sizer.depth_cap if sizer is not None else None)
        if tree is None:
            tree = root_only(int(token), device)
        num_drafted = tree.num_nodes
        room = gc.max_length - input_ids.shape[1]  # tokens that can still be emitted
        if options.tree_lookup_tokens and room > 0:
            lookup = lookup_continuation(input_ids[0].tolist(), min(options.tree_lookup_tokens, room),
                                         options.tree_lookup_ngram)
            tree = add_path(tree, lookup) if lookup else tree
        if sizer is not None:
            kept, _ = sizer.choose(tree, num_drafted, drafting)
            tree = select_nodes(tree, kept)
            num_drafted = sum(1 for m in kept if m < num_drafted)
        sync_device(device)
        t1 = time.perf_counter()
        stats.draft_time_s += t1 - t0

        # ---- verify the whole tree in one target pass
        past_length = cache.get_seq_length()
        q = tree.num_nodes + 1
        tree_tokens = tree.verify_tokens().to(device)[None]  # [1, q]
        if q == 1:  # a plain decoding step, run as plain decoding runs it
            stats.plain_steps += 1
            out = model(input_ids=tree_tokens, position_ids=torch.tensor([[past_length]], device=device),
                        use_cache=True, **{CACHE_KWARG: cache})
        else:
            depths = tree.verify_depths().to(device)
            with verify_linears, verify_gqa:
                out = model(
                    input_ids=tree_tokens,
                    attention_mask=target_mask_kwargs(model, cache, tree.ancestor_matrix().to(device), depths,
                                                      past_length, model.dtype),
                    position_ids=(past_length + depths)[None],
                    use_cache=True,
                    **{CACHE_KWARG: cache},
                )
        stats.target_forwards += 1
        stats.tree_sizes.append(tree.num_nodes)
        tree_hidden = capture.hidden  # [1, q, H]
        tree_logits = out.logits[0].float()  # [q, V]
        sync_device(device)
        t2 = time.perf_counter()
        stats.verify_time_s += t2 - t1
        if sizer is not None:
            sizer.observe_verify(q, t2 - t1)

        # ---- walk the tree: accept children while they equal the target's own choice
        children = tree.children()
        node, path = 0, [0]
        emitted = 0
        while True:
            raw = tree_logits[node][None]
            processed = logits_processor(input_ids, raw.clone())
            token = choose_token(processed, do_sample)
            child = children[node].get(int(token))
            if child is None:
                break  # `token` is the bonus token, emitted at the top of the loop
            emitted += 1
            if child != next(iter(children[node].values())):
                stats.branch_switches += 1
            if emit(token, processed, raw):
                finished = True
                stats.stopped_in_path += 1
                break
            node = child
            path.append(child)
        stats.accepted_depths.append(emitted)
        stats.tokens_per_step.append(emitted + (0 if finished else 1))
        if sizer is not None:
            sizer.update(tree, num_drafted, [v - 1 for v in path[1:]])
            sizer.finish_step(drafting, emitted + 1, t1 - t_augmented, q)

        # ---- keep the accepted path in the target cache; queue its states for the drafter
        compact_cache(cache, q, path)
        if finished:
            break
        accepted_hidden = tree_hidden[:, path]  # [1, k + 1, H]
        pending_hidden = (accepted_hidden if pending_hidden is None
                          else torch.cat([pending_hidden, accepted_hidden], dim=1))
    return input_ids


def choose_token(processed_logits: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """[1, V] processed logits -> [1] token, exactly as `GenerationMixin._sample` picks it."""
    if do_sample:
        probs = torch.softmax(processed_logits, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return torch.argmax(processed_logits, dim=-1)


