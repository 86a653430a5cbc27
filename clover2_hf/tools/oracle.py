"""The decoding loop's speed at a chosen tau, apart from the drafter's quality: an oracle lookup path.

Tree decoding merges a prompt-lookup guess into every drafted tree. `OracleLookup` replaces that guess
with the next L tokens of the target's own (plain greedy) answer, so each pass accepts at least L draft
tokens: tau is about L + 1 plus whatever the drafter's own nodes add, while the drafter still drafts and
the target still verifies every token (the output stays plain greedy decoding's; the callers check it).
It is a measuring device, not a decoding method: the speed-up it gives at tau = L + 1 is the most
that loop can deliver on this device and target with a drafter that good, so loop cost and drafter
quality can be judged apart, on any target shape, random weights included.

Used by `scripts/measure_speed_ceiling.py` and `scripts/gpu_step_check.py`.
"""

from __future__ import annotations

from ..generation import device_step, tree_step

__all__ = ["OracleLookup"]


class OracleLookup:
    """Stands in for `lookup_continuation` in both tree walks while active (`with OracleLookup() as oracle`).

    Set the reference with `oracle.answer_for(prompt_length, answer_ids)` before each call; the number of
    tokens proposed per step is the call's `tree_lookup_tokens`, or fewer with `per_step=` (so that static-shape
    calls of several taus share one lookup width, hence one compiled graph)."""

    # both walks look the function up in their module globals at call time
    _MODULES = (tree_step, device_step)

    def __init__(self) -> None:
        self.prompt_length = 0
        self.answer: list[int] = []
        self.per_step: int | None = None
        self._saved: list = []

    def answer_for(self, prompt_length: int, answer: list[int], per_step: int | None = None) -> None:
        self.prompt_length, self.answer, self.per_step = prompt_length, list(answer), per_step

    def __call__(self, context: list[int], num_tokens: int, max_ngram: int) -> list[int]:
        done = len(context) - self.prompt_length
        if self.per_step is not None:
            num_tokens = min(num_tokens, self.per_step)
        return self.answer[done : done + num_tokens]

    def __enter__(self) -> OracleLookup:
        self._saved = [module.lookup_continuation for module in self._MODULES]
        for module in self._MODULES:
            module.lookup_continuation = self
        return self

    def __exit__(self, *exc) -> None:
        for module, original in zip(self._MODULES, self._saved):
            module.lookup_continuation = original
