"""`Clover2Stats`: what one Clover-2 `generate` call did (pass one as `generate(..., clover2_stats=stats)`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Clover2Stats"]


@dataclass
class Clover2Stats:
    """Per-call statistics of a Clover-2 `generate` call (pass one as `clover2_stats=`).

    Times are wall-clock seconds measured on the host. The host walk synchronises CUDA around each phase;
    the device-side greedy loop adds no synchronisation for them (its phases end at its host reads), so on
    an accelerator its draft / verify split is approximate.
    """

    mode: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # including the prefill pass
    tokens_per_step: list[int] = field(default_factory=list)  # tokens emitted by each verification pass
    accepted_depths: list[int] = field(default_factory=list)  # accepted draft tokens per pass
    tree_sizes: list[int] = field(default_factory=list)  # draft nodes verified per pass
    branch_switches: int = 0  # accepted nodes that were not their parent's most likely child
    stopped_in_path: int = 0  # stopping criteria fired on an accepted draft token
    plain_steps: int = 0  # verification passes over the root token alone (tree mode, automatic sizing)
    tree_settings: str = ""  # the tree settings used and where they came from (tree mode)
    # tree mode: "device" (greedy; tree built, sized and walked on the device, `device_step`) or "host"
    walk: str = ""
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    total_time_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verification pass (accepted drafts + the bonus token)."""
        return sum(self.tokens_per_step) / max(len(self.tokens_per_step), 1)

    @property
    def target_passes_per_token(self) -> float:
        return self.target_forwards / max(self.new_tokens, 1)

    @property
    def draft_share(self) -> float:
        """Fraction of the call's wall time spent drafting."""
        return self.draft_time_s / self.total_time_s if self.total_time_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(tau=self.tau, target_passes_per_token=self.target_passes_per_token, draft_share=self.draft_share)
        return out

