"""How fast is the decoding loop on this machine when the drafts are right? tau vs speedup with an oracle.

The drafter is the limit on this CPU (README "Results"); this script measures the other half of the
question "what would reach 2x": the wall-clock speedup that Clover-2 tree decoding delivers here at a
given tau, with everything else real. For each bench question the target first writes its plain
greedy answer. Then tree decoding runs with its lookup path replaced by an ORACLE that knows that
answer: the next L answer tokens after the current position. The drafter still drafts its tree (the
budget and top-k that `clover2 tune` stored for this target and device, else the drafter config's; the
JSON records which), the oracle path is merged into it exactly as the lookup path is (so a pass
verifies up to L more tokens than the drafter's tree: the mean verified tree size is recorded), and the
target still verifies every token, so the outputs stay identical to plain `generate()` (checked). The
oracle is a measuring device, not a decoding method.

For L in --lengths: tau (tokens per target pass, prefill included, as `clover2 bench` counts it) and
the speedup over plain `generate()` (median over questions of the plain / method time ratio; plain and
each L interleaved per question, order alternating between repeats, one process). L = 0 is the
drafter's tree alone. `docs/bench/speed_ceiling.json` was made with

    python scripts/measure_speed_ceiling.py --draft hub_configs/clover2-smollm2-135m-instruct \
        --per-category 1 --max-new-tokens 128 --lengths 0,1,2,3,4,6,9 --repeats 2 \
        --output docs/bench/speed_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from clover2_hf import Clover2ForDrafting, Clover2Stats, load_default_target
from clover2_hf.tools.bench import encode_chat, load_questions
from clover2_hf.tools.oracle import OracleLookup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draft", default="hub_configs/clover2-smollm2-135m-instruct")
    p.add_argument("--questions", help="JSONL of {question_id, category, turns} (default: bundled MT-Bench)")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lengths", default="0,1,2,3,4,6,8", help="oracle path lengths L")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per question and L (median)")
    p.add_argument("--draft-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="drafter dtype (bfloat16: what `clover2 bench` picks on CPUs with bf16 matrix instructions)")
    p.add_argument("--output", help="write the result as JSON here")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if min(lengths) < 0:
        p.error("--lengths must be >= 0")

    target, tokenizer = load_default_target()
    draft = Clover2ForDrafting.from_pretrained(args.draft, dtype=getattr(torch, args.draft_dtype))
    questions = load_questions(args.questions, per_category=args.per_category)
    oracle = OracleLookup().__enter__()  # for the rest of this process
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = {"do_sample": False, "pad_token_id": pad, "max_new_tokens": args.max_new_tokens}

    def run(ids: torch.Tensor, length: int | None) -> tuple[list[int], float, int, list[int]]:
        """One greedy generation: (new ids, seconds, target passes, verified tree sizes); None = plain."""
        kwargs = dict(common, attention_mask=torch.ones_like(ids))
        stats = None
        if length is not None:
            draft.config.tree_lookup_tokens = length
            stats = Clover2Stats()
            kwargs.update(assistant_model=draft, clover2_stats=stats)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = target.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        passes = len(new) if stats is None else stats.target_forwards
        return new, elapsed, passes, [] if stats is None else list(stats.tree_sizes)

    speed: dict[str, list[float]] = {str(n): [] for n in lengths}  # per-question tokens/s ratios
    tokens = {str(n): 0 for n in lengths}
    passes = {str(n): 0 for n in lengths}
    tree_sizes: dict[str, list[int]] = {str(n): [] for n in lengths}  # draft nodes per verification pass
    identical = True
    warm = encode_chat(tokenizer, [{"role": "user", "content": "Hello"}])
    oracle.answer_for(warm.shape[1], run(warm, None)[0])
    run(warm, max(lengths))  # warm-up
    for qi, question in enumerate(questions):
        ids = encode_chat(tokenizer, [{"role": "user", "content": question.turns[0]}])
        reference = run(ids, None)[0]
        oracle.answer_for(ids.shape[1], reference)
        times: dict[str, list[float]] = {"plain": [], **{str(n): [] for n in lengths}}
        for r in range(args.repeats):
            order = [None, *lengths] if (qi + r) % 2 == 0 else [*reversed(lengths), None]
            for n in order:
                new, elapsed, n_passes, sizes = run(ids, n)
                times["plain" if n is None else str(n)].append(elapsed)
                if n is not None:
                    identical &= new == reference
                    if r == 0:
                        tokens[str(n)] += len(new)
                        passes[str(n)] += n_passes
                        tree_sizes[str(n)] += sizes
        plain = statistics.median(times["plain"])
        for n in lengths:
            speed[str(n)].append(plain / statistics.median(times[str(n)]))  # same tokens: time ratio
        print(f"question {question.question_id} ({question.category}): "
              + " ".join(f"L={n}:{speed[str(n)][-1]:.2f}x" for n in lengths), flush=True)

    rows = [{"oracle_tokens": n, "tau": round(tokens[str(n)] / passes[str(n)], 3),
             "mean_tree_nodes": round(statistics.mean(tree_sizes[str(n)]), 2),
             "speedup_median": round(statistics.median(speed[str(n)]), 3)} for n in lengths]
    result = {
        "draft": args.draft, "draft_dtype": args.draft_dtype, "tree_budget": draft.config.tree_budget,
        "tree_top_k": draft.config.tree_top_k,
        "questions": len(questions), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "identical_to_plain": identical, "rows": rows,
    }
    print("L  tau    nodes  speedup (median over questions of plain time / method time)")
    for row in rows:
        print(f"{row['oracle_tokens']:<2} {row['tau']:<6} {row['mean_tree_nodes']:<6} {row['speedup_median']:.2f}x")
    print("identical to plain generate:", identical)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
