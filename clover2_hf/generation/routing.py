"""The one hook into transformers: `generate(assistant_model=<Clover2ForDrafting>)` runs Clover-2 decoding.

`install_generate_hook` (called by `import clover2_hf`) wraps `GenerationMixin.generate`; a call whose
`assistant_model` is a `Clover2ForDrafting` goes to tree decoding (`clover2_tree_decode`, handed to
stock `generate` as its `custom_generate` loop, so transformers still prepares the generation config,
logits processors, stopping criteria and cache exactly as for plain decoding) or to chain decoding
(transformers' `_assisted_decoding` with `Clover2ChainCandidateGenerator`). Any other call goes to
stock transformers untouched.

Relies on: `GenerationMixin.generate` being the entry point of every `model.generate` call and
accepting a callable `custom_generate` with extra keyword arguments passed through to it; chain mode
on the per-instance `_get_candidate_generator(generation_config, logits_processor, ...)` lookup inside
`_assisted_decoding` (a private method: tests/test_decoding.py's chain identity tests fail if it is
renamed or no longer consulted).
"""

from __future__ import annotations

import functools
import inspect
import time

from transformers import GenerationMixin

from ..modeling_clover2 import Clover2ForDrafting
from .chain import Clover2ChainCandidateGenerator
from .stats import Clover2Stats
from .tree_step import prepare_call, run_tree_decoding

__all__ = ["install_generate_hook"]

_STOCK_GENERATE = GenerationMixin.generate
_GENERATE_SIGNATURE = inspect.signature(_STOCK_GENERATE)


@functools.wraps(_STOCK_GENERATE)
def _generate(self, *args, **kwargs):
    """`GenerationMixin.generate`, routing `assistant_model=<Clover2ForDrafting>` to Clover-2 decoding."""
    bound = _GENERATE_SIGNATURE.bind_partial(self, *args, **kwargs)
    draft = bound.arguments.get("assistant_model")
    if not isinstance(draft, Clover2ForDrafting):
        if "clover2_stats" in kwargs:
            raise ValueError("clover2_stats= is only accepted together with assistant_model=<Clover2ForDrafting>")
        return _STOCK_GENERATE(self, *args, **kwargs)  # Clover-2 option keywords: stock rejects them as unused

    draft.attach_target(self)  # validates hidden size / vocabulary against this target
    arguments = dict(bound.arguments)
    arguments.pop("self")
    arguments.update(arguments.pop("kwargs", {}))
    stats, options = prepare_call(draft, arguments)
    if isinstance(arguments.get("custom_generate"), str):
        # generate(custom_generate=<drafter dir or repo>, trust_remote_code=True): the drafter's own copy of
        # this loop, for machines without the package; with the package installed, the package's loops run
        arguments.pop("custom_generate")
        arguments.pop("trust_remote_code", None)
    if options.decoding == "chain":
        return _chain_generate(self, draft, arguments, stats)

    arguments.pop("assistant_model")
    return run_tree_decoding(_STOCK_GENERATE, self, draft, arguments, stats, options)


_generate.clover2_stock_generate = _STOCK_GENERATE  # what the hook wraps (read by hub/remote_generate.py)


def _chain_generate(target, draft: Clover2ForDrafting, arguments: dict, stats: Clover2Stats):
    """Stock assisted decoding with `Clover2ChainCandidateGenerator` as this call's candidate generator."""
    stats.mode = "chain"
    t0 = time.perf_counter()
    generators = []

    def candidate_generator(generation_config, logits_processor, **_):
        generators.append(Clover2ChainCandidateGenerator(target, draft, generation_config, logits_processor, stats))
        return generators[-1]

    # `_assisted_decoding` asks self._get_candidate_generator(...) for its generator (private); instance-level,
    # removed below; caught by tests/test_decoding.py's chain identity tests (mode="chain")
    target._get_candidate_generator = candidate_generator
    try:
        result = _STOCK_GENERATE(target, **arguments)
    finally:
        del target._get_candidate_generator
        for generator in generators:
            generator.capture.remove()
        stats.total_time_s += time.perf_counter() - t0
    inputs = arguments.get("inputs", arguments.get("input_ids"))
    stats.prompt_tokens = int(inputs.shape[-1]) if inputs is not None else 0
    sequences = result.sequences if hasattr(result, "sequences") else result
    stats.new_tokens = int(sequences.shape[-1]) - stats.prompt_tokens
    stats.verify_time_s = stats.total_time_s - stats.draft_time_s
    return result


def install_generate_hook() -> None:
    """Route `generate(assistant_model=<Clover2ForDrafting>)` to Clover-2 decoding (idempotent).

    Replaces `GenerationMixin.generate` (public; every model's generate resolves to it); caught by every identity
    test in tests/test_decoding.py."""
    if GenerationMixin.generate is not _generate:
        GenerationMixin.generate = _generate
