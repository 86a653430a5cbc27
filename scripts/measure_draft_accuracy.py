"""Does decoding get the accuracy that training measures? Draft accuracy on the target's own answers.

For each bench question (bundled MT-Bench first turns by default) the target writes its greedy answer.
On that text the script measures
  * teacher-forced top-1 per depth: the drafter's argmax at depth i from position t (given the true
    tokens up to x_{t+1+i}) against the target's argmax for x_{t+2+i}, answer positions only (the
    quantity `clover2 evaluate` reports on held-out training data);
  * decoding acceptance: Clover-2 tree decoding (lookup path off) with budget 1 / top-k 1 (depth 0 only: the fraction of
    steps whose draft is accepted), with budget N / top-k 1 (a chain: P(accepted >= d) and tau) and with a fixed
    tree (`--tree`, default budget 4 / top-k 4, the tree `clover2 tune` chose for the first shipped drafter: tau);
and checks that both decodings return plain `generate()`'s tokens. Depth-0 acceptance well below the
teacher-forced depth-0 top-1 would point at a train/inference mismatch (hidden states, positions,
cache); equal numbers mean the drafter itself is the limit.

    python scripts/measure_draft_accuracy.py --draft hub_configs/clover2-smollm2-135m-instruct \
        --per-category 2 --max-new-tokens 128 --output docs/bench/draft_accuracy.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from clover2_hf import Clover2ForDrafting, Clover2Stats, load_default_target
from clover2_hf.tools.bench import encode_chat, load_questions
from clover2_hf.training import target_features


@torch.no_grad()
def teacher_forced_hits(target, draft, ids: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits, counts) per depth over the answer part of `ids` [1, T]."""
    depths = draft.config.num_draft_depths
    features = target_features(target, ids, feature_layers=draft.config.feature_layers)
    target_next = target.lm_head(features.post_norm).argmax(-1)[0]  # [T]: the target's x_{t+1}
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # x_{t+1} at t (the last one is never scored)
    out = draft(features.hidden, next_ids, return_logits=True)
    predicted = draft.draft_to_target_ids(out.logits.argmax(-1))[0]  # [N, T]: guesses for x_{t+2+i}
    length = ids.shape[1]
    hits, counts = torch.zeros(depths), torch.zeros(depths)
    for depth in range(depths):
        # depth i at t guesses x_{t+2+i}; the target's own choice for it is target_next[t+1+i], an
        # answer token only while t + 2 + i <= length - 1
        positions = torch.arange(prompt_len - 1, length - 2 - depth)
        if positions.numel():
            hits[depth] = (predicted[depth, positions] == target_next[positions + 1 + depth]).sum()
            counts[depth] = positions.numel()
    return hits, counts


def _budget_top_k(text: str) -> tuple[int, int]:
    try:
        budget, top_k = (int(v) for v in text.split(","))
    except ValueError:
        budget = top_k = 0
    if min(budget, top_k) < 1:
        raise argparse.ArgumentTypeError(f"expected BUDGET,TOP_K (two integers >= 1), got {text!r}")
    return budget, top_k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", required=True)
    p.add_argument("--questions", default=None, help="question JSONL (default: bundled MT-Bench)")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", default="4,4", type=_budget_top_k, help="BUDGET,TOP_K of the fixed tree whose tau is reported")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    tree = args.tree

    target, tokenizer = load_default_target(dtype=torch.float32)
    draft = Clover2ForDrafting.from_pretrained(args.draft, dtype=torch.float32).eval().attach_target(target)
    draft.config.tree_lookup_tokens = 0  # the drafter alone: no prompt-lookup path in the tree
    depths = draft.config.num_draft_depths
    hits, counts = torch.zeros(depths), torch.zeros(depths)
    # accepted draft tokens per step: budget 1, a chain of `depths`, the fixed tree (named: two may coincide)
    settings = {"depth0": (1, 1), "chain": (depths, 1), "tree": tree}
    accepted = {name: [] for name in settings}
    for question in load_questions(args.questions, None, args.per_category):
        ids = encode_chat(tokenizer, [{"role": "user", "content": question.turns[0]}], target.device)
        plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                do_sample=False)
        h, c = teacher_forced_hits(target, draft, plain, ids.shape[1])
        hits, counts = hits + h, counts + c
        for name, (budget, top_k) in settings.items():
            draft.config.tree_budget, draft.config.tree_top_k = budget, top_k
            stats = Clover2Stats()
            out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                  do_sample=False, assistant_model=draft, clover2_stats=stats)
            if not torch.equal(out, plain):
                raise SystemExit(f"question {question.question_id}: Clover-2 output differs from plain generate")
            accepted[name].extend(stats.accepted_depths)
    chain = Counter(accepted["chain"])
    steps = len(accepted["chain"])
    result = {
        "draft": args.draft,
        "questions_per_category": args.per_category,
        "max_new_tokens": args.max_new_tokens,
        "teacher_forced_top1": [round(float(h / max(c, 1)), 4) for h, c in zip(hits, counts)],
        "teacher_forced_positions": [int(c) for c in counts],
        "decode_depth0_acceptance": round(sum(accepted["depth0"]) / max(len(accepted["depth0"]), 1), 4),
        "decode_depth0_steps": len(accepted["depth0"]),
        "chain_p_accepted_at_least": [round(sum(v for k, v in chain.items() if k >= d) / max(steps, 1), 4)
                                      for d in range(1, depths + 1)],
        "chain_tau": round(1 + sum(accepted["chain"]) / max(steps, 1), 4),
        "tree": {"budget": tree[0], "top_k": tree[1],
                 "tau": round(1 + sum(accepted["tree"]) / max(len(accepted["tree"]), 1), 4)},
        "identical_to_plain": True,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
