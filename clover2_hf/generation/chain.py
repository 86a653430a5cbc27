"""Chain mode: a `CandidateGenerator` for transformers' own assisted decoding.

Chain decoding (`decoding="chain"`, `clover2_hf.generation.options`) drafts one chain of `num_draft_depths` tokens per step and lets
transformers' `_assisted_decoding` verify it: greedy drafts the argmax chain; sampling draws each draft
token from the drafter's processed distribution and returns those logits, so transformers' speculative
sampling keeps the target distribution. Transformers crops accepted blocks at eos and max length only;
other stopping criteria are evaluated per block, as in stock assisted decoding.

Relies on transformers' candidate-generator contract: `requires_model_outputs`, and
`get_candidates(input_ids, ..., n_last_matches=)` being called once before each target pass
(tests/test_decoding.py's chain identity tests catch a change).
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessorList
from transformers.generation.candidate_generator import CandidateGenerator

from ..modeling_clover2 import Clover2ForDrafting
from .capture import PreNormCapture
from .cost_model import sync_device
from .stats import Clover2Stats
from .tree_step import choose_token

__all__ = ["Clover2ChainCandidateGenerator"]


class Clover2ChainCandidateGenerator(CandidateGenerator):
    """Drafts a chain of `num_draft_depths` tokens for transformers' assisted decoding.

    Conditioned on the target's pre-norm hidden states (captured from its final norm's input during
    each target pass). Greedy drafts the argmax chain; sampling draws each draft token from the
    drafter's processed distribution and returns those logits, so transformers' speculative sampling
    keeps the target distribution.
    """

    requires_model_outputs = True
    model_kwargs_overrides: dict = {}

    @property
    def num_drafting_tokens(self) -> int:
        """Tokens drafted per step at most (transformers >= 5.25 reads it in assisted decoding)."""
        return self.draft.config.num_draft_depths

    def __init__(self, target, draft: Clover2ForDrafting, generation_config, logits_processor, stats: Clover2Stats):
        self.target = target
        self.draft = draft
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.stats = stats
        self.capture = PreNormCapture(target, draft.config.feature_layers)
        self.draft_cache = draft.new_cache()
        self.device = draft.fc1.weight.device

    @torch.no_grad()
    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False,
                       n_last_matches=0, **kwargs):
        self.stats.target_forwards += 1  # each call is followed by exactly one target pass
        if is_first_iteration:
            return input_ids, None  # let the target prefill and choose the first token itself
        sync_device(input_ids.device)
        t0 = time.perf_counter()
        done = self.draft_cache.get_seq_length()
        n_new = input_ids.shape[1] - 1 - done  # verified positions the drafter has not read yet
        hidden = self.capture.hidden[:, :n_new].to(self.device)
        next_ids = input_ids[:, done + 1 :].to(self.device)
        augmented = self.draft.augment(hidden, next_ids, cache=self.draft_cache)
        room = self.max_length - input_ids.shape[1]
        length = min(self.draft.config.num_draft_depths, max(room - 1, 0))
        seq = input_ids
        drafted, drafted_logits = [], []
        out, state = self.draft.head_step(augmented[:, -1])
        for depth in range(length):
            if depth > 0:
                out, state = self.draft.head_step(state, drafted[-1].to(self.device))
            logits = self._full_vocab_logits(self.draft.head_logits(out).float())  # [1, V]
            logits = self.logits_processor(seq, logits)
            token = choose_token(logits, self.do_sample)
            drafted.append(token.to(input_ids.device))
            drafted_logits.append(logits)
            seq = torch.cat([seq, drafted[-1][:, None]], dim=-1)
        sync_device(input_ids.device)
        self.stats.draft_time_s += time.perf_counter() - t0
        if not drafted:
            return input_ids, None
        return seq, torch.stack(drafted_logits, dim=1)  # [1, n, V]

    def _full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.draft.d2t is None:
            return logits
        full = logits.new_full((logits.shape[0], self.draft.config.vocab_size), float("-inf"))
        full[:, self.draft.d2t.to(logits.device)] = logits
        return full

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        self.stats.accepted_depths.append(int(num_matches))
        self.stats.tokens_per_step.append(int(num_matches) + 1)
