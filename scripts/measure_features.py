#!/usr/bin/env python
"""Measure on-the-fly target features against a precomputed feature store, on this machine.

Three measurements on the same examples, drafter initialisation and data order:

  (a) training throughput with on-the-fly features (the target's decoder runs in every step);
  (b) feature-store build throughput (one target forward per token + shard writes) and disk use;
  (c) training throughput from the store (decoder skipped; the target's norm and lm_head still run).

Throughput is real (non-padding) tokens per second of whole `Clover2Trainer` optimizer steps
(`trainer.train()`, one micro-batch per step, data loading included), timed from the end of step
`--warmup-steps` to the end of the last step. The break-even point is the number of epochs E at
which building the store once and training E epochs from it costs as much as E epochs on the fly:
    E* = (1 / build_tps) / (1 / on_the_fly_tps - 1 / store_tps).

Default target: the embedded SmolLM2-135M-Instruct on ShareGPT conversations. `--tiny` uses a tiny
random Llama and synthetic examples (a smoke test of the script, not a measurement).

    OMP_NUM_THREADS=2 python scripts/measure_features.py --conversations 200 --max-length 1024 \\
        --steps 40 --draft-vocab-size 8192 --bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from clover2_hf import Clover2ForDrafting
from clover2_hf.data import ConversationCollator, token_frequencies
from clover2_hf.tools.features import FeatureCollator, FeatureDataset, build_feature_store
from clover2_hf.training import Clover2Trainer


def _tiny_target_and_examples(n: int, max_length: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=max(max_length, 64), bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    target = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(max(8, max_length // 4), max_length + 1, (), generator=g))
        ids = torch.randint(3, config.vocab_size, (length,), generator=g).tolist()
        prompt = length * 3 // 10
        examples.append({"id": f"synthetic-{i}", "input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return target, 0, examples


def _real_target_and_examples(n: int, max_length: int, dtype: torch.dtype):
    from clover2_hf.data import build_examples
    from clover2_hf.tools.embedded import load_default_target

    target, tokenizer = load_default_target(dtype=dtype)
    data = build_examples(tokenizer, max_length=max_length, max_conversations=n, eval_fraction=0.0)
    pad = tokenizer.pad_token_id
    return target, 0 if pad is None else int(pad), data.train


class _StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class _CountingCollator:
    """Wraps a collator and records the real tokens of each batch, in the order they are built."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def _train_throughput(target, dataset, collator, args, work: Path, name: str, vocab) -> dict:
    torch.manual_seed(args.seed)
    overrides = {"num_draft_depths": args.num_draft_depths}
    if vocab is not None:
        overrides["draft_vocab_size"] = len(vocab)
    draft = Clover2ForDrafting.from_target(target, **overrides)
    if vocab is not None:
        draft.set_draft_vocab(vocab)
    counting = _CountingCollator(collator)
    clock = _StepClock()
    training_args = TrainingArguments(
        output_dir=str(work / f"trainer-{name}"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.95, warmup_steps=0,
        max_grad_norm=0.5, save_strategy="no", eval_strategy="no", logging_steps=args.steps + 1, bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, report_to=[], seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Clover2Trainer(model=draft, args=training_args, train_dataset=dataset, data_collator=counting,
                             target=target, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    w = args.warmup_steps
    if len(clock.ends) <= w:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup-steps ({w})")
    seconds = clock.ends[-1] - clock.ends[w - 1] if w > 0 else clock.ends[-1] - start
    tokens = sum(counting.tokens[w : len(clock.ends)])
    return {"tokens_per_s": tokens / seconds, "timed_steps": len(clock.ends) - w, "timed_tokens": tokens,
            "timed_seconds": seconds, "total_seconds": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=200, help="ShareGPT conversations (examples with --tiny)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per training measurement")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=1, help="conversations per training step")
    p.add_argument("--bf16", action="store_true", help="bf16 target and mixed-precision training (as clover2 train)")
    p.add_argument("--draft-vocab-size", type=int, default=None, help="truncated draft vocabulary (as clover2 train)")
    p.add_argument("--num-draft-depths", type=int, default=5)
    p.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--build-batch-size", type=int, default=4, help="conversations per target forward when building")
    p.add_argument("--shard-tokens", type=int, default=1 << 17)
    p.add_argument("--work-dir", default="/tmp/clover2_measure_features", help="store and trainer scratch (deleted)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (the store) afterwards")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + synthetic examples (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.tiny:
        target, pad, examples = _tiny_target_and_examples(args.conversations, args.max_length, args.seed)
        target.to(dtype)
    else:
        target, pad, examples = _real_target_and_examples(args.conversations, args.max_length, dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target.to(device)
    num_tokens = sum(len(ex["input_ids"]) for ex in examples)
    vocab = None
    if args.draft_vocab_size:
        counts = token_frequencies(examples, target.config.get_text_config().vocab_size)
        vocab = counts.argsort(descending=True, stable=True)[: args.draft_vocab_size]
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"{len(examples)} examples, {num_tokens} tokens (mean {num_tokens / max(len(examples), 1):.0f}); "
          f"device {device}, torch threads {torch.get_num_threads()}, target {'bf16' if args.bf16 else 'fp32'}",
          flush=True)

    results: dict = {"config": vars(args), "examples": len(examples), "tokens": num_tokens, "device": str(device),
                     "threads": torch.get_num_threads()}
    try:
        print("(a) training with on-the-fly features ...", flush=True)
        results["on_the_fly"] = _train_throughput(
            target, examples, ConversationCollator(pad_token_id=pad), args, work, "on_the_fly", vocab)

        print("(b) building the feature store ...", flush=True)
        start = time.perf_counter()
        manifest = build_feature_store(target, examples, work / "store", shard_tokens=args.shard_tokens,
                                       dtype=getattr(torch, args.store_dtype), batch_size=args.build_batch_size,
                                       progress=True)
        seconds = time.perf_counter() - start
        results["build"] = {"tokens_per_s": manifest["num_tokens"] / seconds, "seconds": seconds,
                            "bytes": manifest["bytes"], "bytes_per_token": manifest["bytes_per_token"],
                            "shards": manifest["num_shards"], "dtype": manifest["dtype"]}

        print("(c) training from the store ...", flush=True)
        store = FeatureDataset(work / "store")
        results["from_store"] = _train_throughput(
            target, store, FeatureCollator(pad_token_id=pad), args, work, "from_store", vocab)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    a, b, c = results["on_the_fly"]["tokens_per_s"], results["build"]["tokens_per_s"], results["from_store"]["tokens_per_s"]
    saving = 1 / a - 1 / c  # seconds per token per epoch saved by the store
    break_even = (1 / b) / saving if saving > 0 else None
    results["break_even_epochs"] = break_even
    bpt = results["build"]["bytes_per_token"]
    rows = [
        ("(a) train, on-the-fly features", a, "-"),
        (f"(b) build store ({results['build']['dtype']})", b,
         f"{results['build']['bytes'] / 2**20:.1f} MiB, {bpt:.0f} B/token"),
        ("(c) train from store", c, "-"),
    ]
    print()
    print(f"| {'variant':<34} | {'tokens/s':>9} | {'s / 1M tokens':>13} | disk |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 15}|------|")
    for name, tps, disk in rows:
        print(f"| {name:<34} | {tps:>9.1f} | {1e6 / tps:>13.0f} | {disk} |")
    print()
    print(f"store speed-up per training epoch: {c / a:.2f}x; disk: {bpt * 1e6 / 2**30:.2f} GiB per 1M tokens")
    if break_even is None:
        print("break-even: never (training from the store is not faster than on the fly here)")
    else:
        print(f"break-even: the store pays off after {break_even:.2f} epochs "
              f"(build {1e6 / b:.0f} s per 1M tokens; saves {1e6 * saving:.0f} s per 1M tokens per epoch)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
