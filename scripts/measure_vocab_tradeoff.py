"""What a truncated draft vocabulary does to training time, accuracy, tau and decoding speed.

Two drafters are trained from the same start with the same data, steps and settings, one with a
truncated draft vocabulary (`--draft-vocab-size`, default 8192) and one with the target's full
vocabulary; then each is scored on the held-out split (`clover2 evaluate`), timed for one drafting
phase, and run in tree mode on MT-Bench first turns against plain `generate()` (same fixed tree
settings for both, tuning off).

    python scripts/measure_vocab_tradeoff.py --data runs/selfdistill/answers.jsonl --steps 150 \
        --output docs/bench/vocab_tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ["CLOVER2_HF_TUNING"] = "0"  # fixed tree settings for both drafters

from clover2_hf import Clover2ForDrafting  # noqa: E402
from clover2_hf.tools.bench import load_questions, run_benchmark  # noqa: E402
from clover2_hf.tools.embedded import load_default_target  # noqa: E402
from clover2_hf.tools.recipes import TrainRecipe, evaluate_drafter, train  # noqa: E402
from clover2_hf.tools.tune import measure_draft_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="conversations (default: ShareGPT wheel)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per drafter")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=704)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--per-category", type=int, default=1, help="MT-Bench questions per category")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree-budget", type=int, default=4)
    parser.add_argument("--tree-top-k", type=int, default=2)
    parser.add_argument("--work-dir", default="runs/vocab_tradeoff")
    parser.add_argument("--output", default="vocab_tradeoff.json")
    args = parser.parse_args()

    results = {"settings": vars(args), "drafters": {}}
    target, tokenizer = load_default_target(dtype=torch.float32)
    questions = load_questions(per_category=args.per_category)
    for vocab in (args.draft_vocab_size, None):
        name = f"vocab{vocab or 'full'}"
        out_dir = Path(args.work_dir) / name
        start = time.time()
        train(TrainRecipe(
            output_dir=str(out_dir), data=args.data, max_length=args.max_length, draft_vocab_size=vocab,
            bf16=True, batch_size=args.batch_size, grad_accum=1, max_steps=args.steps, warmup_steps=10,
            learning_rate=1e-3, save_steps=10**6, eval_steps=10**6, max_eval_examples=0, logging_steps=10,
            save_dtype="bfloat16"))
        train_s = time.time() - start
        metrics = evaluate_drafter(str(out_dir / "final"), data=args.data, max_length=args.max_length,
                                   max_eval_examples=100, bf16=True)
        draft = Clover2ForDrafting.from_pretrained(out_dir / "final", dtype=torch.bfloat16).attach_target(target).eval()
        draft.config.tree_budget, draft.config.tree_top_k = args.tree_budget, args.tree_top_k
        draft_ms = 1e3 * measure_draft_time(draft, [args.tree_top_k], repeats=9, budget=args.tree_budget)[args.tree_top_k]
        # the drafter's tree alone (no lookup path): the comparison is about the drafter
        bench = run_benchmark(target, tokenizer, draft, questions, ["clover2-tree-nolookup"],
                              max_new_tokens=args.max_new_tokens, progress=False)
        tree = bench.summary["clover2-tree-nolookup"]["overall"]
        results["drafters"][name] = {
            "draft_vocab_size": vocab or target.config.vocab_size,
            "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / args.steps, 2),
            "held_out": {k.removeprefix("eval_"): round(v, 4) for k, v in metrics.items()
                         if k.startswith(("eval_top1_", "eval_top5_"))},
            "draft_phase_ms": round(draft_ms, 2),
            "tau": round(tree["tau"], 3),
            "speedup_vs_plain": round(tree["speedup"], 3),
            "identical": tree["identical"],
        }
        print(name, json.dumps(results["drafters"][name]), flush=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
