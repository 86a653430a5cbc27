"""Clover-2 acceptance statistics as a Hugging Face `evaluate` metric (load it from its local directory).

    import evaluate
    metric = evaluate.load("path/to/clover2_hf/metrics/clover2_acceptance")
    metric.compute(accepted_lengths=[stats.accepted_depths for stats in all_stats])

This file is self-contained (evaluate copies it into its module cache and imports it on its own).
"""

from __future__ import annotations

import datasets
import evaluate

_CITATION = """\
@article{xiao2024clover2,
  title={Clover-2: Accurate Inference for Regressive Lightweight Speculative Decoding},
  author={Xiao, Bin and Gao, Lujun and Zhang, Chunyi and Wu, Lei and Huang, Weipeng and Zhang, Wei and Yang, Haoyu},
  journal={arXiv preprint arXiv:2408.00264},
  year={2024}
}
"""

_DESCRIPTION = """\
Acceptance statistics of speculative decoding (Clover-2, EAGLE, Medusa, assisted generation, ...).
Each verification pass of the target accepts some number a >= 0 of drafted tokens and then emits one
token of its own (the bonus token), so it emits a + 1 tokens. From the per-pass accepted counts of
one or more generations this metric computes the mean accepted length tau (tokens per target pass),
the histogram of accepted counts, and the acceptance rate per draft depth.
"""

_KWARGS_DESCRIPTION = """
Args:
    accepted_lengths (`list` of `list` of `int`): one list per generation, holding the number of
        draft tokens accepted by each verification pass (e.g. `Clover2Stats.accepted_depths`).
    max_depth (`int`, *optional*): the most draft tokens one pass can accept (the drafter's depth N,
        plus `tree_lookup_tokens` when the tree carries a lookup path); histogram and per-depth lists
        then have max_depth + 1 and max_depth entries. Defaults to the largest accepted count observed
        (at least 1).
Returns:
    num_steps (`int`): verification passes counted.
    mean_accepted (`float`): mean accepted draft tokens per pass.
    tau (`float`): mean tokens emitted per pass, mean_accepted + 1 (a pass stopped by eos inside the
        accepted path has no bonus token; this metric counts one anyway).
    tau_per_generation (`list` of `float`): tau of each input generation (None for one with no pass).
    accepted_length_histogram (`list` of `int`): entry a = passes that accepted exactly a tokens.
    depth_acceptance (`list` of `float`): entry d - 1 = share of passes accepting at least d tokens.
    conditional_depth_acceptance (`list` of `float` or None): entry d - 1 = P(accept >= d | accept >= d - 1),
        None where no pass reached depth d - 1.
Examples:
    >>> metric = evaluate.load("clover2_hf/metrics/clover2_acceptance")
    >>> out = metric.compute(accepted_lengths=[[0, 2, 1], [3, 0]])
    >>> round(out["tau"], 2), out["accepted_length_histogram"], out["depth_acceptance"]
    (2.2, [2, 1, 1, 1], [0.6, 0.4, 0.2])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Clover2Acceptance(evaluate.Metric):
    """Mean accepted length, accepted-length histogram and per-depth acceptance of speculative decoding."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accepted_lengths": datasets.Sequence(datasets.Value("int64"))}),
            reference_urls=["https://arxiv.org/abs/2408.00264"],
        )

    def _compute(self, accepted_lengths, max_depth: int | None = None) -> dict:
        rows = [[int(a) for a in row] for row in accepted_lengths]
        steps = [a for row in rows for a in row]
        if not steps:
            raise ValueError("accepted_lengths holds no verification pass")
        if min(steps) < 0:
            raise ValueError(f"accepted counts must be >= 0, got {min(steps)}")
        observed = max(max(steps), 1)
        if max_depth is None:
            max_depth = observed
        elif max_depth < observed:
            raise ValueError(f"max_depth={max_depth} but a pass accepted {observed} tokens")
        n = len(steps)
        histogram = [0] * (max_depth + 1)
        for a in steps:
            histogram[a] += 1
        at_least = [sum(histogram[d:]) for d in range(max_depth + 1)]  # at_least[d] = passes accepting >= d
        mean_accepted = sum(steps) / n
        return {
            "num_steps": n,
            "mean_accepted": mean_accepted,
            "tau": mean_accepted + 1.0,
            "tau_per_generation": [sum(row) / len(row) + 1.0 if row else None for row in rows],
            "accepted_length_histogram": histogram,
            "depth_acceptance": [at_least[d] / n for d in range(1, max_depth + 1)],
            "conditional_depth_acceptance": [
                at_least[d] / at_least[d - 1] if at_least[d - 1] else None for d in range(1, max_depth + 1)
            ],
        }
