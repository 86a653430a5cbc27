"""Self-distill and continue training the shipped SmolLM2 drafter on one GPU, inside a time budget.

How `hub_configs/clover2-smollm2-135m-instruct` stage 3 was made (see its model card): the embedded
target (SmolLM2-135M-Instruct, bf16 on the GPU) answers the ShareGPT first user turns that earlier
stages did not answer (`clover2_hf.tools.selfdistill.generate_answers`), then the drafter continues from the
shipped weights on all self-distilled answers (`clover2_hf.tools.recipes.train`). Both steps are the same
code that `clover2 self-distill` and `clover2 train --init-from` run; this script only chains them
with one wall-clock budget and packs the results into files small enough to copy back. `--turns`,
`--temperature` / `--distill-seed` and `--feature-layers` pass the same options of `clover2 self-distill`
and `clover2 train` (later user turns, sampled answers, a drafter grown by fused target layers).

    python scripts/gpu_distill.py --prompts prompts.jsonl.gz --answers answers.jsonl.gz \
        --distill-minutes 2.5 --train-minutes 4 --train-steps 1200 --out OUT

`--probe` instead trains a few steps against a RANDOM target of the embedded target's shape (built
from `--target-files`: its config.json and tokenizer files) to measure seconds per step before the
real target is on the machine; nothing it trains is kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from clover2_hf.tools.recipes import TrainRecipe, train
from clover2_hf.tools.targets import load_target
from clover2_hf.tools.selfdistill import generate_answers

HUB = Path(__file__).resolve().parent.parent / "hub_configs" / "clover2-smollm2-135m-instruct"


def _gunzip(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _recipe(args, target: str | None, data: Path, output_dir: Path, steps: int, minutes: float) -> TrainRecipe:
    return TrainRecipe(
        output_dir=str(output_dir), target=target, data=str(data), init_from=args.init_from,
        max_length=args.max_length, max_eval_examples=args.max_eval_examples, max_steps=steps,
        batch_size=args.batch_size, grad_accum=1, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, save_steps=10**9, eval_steps=10**9, logging_steps=args.logging_steps,
        bf16=True, save_dtype="bfloat16", max_hours=minutes / 60, seed=args.seed, feature_layers=args.feature_layers,
        command="python scripts/gpu_distill.py " + " ".join(args.argv),
    )


def probe(args) -> None:
    """Seconds per training step against a random target of the real one's shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rand = Path(args.work) / "random_target"
    config = AutoConfig.from_pretrained(args.target_files)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(rand)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(args.target_files) / name).exists():
            shutil.copy(Path(args.target_files) / name, rand / name)
    data = Path(args.work) / "answers.jsonl"
    _gunzip(Path(args.answers), data)
    for steps in (5, 5 + args.probe_steps):  # the difference cancels start-up and data preparation
        start = time.time()
        train(_recipe(args, str(rand), data, Path(args.work) / f"probe{steps}", steps, 10.0))
        print(f"PROBE steps={steps} wall_s={time.time() - start:.1f}", flush=True)


def run(args) -> None:
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    answers = work / "answers.jsonl"
    _gunzip(Path(args.answers), answers)  # earlier answers: skipped by id, trained on again
    prompts = work / "prompts.jsonl"
    _gunzip(Path(args.prompts), prompts)
    target, tokenizer = load_target(None, dtype=torch.bfloat16)
    target.to(args.device)
    summary = generate_answers(target, tokenizer, answers, prompts, max_new_tokens=args.max_new_tokens,
                               max_prompt_tokens=args.max_prompt_tokens, turns=args.turns,
                               temperature=args.temperature, seed=args.distill_seed, batch_size=args.distill_batch,
                               max_hours=args.distill_minutes / 60, progress=False)
    print(f"SELFDISTILL {summary}", flush=True)
    del target
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with open(answers, "rb") as fin, gzip.open(out / "answers.jsonl.gz", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    print(f"ELAPSED after self-distill {time.time() - start:.0f} s", flush=True)
    train_start = time.time()
    train(_recipe(args, None, answers, work / "run", args.train_steps, args.train_minutes))
    print(f"TRAIN wall_s={time.time() - train_start:.0f}", flush=True)
    final = work / "run" / "final"
    shutil.make_archive(str(work / "final"), "tar", final)
    # $OUT takes files of at most 16 MiB: split the archive
    subprocess.run(["split", "-b", "15000000", "-d", str(work / "final.tar"), str(out / "final.tar.part")], check=True)
    (out / "timing.json").write_text(json.dumps({"total_s": time.time() - start,
                                                  "selfdistill": str(summary)}) + "\n")
    print(f"ELAPSED total {time.time() - start:.0f} s", flush=True)


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", required=True, help="gzipped JSONL of earlier self-distilled answers")
    p.add_argument("--prompts", help="gzipped JSONL of conversations whose user turns are answered")
    p.add_argument("--init-from", default=str(HUB), help="the drafter to continue (default: the shipped one)")
    p.add_argument("--work", default="/tmp/gpu_distill")
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="cuda", help="where the target answers (training: accelerate's device)")
    p.add_argument("--probe", action="store_true")
    p.add_argument("--probe-steps", type=int, default=30)
    p.add_argument("--target-files", help="config.json and tokenizer files of the target (--probe)")
    p.add_argument("--distill-minutes", type=float, default=2.5)
    p.add_argument("--distill-batch", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--turns", type=lambda v: None if v == "all" else int(v), default=1,
                   help="user turns answered per conversation (a number or 'all'; clover2 self-distill --turns)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers; above 0: sampled")
    p.add_argument("--distill-seed", type=int, default=0, help="seed of sampled answers")
    p.add_argument("--feature-layers", type=lambda v: [int(i) for i in v.split(",")], default=None,
                   help="grow the drafter by these fused target layers (clover2 train --feature-layers)")
    p.add_argument("--train-minutes", type=float, default=4.0)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="conversations per optimizer step")
    p.add_argument("--max-length", type=int, default=704)
    p.add_argument("--max-eval-examples", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--logging-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.probe and not args.target_files:
        p.error("--probe needs --target-files (the target's config.json and tokenizer files)")
    if not args.probe and not args.prompts:
        p.error("--prompts is required (gzipped JSONL of conversations whose first user turns are answered)")
    args.argv = sys.argv[1:]
    (probe if args.probe else run)(args)


if __name__ == "__main__":
    main()
