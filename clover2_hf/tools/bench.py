"""Benchmark Clover-2 decoding against plain `generate()` on a question set (MT-Bench by default).

For every question (first turn, optionally both turns) the chat template is applied and plain greedy
`generate()` runs interleaved with each method in ONE process, so that all timings share the same
machine state:

* ``"clover2-tree"``: Clover-2 tree decoding (`generate(..., clover2_decoding="tree")`), with the drafter's
  config as it is (by default its tree carries a prompt-lookup path, `tree_lookup_tokens`);
* ``"clover2-tree-nolookup"``: the same with `tree_lookup_tokens = 0`: the drafter's tree alone;
* ``"clover2-chain"``: Clover-2 top-1 chain through transformers' assisted decoding (`"chain"`);
* ``"prompt-lookup"``: transformers' prompt lookup decoding (`prompt_lookup_num_tokens=`);
* ``"assisted"``: transformers' assisted generation with a smaller model sharing the tokenizer;
* ``"clover2-tree-static"``: tree decoding with static shapes (`clover2_static_shapes=True`);
* ``"plain-static"``: plain `generate()` with a static cache (`cache_implementation="static"`);
* ``"clover2-oracle-tauN"`` (N = 2..5): Clover-2 tree decoding whose lookup path is the target's own
  plain answer, N - 1 tokens per step (`clover2_hf.tools.oracle`): the loop's speed at tau ~N whatever
  the drafter's quality, e.g. on a target with random weights (`clover2 bench --random-target`);
* ``"clover2-oracle-static-tauN"``: the same with static shapes.

Graph mode: the static methods (``plain-static``, ``clover2-tree-static``, ``clover2-oracle-static-tauN``)
run compiled wherever plain `generate()` compiles a static cache: on CUDA by default (transformers' rule),
anywhere with `compile_config=` (`clover2 bench --compile`: `CompileConfig()` with transformers' switch for
every device). So a graph-captured Clover-2 step is compared with a graph-captured plain step
(``plain-static``), and both with eager plain decoding (``plain``). The first run of each compiled method
(the warm-up) pays the compilation.

A warm-up generation of every method comes first (not recorded). The order of plain and the methods
alternates from one question to the next (and from one repeat to the next), so slow drifts of the
machine (thermal, background load) hit both sides alike.

Measured per (question, turn, method) and aggregated per category and overall:

* ``new_tokens``: generated tokens (sum over the group);
* ``tau``: new tokens per target forward pass, prefill included (plain decoding: exactly 1.0). The
  target's forward calls are counted with a hook, the same way for every method;
  ``mean_accept_length`` (Clover-2 methods only, else None): tokens per verification pass, prefill
  excluded, as `Clover2Stats.tau` and the paper count it;
* ``median_tokens_per_s``: median over the group's items of new tokens / wall-clock seconds;
* ``speedup``: median tokens/s of the method / median tokens/s of plain generate (ratio of medians);
  ``speedup_paired``: median over items of the per-item ratio (method tokens/s / plain tokens/s);
* ``draft_share``: drafting time / total time (Clover-2: from `Clover2Stats`; assisted: time spent in
  the assistant's forward passes; prompt lookup: not measured, None);
* ``identical``: whether every output of the method equals plain greedy generate's, token for token.

All decoding is greedy. Times are wall-clock seconds (CUDA is synchronised around each call).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..generation.cost_model import auto_tree_settings, sync_device
from ..generation.stats import Clover2Stats
from .oracle import OracleLookup

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINE",
    "BENCH_OPTIONS",
    "BenchResult",
    "DEFAULT_METHODS",
    "METHODS",
    "Question",
    "QuestionFileError",
    "RunRecord",
    "STATIC_METHODS",
    "default_questions_path",
    "compile_on_any_device",
    "encode_chat",
    "load_questions",
    "run_benchmark",
    "summarize",
]

BASELINE = "plain"
# Clover-2 methods: the generate() option keywords of their runs (the drafter's config is not changed)
CLOVER2_METHODS = {
    "clover2-tree": {"clover2_decoding": "tree"},
    "clover2-tree-nolookup": {"clover2_decoding": "tree", "tree_lookup_tokens": 0},
    "clover2-chain": {"clover2_decoding": "chain"},
    "clover2-tree-static": {"clover2_decoding": "tree", "clover2_static_shapes": True},
}
ORACLE_PREFIX = "clover2-oracle-tau"
ORACLE_STATIC_PREFIX = "clover2-oracle-static-tau"
METHODS = ("clover2-tree", "clover2-tree-nolookup", "clover2-chain", "prompt-lookup", "assisted", "clover2-tree-static",
           "plain-static",
           *(f"{ORACLE_PREFIX}{tau}" for tau in range(2, 6)), *(f"{ORACLE_STATIC_PREFIX}{tau}" for tau in range(2, 6)))
STATIC_METHODS = ("plain-static", "clover2-tree-static", *(f"{ORACLE_STATIC_PREFIX}{tau}" for tau in range(2, 6)))
#: the Clover-2 options a benchmark may set for all its Clover-2 methods (`run_benchmark(clover2_options=)`)
BENCH_OPTIONS = ("tree_budget", "tree_top_k", "tree_lookup_tokens")
DEFAULT_METHODS = ("clover2-tree", "clover2-tree-nolookup", "clover2-chain", "prompt-lookup")
OVERALL = "overall"
_WARMUP_TOKENS = 8


def compile_on_any_device(config=None):
    """`config` (default `CompileConfig()`) with transformers' switch for compiling `generate()` on any device.

    Relies on the private `CompileConfig._compile_all_devices`, read by `_valid_auto_compile_criteria`; caught by
    tests/test_static_step.py's compiled-decoding tests (they compile on a CPU through it)."""
    from transformers import CompileConfig

    config = config if config is not None else CompileConfig()
    config._compile_all_devices = True
    return config


# --------------------------------------------------------------------------- questions


class QuestionFileError(ValueError):
    """A question file is missing, empty or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Question:
    """One benchmark question: MT-Bench's `{question_id, category, turns}`."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]


def default_questions_path() -> Path:
    """Path of the bundled MT-Bench question file (80 questions, 8 categories, 2 turns each)."""
    resource = importlib.resources.files("clover2_hf").joinpath("resources/mt_bench_questions.jsonl")
    return Path(str(resource))


def load_questions(
    path: str | os.PathLike[str] | None = None, num_questions: int | None = None, per_category: int | None = None
) -> list[Question]:
    """Read a JSONL question file: one `{"question_id", "category", "turns": [str, ...]}` object a line.

    Blank lines are skipped; other keys (e.g. MT-Bench's `reference`) are ignored.

    Args:
        path: the file; None reads the bundled MT-Bench questions (via `importlib.resources`).
        num_questions: keep only the first N questions (None: all), after `per_category`.
        per_category: keep only the first N questions of each category (None: all).

    Raises:
        QuestionFileError: the file is missing or unreadable, a line is not a JSON object, a key is
            missing or has the wrong type, a question id repeats, or the file holds no question.
            The message starts with `<file>:<line>:`.
    """
    if path is None:
        resource = default_questions_path()
        name = str(resource)
        try:
            text = resource.read_text(encoding="utf-8")
        except OSError as exc:
            raise QuestionFileError(f"{name}: cannot read the bundled question file: {exc}") from exc
    else:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise QuestionFileError(f"{name}: question file not found") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise QuestionFileError(f"{name}: cannot read the question file: {exc}") from exc
    if num_questions is not None and num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")

    questions: list[Question] = []
    seen: dict[int | str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionFileError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise QuestionFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("question_id", "category", "turns") if k not in obj]
        if missing:
            raise QuestionFileError(f"{where}: missing key(s) {', '.join(missing)}")
        qid, category, turns = obj["question_id"], obj["category"], obj["turns"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise QuestionFileError(f"{where}: question_id must be an integer or a string, got {qid!r}")
        if not isinstance(category, str) or not category:
            raise QuestionFileError(f"{where}: category must be a non-empty string, got {category!r}")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise QuestionFileError(f"{where}: turns must be a non-empty list of non-empty strings")
        if qid in seen:
            raise QuestionFileError(f"{where}: question_id {qid!r} repeats (first on line {seen[qid]})")
        seen[qid] = lineno
        questions.append(Question(qid, category, tuple(turns)))
    if per_category is not None:
        taken: dict[str, int] = {}
        kept = []
        for question in questions:
            taken[question.category] = taken.get(question.category, 0) + 1
            if taken[question.category] <= per_category:
                kept.append(question)
        questions = kept
    questions = questions[:num_questions]
    if not questions:
        raise QuestionFileError(f"{name}: the question file holds no question")
    return questions


def encode_chat(tokenizer, messages: Sequence[dict[str, str]], device: torch.device | str | None = None) -> torch.Tensor:
    """Apply the tokenizer's chat template with a generation prompt: messages -> [1, P] input ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template: the benchmark needs a chat model")
    enc = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    ids = enc["input_ids"]
    return ids.to(device) if device is not None else ids


# --------------------------------------------------------------------------- results


@dataclass
class RunRecord:
    """One (question, turn, method) measurement; times in seconds (median over repeats)."""

    question_id: int | str
    category: str
    turn: int  # 1 or 2
    method: str
    prompt_tokens: int
    new_tokens: int
    time_s: float
    times_s: list[float]
    target_forwards: int  # target forward calls, prefill included
    draft_time_s: float | None  # None: not measured for this method
    identical: bool  # output equals plain greedy generate's (always True for plain)
    tokens_per_step: list[int] = field(default_factory=list)  # Clover-2: tokens emitted per verification pass
    accepted_depths: list[int] = field(default_factory=list)  # Clover-2: accepted draft tokens per pass
    tree_settings: str | None = None  # Clover-2 tree methods: the settings used and where they came from

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_s if self.time_s > 0 else 0.0


@dataclass
class BenchResult:
    """Outcome of `run_benchmark`: settings, per-run records and the per-category summary.

    `summary[method][category]` (category `"overall"` included) holds: questions (question-turns
    measured), new_tokens, mean_new_tokens, tau, mean_accept_length, median_tokens_per_s, speedup,
    speedup_paired, draft_share, identical. See the module docstring for definitions and units.
    """

    settings: dict[str, Any]
    records: list[RunRecord]
    summary: dict[str, dict[str, dict[str, Any]]]

    @property
    def methods(self) -> list[str]:
        return [m for m in self.summary if m != BASELINE]

    @property
    def categories(self) -> list[str]:
        return list(next(iter(self.summary.values())).keys()) if self.summary else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "summary": self.summary,
            "records": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in self.records],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        """The result as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def table(self) -> str:
        """A plain-text table: one row per (method, category)."""
        header = ("method", "category", "n", "new tok", "tau", "tok/s", "speedup", "paired", "draft %", "identical")
        rows = [header]
        for method, per_cat in self.summary.items():
            for category, s in per_cat.items():
                rows.append((
                    method, category, str(s["questions"]), str(s["new_tokens"]), f"{s['tau']:.2f}",
                    f"{s['median_tokens_per_s']:.1f}", f"{s['speedup']:.2f}x", f"{s['speedup_paired']:.2f}x",
                    "-" if s["draft_share"] is None else f"{100 * s['draft_share']:.0f}",
                    "yes" if s["identical"] else "NO",
                ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def write_figures(self, output_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write PNG figures (matplotlib, Agg canvas) and return {name: path}.

        `speedup.png` (speedup per category per method) always; `acceptance_histogram.png` (tokens
        per verification pass) and `depth_acceptance.png` (share of passes that accepted at least d
        draft tokens, per depth d) when a Clover-2 method ran.
        """
        return _write_figures(self, Path(output_dir))


def _write_figures(result: BenchResult, output_dir: Path) -> dict[str, Path]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is in the `bench` extra
        raise ImportError("bench figures need matplotlib: pip install 'clover2-hf[bench]'") from exc
    output_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = output_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        written[name] = path

    methods = result.methods
    categories = result.categories
    fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * len(categories)), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        values = [result.summary[method][c]["speedup"] for c in categories]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, values, width=width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylabel("speedup (x plain generate)")
    ax.set_title("Speedup per category (ratio of median tokens/s)")
    ax.legend()
    save(fig, "speedup")

    clover = [m for m in methods if m.startswith("clover2-")]
    steps = {m: [n for r in result.records if r.method == m for n in r.tokens_per_step] for m in clover}
    steps = {m: v for m, v in steps.items() if v}
    if steps:
        longest = max(max(v) for v in steps.values())
        fig = Figure(figsize=(6.0, 4.0))
        ax = fig.add_subplot()
        width = 0.8 / len(steps)
        for i, (method, values) in enumerate(steps.items()):
            counts = [values.count(n) / len(values) for n in range(1, longest + 1)]
            xs = [n + (i - (len(steps) - 1) / 2) * width for n in range(1, longest + 1)]
            ax.bar(xs, counts, width=width, label=method)
        ax.set_xticks(range(1, longest + 1))
        ax.set_xlabel("tokens emitted per target verification pass (accepted drafts + 1)")
        ax.set_ylabel("share of passes")
        ax.set_title("Acceptance length")
        ax.legend()
        save(fig, "acceptance_histogram")

        fig = Figure(figsize=(6.0, 4.0))
        ax = fig.add_subplot()
        accepted_by_method = {m: [a for r in result.records if r.method == m for a in r.accepted_depths] for m in steps}
        deepest = max([result.settings.get("num_draft_depths") or 1, *(max(v, default=0) for v in accepted_by_method.values())])
        depths = list(range(1, deepest + 1))
        for method, accepted in accepted_by_method.items():
            if not accepted:
                continue
            rates = [sum(a >= d for a in accepted) / len(accepted) for d in depths]
            ax.plot(depths, rates, marker="o", label=method)
        ax.set_xlabel("draft depth d")
        ax.set_ylabel("share of passes accepting >= d draft tokens")
        ax.set_ylim(0.0, 1.0)
        ax.set_xticks(depths)
        ax.set_title("Accepted draft tokens by depth")
        ax.legend()
        save(fig, "depth_acceptance")
    return written


# --------------------------------------------------------------------------- measurement helpers


@contextlib.contextmanager
def _count_forwards(model) -> Iterator[list[int]]:
    """Counts `model`'s forward calls (counter[0])."""
    counter = [0]

    def hook(module, args, kwargs):
        counter[0] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextlib.contextmanager
def _time_forwards(model, device: torch.device) -> Iterator[list[float]]:
    """Accumulates the wall time of `model`'s forward calls in seconds (total[0])."""
    total = [0.0]
    start: list[float] = []

    def pre(module, args, kwargs):
        sync_device(device)
        start.append(time.perf_counter())

    def post(module, args, kwargs, output):
        sync_device(device)
        total[0] += time.perf_counter() - start.pop()

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Run:
    new_ids: list[int]
    time_s: float
    target_forwards: int
    draft_time_s: float | None
    stats: Clover2Stats | None


class _Runner:
    """Runs one greedy generation of one method and measures it."""

    def __init__(self, target, tokenizer, draft, assistant_model, prompt_lookup_num_tokens: int,
                 clover2_options: dict[str, Any], compile_config) -> None:
        self.target = target
        self.clover2_options = clover2_options
        self.compile_config = compile_config
        self.draft = draft
        self.assistant = assistant_model
        self.prompt_lookup_num_tokens = prompt_lookup_num_tokens
        self.device = target.device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.common = {"do_sample": False, "pad_token_id": pad}
        self._reference: tuple[tuple, list[int]] | None = None  # the last prompt's plain answer (oracle methods)

    def reference(self, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Plain greedy answer to `ids` (untimed; kept for the prompt's other oracle runs)."""
        key = (tuple(ids[0].tolist()), max_new_tokens)
        if self._reference is None or self._reference[0] != key:
            with torch.no_grad():
                out = self.target.generate(ids, **self.common, max_new_tokens=max_new_tokens,
                                           attention_mask=torch.ones_like(ids))
            self._reference = (key, out[0, ids.shape[1]:].tolist())
        return self._reference[1]

    def __call__(self, method: str, ids: torch.Tensor, max_new_tokens: int) -> _Run:
        kwargs: dict[str, Any] = dict(self.common, max_new_tokens=max_new_tokens,
                                      attention_mask=torch.ones_like(ids))
        stats = None
        oracle = contextlib.nullcontext()
        if method.startswith("clover2-"):  # the benchmark's options, then the method's own
            stats = Clover2Stats()
            kwargs.update(self.clover2_options, assistant_model=self.draft, clover2_stats=stats)
        if method in CLOVER2_METHODS:
            kwargs.update(CLOVER2_METHODS[method])
        elif method.startswith((ORACLE_PREFIX, ORACLE_STATIC_PREFIX)):
            static = method.startswith(ORACLE_STATIC_PREFIX)
            tau = int(method.removeprefix(ORACLE_STATIC_PREFIX if static else ORACLE_PREFIX))
            kwargs.update(clover2_decoding="tree", tree_lookup_tokens=tau - 1, clover2_static_shapes=static)
            oracle = OracleLookup()
            oracle.answer_for(ids.shape[1], self.reference(ids, max_new_tokens))
        if method in STATIC_METHODS and self.compile_config is not None:
            kwargs.update(compile_config=self.compile_config)
        if method == "plain-static":
            kwargs.update(cache_implementation="static")
        elif method == "prompt-lookup":
            kwargs.update(prompt_lookup_num_tokens=self.prompt_lookup_num_tokens)
        elif method == "assisted":
            kwargs.update(assistant_model=self.assistant)
        timing = _time_forwards(self.assistant, self.device) if method == "assisted" else contextlib.nullcontext([None])
        with torch.no_grad(), _count_forwards(self.target) as forwards, timing as assistant_time, oracle:
            sync_device(self.device)
            t0 = time.perf_counter()
            out = self.target.generate(ids, **kwargs)
            sync_device(self.device)
            elapsed = time.perf_counter() - t0
        if stats is not None:
            draft_time = stats.draft_time_s
        elif method in (BASELINE, "plain-static"):
            draft_time = 0.0
        else:
            draft_time = assistant_time[0]
        return _Run(out[0, ids.shape[1]:].tolist(), elapsed, forwards[0], draft_time, stats)


# --------------------------------------------------------------------------- the benchmark


def run_benchmark(
    target,
    tokenizer,
    draft=None,
    questions: Sequence[Question] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    max_new_tokens: int = 128,
    both_turns: bool = False,
    repeats: int = 1,
    assistant_model=None,
    prompt_lookup_num_tokens: int = 10,
    warmup: bool = True,
    progress: bool = True,
    clover2_options: dict[str, Any] | None = None,
    compile_config=None,
) -> BenchResult:
    """Run plain greedy `generate()` and each method on every question; see the module docstring.

    Args:
        target: the target causal LM (batch size 1, greedy).
        tokenizer: its tokenizer, with a chat template.
        draft: a `Clover2ForDrafting` attached to (or attachable to) `target`; needed by the
            ``clover2-*`` methods (each passes its options to `generate`; the drafter is not changed).
        questions: the question set (default: bundled MT-Bench, see `load_questions`).
        methods: any of `METHODS`; plain generate always runs as the baseline.
        max_new_tokens: generation length cap per answer.
        both_turns: also run the second turn, whose prompt holds the first turn's plain answer.
        repeats: timed runs per (question, turn, method); the median time is reported.
        assistant_model: the smaller same-tokenizer model of the ``assisted`` method.
        prompt_lookup_num_tokens: draft length of the ``prompt-lookup`` method.
        warmup: run each method once (8 new tokens, not recorded) before measuring.
        progress: show a tqdm progress bar on stderr.
        clover2_options: `generate()` options for every Clover-2 method, any of `BENCH_OPTIONS` (e.g.
            ``{"tree_budget": 4, "tree_top_k": 2}``); a method's own setting (the no-lookup and oracle methods'
            `tree_lookup_tokens`) wins.
        compile_config: a `transformers.CompileConfig` for the static methods (see "Graph mode" above).
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if any(m.startswith("clover2-") for m in methods) and draft is None:
        raise ValueError("the clover2-* methods need a Clover-2 drafter (draft=...)")
    if "assisted" in methods and assistant_model is None:
        raise ValueError("the 'assisted' method needs a smaller same-tokenizer model (assistant_model=...)")
    if max_new_tokens < 1 or repeats < 1:
        raise ValueError("max_new_tokens and repeats must be >= 1")
    clover2_options = dict(clover2_options or {})
    if set(clover2_options) - set(BENCH_OPTIONS):
        raise ValueError(f"clover2_options: unknown option(s) {', '.join(sorted(set(clover2_options) - set(BENCH_OPTIONS)))}; "
                         f"choose from {', '.join(BENCH_OPTIONS)}")
    questions = list(questions) if questions is not None else load_questions()
    if not questions:
        raise ValueError("no questions to benchmark")

    runner = _Runner(target, tokenizer, draft, assistant_model, prompt_lookup_num_tokens, clover2_options, compile_config)
    device = target.device
    all_methods = [BASELINE, *methods]
    records: list[RunRecord] = []
    turns_used = [min(len(q.turns), 2 if both_turns else 1) for q in questions]
    total = sum(turns_used) * len(all_methods) * repeats

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="clover2 bench", unit="run", disable=not progress)
    try:
        if warmup:
            logger.info("warm-up: %s", ", ".join(all_methods))
            ids = encode_chat(tokenizer, [{"role": "user", "content": questions[0].turns[0]}], device)
            for method in all_methods:
                runner(method, ids, min(_WARMUP_TOKENS, max_new_tokens))
        item = 0
        for question, n_turns in zip(questions, turns_used):
            messages: list[dict[str, str]] = []
            for turn in range(n_turns):
                messages.append({"role": "user", "content": question.turns[turn]})
                ids = encode_chat(tokenizer, messages, device)
                runs: dict[str, list[_Run]] = {m: [] for m in all_methods}
                for rep in range(repeats):
                    order = all_methods if (item + rep) % 2 == 0 else all_methods[::-1]
                    for method in order:
                        runs[method].append(runner(method, ids, max_new_tokens))
                        bar.update(1)
                reference = runs[BASELINE][0].new_ids
                for method in all_methods:
                    records.append(_record(question, turn + 1, method, ids.shape[1], runs[method], reference))
                bar.set_postfix_str(f"q{question.question_id} t{turn + 1}")
                item += 1
                answer = tokenizer.decode(reference, skip_special_tokens=True)
                messages.append({"role": "assistant", "content": answer})
    finally:
        bar.close()  # (each Clover-2 run restores the drafter config fields it set)

    settings = {
        "target": getattr(target, "name_or_path", "") or target.config.model_type,
        "draft": (getattr(draft, "name_or_path", "") or "<in-memory drafter>") if draft is not None else None,
        "assistant": (getattr(assistant_model, "name_or_path", "") or "<in-memory model>") if assistant_model is not None else None,
        "methods": methods,
        "baseline": BASELINE,
        "questions": len(questions),
        "categories": sorted({q.category for q in questions}),
        "max_new_tokens": max_new_tokens,
        "both_turns": both_turns,
        "repeats": repeats,
        "prompt_lookup_num_tokens": prompt_lookup_num_tokens,
        "clover2_options": clover2_options,
        "compile_config": repr(compile_config) if compile_config is not None else None,
        "tree_settings": auto_tree_settings(draft, target).describe() if draft is not None else None,
        "tree_budget": draft.config.tree_budget if draft is not None else None,
        "tree_lookup_tokens": draft.config.tree_lookup_tokens if draft is not None else None,
        "tree_lookup_ngram": draft.config.tree_lookup_ngram if draft is not None else None,
        "tree_top_k": draft.config.tree_top_k if draft is not None else None,
        "num_draft_depths": draft.config.num_draft_depths if draft is not None else None,
        "dtype": str(target.dtype).removeprefix("torch."),
        "draft_dtype": str(draft.dtype).removeprefix("torch.") if draft is not None else None,
        "device": _device_name(device),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
    }
    return BenchResult(settings, records, summarize(records, all_methods))


def _record(question: Question, turn: int, method: str, prompt_tokens: int, runs: list[_Run],
            reference: list[int]) -> RunRecord:
    first = runs[0]
    times = [r.time_s for r in runs]
    draft_times = [r.draft_time_s for r in runs]
    stats = first.stats
    return RunRecord(
        question_id=question.question_id,
        category=question.category,
        turn=turn,
        method=method,
        prompt_tokens=prompt_tokens,
        new_tokens=len(first.new_ids),
        time_s=statistics.median(times),
        times_s=times,
        target_forwards=first.target_forwards,
        draft_time_s=None if draft_times[0] is None else statistics.median(draft_times),
        identical=all(r.new_ids == reference for r in runs),
        tokens_per_step=list(stats.tokens_per_step) if stats is not None else [],
        accepted_depths=list(stats.accepted_depths) if stats is not None else [],
        tree_settings=(stats.tree_settings or None) if stats is not None else None,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def summarize(records: Sequence[RunRecord], methods: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Aggregate records per method and category (plus `"overall"`); see `BenchResult`."""
    categories = list(dict.fromkeys(r.category for r in records))
    baseline = {(r.question_id, r.turn): r for r in records if r.method == BASELINE}
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        summary[method] = {}
        for category in [*categories, OVERALL]:
            group = [r for r in records if r.method == method and category in (OVERALL, r.category)]
            base = [baseline[(r.question_id, r.turn)] for r in group]
            if not group:
                continue
            tps = statistics.median(r.tokens_per_s for r in group)
            base_tps = statistics.median(b.tokens_per_s for b in base)
            paired = [r.tokens_per_s / b.tokens_per_s for r, b in zip(group, base) if b.tokens_per_s > 0]
            total_time = sum(r.time_s for r in group)
            draft = None if any(r.draft_time_s is None for r in group) else sum(r.draft_time_s for r in group)
            new_tokens = sum(r.new_tokens for r in group)
            passes = [n for r in group for n in r.tokens_per_step]
            summary[method][category] = {
                "questions": len(group),
                "new_tokens": new_tokens,
                "mean_new_tokens": new_tokens / len(group),
                "tau": new_tokens / max(sum(r.target_forwards for r in group), 1),
                "mean_accept_length": sum(passes) / len(passes) if method.startswith("clover2-") and passes else None,
                "median_tokens_per_s": tps,
                "speedup": tps / base_tps if base_tps > 0 else 0.0,
                "speedup_paired": statistics.median(paired) if paired else 0.0,
                "draft_share": None if draft is None else (draft / total_time if total_time > 0 else 0.0),
                "identical": all(r.identical for r in group),
            }
    return summary
