"""Hardware-aware tree budget and top-k for Clover-2 tree decoding (`clover2 tune`).

One tree-decoding step drafts a tree of `b` nodes (budget b, each expanded node gets its top-k
children) and verifies it in one target forward over q = b + 1 tokens (root + nodes). A larger
tree accepts more tokens per step but costs more: on a GPU a forward over 1..~64 tokens costs nearly
the same, on a CPU cost grows about linearly with q. The best (b, k) is therefore a property of the
target, the drafter AND the device.

Cost model (all times in seconds, measured on the current device, median of `repeats` runs):

    step_time(b, k)  = draft_time(b, k) + verify_time(min(b, nodes(k)) + 1)
    tokens_per_s(b, k) = tokens_per_step(b, k) / step_time(b, k)

* ``verify_time(q)``: one target forward over q new tokens with the tree attention mask, on top of
  a KV cache of `context_length` tokens (default: mean calibration prompt length + max_new_tokens/2),
  including building the mask. Tabulated at exactly the q values needed, not fitted.
* ``draft_time(b, k)``: one drafting phase: the augmenting block over `augment_tokens` (3) newly
  verified tokens on top of a drafter cache of `context_length` tokens, head depth 0, and
  `build_tree` with top_k = k. The drafter expands k nodes per depth whatever the budget (the budget
  only selects which generated nodes are kept), except that no depth beyond the budget is grown; so
  it is measured per k, and again per budget below the number of draft depths. nodes(k) = k + (N - 1) k^2 is the number of nodes the drafter generates (N = draft depths).
* ``tokens_per_step(b, k)``: expected tokens emitted per verification pass (accepted drafts + the
  bonus token), from calibration: for each calibration prompt the target's greedy continuation is
  generated with plain `generate`; the drafter is run teacher-forced along it, and at every position
  the tree for each k is grown to its full size; a node of that tree is in the budget-b tree iff its
  rank in `build_tree`'s selection order is < b. Greedy tree decoding follows the same trajectory,
  so replaying it (start at the first new token, accept the longest tree path that matches the
  continuation, jump past the bonus token) gives the exact number of steps the real decoder takes
  for every (b, k) at once (up to floating-point differences between the teacher-forced and
  incremental drafter). tokens_per_step = emitted tokens / steps, summed over prompts.

Overheads that the model leaves out: the host-side tree walk and cache compaction (small, roughly
proportional to the accepted length) and the prefill. The prompt-lookup path that tree decoding adds
on top of the drafter's tree (`tree_lookup_tokens`) is left out too: it comes only on steps whose
context repeats, with its own tokens and verification cost, so the model tunes the drafter's tree
alone and the lookup path's gain (measured by `clover2 bench`: clover2-tree vs clover2-tree-nolookup)
comes on top.

The choice is stored per (target, dtype, device) in ``<cache root>/tuning.json`` (cache root:
``$CLOVER2_HF_CACHE``, else ``$XDG_CACHE_HOME/clover2_hf``, else ``~/.cache/clover2_hf``), together
with the measured verification costs. `generate` reads it only for tree settings that are ``"auto"``
(`clover2_hf.generation.cost_model.auto_tree_settings`); a drafter's config is never changed. `tune` does not store
a choice from noisy timings or one predicted slower than plain decoding (see `tune`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..generation.cost_model import (
    TUNING_DISABLE_ENV_VAR,
    device_key,
    entry_key,
    interleaved_samples,
    load_tuned_settings,
    measure_verify_samples,
    CpuUsage,
    device_costs,
    measure_verify_time,
    read_entries,
    timing_spread,
    target_key,
    tuning_file,
    write_entries,
)
from ..generation.capture import PreNormCapture
from ..generation.tree_step import grow_tree
from ..tree import DraftTree

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_TOP_KS",
    "TUNING_DISABLE_ENV_VAR",
    "TuneResult",
    "choose_tree_settings",
    "cpu_has_bf16_matmul",
    "default_draft_dtype",
    "device_key",
    "load_tuned_settings",
    "measure_draft_time",
    "measure_tokens_per_step",
    "measure_verify_time",
    "remove_tuned_settings",
    "save_tuned_settings",
    "stored_settings",
    "target_key",
    "tree_nodes",
    "tune",
    "tuning_file",
]

DEFAULT_BUDGETS: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 48, 64, 96)
DEFAULT_TOP_KS: tuple[int, ...] = (2, 4, 6, 8, 10)


# --------------------------------------------------------------------------- drafter precision


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_draft_dtype(device: torch.device | str, target_dtype: torch.dtype) -> torch.dtype:
    """The drafter's dtype when the user names none: bfloat16 on a CPU with bf16 matrix instructions
    (even for a float32 target), else the target's dtype.

    Only the drafter's precision changes: every emitted token is still the target's own choice, so the
    output stays identical. Why: float32 matrix products of a few rows can be slow on such CPUs while
    bf16 ones run on the bf16 units (docs/kernel_measurements.md).
    """
    if torch.device(device).type == "cpu" and target_dtype == torch.float32 and cpu_has_bf16_matmul():
        return torch.bfloat16
    return target_dtype


# --------------------------------------------------------------------------- keys and storage


def save_tuned_settings(result: TuneResult, target, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Store `result`'s choice for (target, dtype, device) in the tuning file (atomic write). Returns its path."""
    path = tuning_file(cache_dir)
    entries = dict(read_entries(path))
    entries[entry_key(target)] = {
        "tree_budget": result.budget,
        "tree_top_k": result.top_k,
        "expected_tokens_per_step": result.expected_tokens_per_step,
        "expected_tokens_per_s": result.expected_tokens_per_s,
        "expected_speedup": result.expected_speedup,
        "context_length": result.context_length,
        "verify_time_s": {str(q): t for q, t in result.verify_time_s.items()},
        "wide_linear": result.wide_linear,
        "draft": result.draft,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_entries(path, entries)
    return path


# --------------------------------------------------------------------------- measurements


def tree_nodes(top_k: int, num_depths: int) -> int:
    """Nodes the dynamic tree generates before the budget cut: k + (N - 1) k^2."""
    return top_k + (num_depths - 1) * top_k * top_k


@torch.no_grad()
def measure_draft_time(draft, top_ks: Sequence[int], context_length: int = 256, augment_tokens: int = 3,
                       repeats: int = 5, seed: int = 0, budget: int | None = None,
                       timer: Callable[[], float] = time.perf_counter,
                       progress: Callable[[], None] | None = None, samples: dict | None = None) -> dict[int, float]:
    """Seconds of one drafting phase for each top_k (see the module docstring), on the drafter's device:
    the minimum over `repeats` interleaved rounds (`samples`, when given, receives every timing).

    `budget` None grows the whole tree (all draft depths); a budget below the number of depths stops
    growing at depth `budget`, as `build_tree` does."""
    device = draft.fc1.weight.device
    dtype = draft.fc1.weight.dtype
    vocab = draft.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    cache = draft.new_cache()
    draft.augment(torch.randn(1, max(context_length, 1), draft.feature_width, generator=g).to(device, dtype),
                  torch.randint(0, vocab, (1, max(context_length, 1)), generator=g).to(device), cache=cache)
    states = torch.randn(1, augment_tokens, draft.feature_width, generator=g).to(device, dtype)
    ids = torch.randint(0, vocab, (1, augment_tokens), generator=g).to(device)
    steps = {}
    for k in sorted(set(int(k) for k in top_ks)):
        nodes = budget if budget is not None else tree_nodes(k, draft.config.num_draft_depths)

        def step(k=k, budget=nodes) -> None:
            augmented = draft.augment(states, ids, cache=cache)
            grow_tree(draft, int(ids[0, -1]), augmented[0, -1], k, budget)
            cache.crop(-augment_tokens)

        steps[k] = step
    timings = interleaved_samples(steps, device, repeats, timer, progress)
    if samples is not None:
        samples.update(timings)
    return {k: min(ts) for k, ts in timings.items()}


def _selection_ranks(tree: DraftTree) -> list[int]:
    """rank[m] of node m (verify index m + 1) in `build_tree`'s budget order: the budget-b tree keeps rank < b."""
    by_depth = torch.sort(tree.depths.cpu(), stable=True).indices
    order = by_depth[torch.sort(tree.scores.cpu()[by_depth], descending=True, stable=True).indices]
    ranks = [0] * tree.num_nodes
    for rank, m in enumerate(order.tolist()):
        ranks[m] = rank
    return ranks


@torch.no_grad()
def measure_tokens_per_step(target, draft, prompts: Sequence[torch.Tensor], budgets: Sequence[int],
                            top_ks: Sequence[int], max_new_tokens: int = 64,
                            as_totals: bool = False) -> dict[tuple[int, int], Any]:
    """Expected tokens per verification pass for every (budget, top_k), by greedy replay (module docstring).

    Args:
        prompts: 1-D (or [1, P]) token id tensors, e.g. chat-templated questions.
    Returns:
        {(budget, top_k): tokens per step}; a (budget, top_k) with budget > nodes(top_k) is the full tree.
        With `as_totals`, {(budget, top_k): [tokens, steps]} instead (to sum over calls).
    """
    draft.attach_target(target)
    device = target.device
    draft_device = draft.fc1.weight.device
    totals = {(b, k): [0, 0] for b in budgets for k in top_ks}  # [tokens, steps]
    for prompt in prompts:
        prompt = prompt.reshape(1, -1).to(device)
        seq = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=max_new_tokens)
        P, L = prompt.shape[1], seq.shape[1]
        if L - P < 2:
            continue  # nothing to draft after the first new token
        capture = PreNormCapture(target, draft.config.feature_layers)
        try:
            target(input_ids=seq)
            hidden = capture.hidden  # [1, L, H] pre-norm states
        finally:
            capture.remove()
        # augmented[j] reads h_j and token seq[j + 1]: the root state of the tree rooted at seq[j + 1]
        augmented = draft.augment(hidden[:, :-1].to(draft_device), seq[:, 1:].to(draft_device))[0]
        tokens = seq[0].tolist()
        # accepted[k][r - P] = selection ranks of the matched path of the tree rooted at position r
        paths: dict[int, list[list[int]]] = {k: [] for k in top_ks}
        for r in range(P, L - 1):
            for k in top_ks:
                tree = grow_tree(draft, tokens[r], augmented[r - 1], k, tree_nodes(k, draft.config.num_draft_depths))
                ranks, children = _selection_ranks(tree), tree.children()
                node, matched = 0, []
                for nxt in tokens[r + 1:]:
                    child = children[node].get(nxt)
                    if child is None:
                        break
                    matched.append(ranks[child - 1])
                    node = child
                paths[k].append(matched)
        for b in budgets:
            for k in top_ks:
                r = P
                while r < L - 1:
                    accepted = 0
                    for rank in paths[k][r - P]:
                        if rank >= b:
                            break
                        accepted += 1
                    emitted = min(accepted + 1, L - 1 - r)
                    totals[(b, k)][0] += emitted
                    totals[(b, k)][1] += 1
                    r += emitted
    if as_totals:
        return totals
    if all(steps == 0 for _, steps in totals.values()):
        raise ValueError("calibration produced no decoding step: use longer generations or more prompts")
    return {key: tokens / steps for key, (tokens, steps) in totals.items()}


# --------------------------------------------------------------------------- the choice


@dataclass
class TuneResult:
    """The chosen tree settings and the numbers behind them (times in seconds)."""

    budget: int
    top_k: int
    expected_tokens_per_step: float
    expected_step_time_s: float
    expected_tokens_per_s: float
    baseline_tokens_per_s: float | None  # 1 / verify_time(1): plain decoding's cost model, if measured
    grid: list[dict[str, float]]  # every candidate: budget, top_k, tokens_per_step, draft_time_s, verify_time_s, tokens_per_s
    context_length: int | None = None
    verify_time_s: dict[int, float] = field(default_factory=dict)
    draft_time_s: dict[str, float] = field(default_factory=dict)  # "k", or "k@budgetB" for budgets < depths
    target: str | None = None
    device: str | None = None
    draft: str | None = None
    noise: float | None = None  # median over timed points of (median sample / min sample - 1)
    other_cpu_load: float | None = None  # CPU cores other processes kept busy while timing (CPU only)
    stored: bool = False
    wide_linear: bool = False  # the verification timings ran float32 CPU linears as W @ x^T
    refused: str | None = None  # why the choice was not stored (noise, or predicted slower than plain)

    @property
    def expected_speedup(self) -> float | None:
        """Modelled tokens/s over plain decoding's 1 / verify_time(1); None when q = 1 was not measured."""
        if not self.baseline_tokens_per_s:
            return None
        return self.expected_tokens_per_s / self.baseline_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["expected_speedup"] = self.expected_speedup
        out["verify_time_s"] = {str(k): v for k, v in self.verify_time_s.items()}
        out["draft_time_s"] = {str(k): v for k, v in self.draft_time_s.items()}
        return out

    def table(self, rows: int = 10) -> str:
        """The `rows` best candidates as text, best first."""
        best = sorted(self.grid, key=lambda g: -g["tokens_per_s"])[:rows]
        lines = [f"{'budget':>6} {'top_k':>5} {'tok/step':>8} {'draft ms':>8} {'verify ms':>9} {'tok/s':>8}"]
        for g in best:
            lines.append(f"{g['budget']:>6d} {g['top_k']:>5d} {g['tokens_per_step']:>8.2f} "
                         f"{1e3 * g['draft_time_s']:>8.2f} {1e3 * g['verify_time_s']:>9.2f} {g['tokens_per_s']:>8.1f}")
        return "\n".join(lines)


def choose_tree_settings(
    budgets: Sequence[int],
    top_ks: Sequence[int],
    tokens_per_step: Callable[[int, int], float],
    draft_time: Callable[[int, int], float],
    verify_time: Callable[[int], float],
    max_nodes: Callable[[int], int] | None = None,
) -> TuneResult:
    """Pick the (budget, top_k) maximising tokens_per_step(b, k) / (draft_time(b, k) + verify_time(q)).

    q = min(b, max_nodes(k)) + 1 tokens are verified (root + kept nodes). Candidates with
    b > max_nodes(k) are skipped (the same tree as a smaller budget), unless no budget fits that k.
    Ties go to the smaller budget, then the smaller k.
    """
    grid: list[dict[str, float]] = []
    for k in sorted(set(top_ks)):
        cap = max_nodes(k) if max_nodes is not None else None
        ks_budgets = sorted(set(budgets))
        fitting = [b for b in ks_budgets if cap is None or b <= cap]
        for b in fitting or [min(ks_budgets)]:
            q = (min(b, cap) if cap is not None else b) + 1
            tps, dt, vt = float(tokens_per_step(b, k)), float(draft_time(b, k)), float(verify_time(q))
            step = dt + vt
            grid.append({"budget": b, "top_k": k, "tokens_per_step": tps, "draft_time_s": dt, "verify_time_s": vt,
                         "tokens_per_s": tps / step if step > 0 else float("inf")})
    if not grid:
        raise ValueError("no candidate (budget, top_k): give at least one budget and one top_k")
    best = max(grid, key=lambda g: (g["tokens_per_s"], -g["budget"], -g["top_k"]))
    return TuneResult(
        budget=int(best["budget"]),
        top_k=int(best["top_k"]),
        expected_tokens_per_step=best["tokens_per_step"],
        expected_step_time_s=best["draft_time_s"] + best["verify_time_s"],
        expected_tokens_per_s=best["tokens_per_s"],
        baseline_tokens_per_s=None,
        grid=grid,
    )


#: `tune` refuses to store when the timings spread more than this between rounds (median/min - 1) ...
NOISE_LIMIT = 0.15
#: ... or when other processes kept more than this many CPU cores busy while it timed (CPU targets).
OTHER_LOAD_LIMIT = 0.25


def tune(
    target,
    draft,
    prompts: Sequence[torch.Tensor],
    *,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    top_ks: Sequence[int] = DEFAULT_TOP_KS,
    max_new_tokens: int = 64,
    context_length: int | None = None,
    repeats: int = 5,
    tokens_per_step_fn: Callable[[int, int], float] | None = None,
    draft_time_fn: Callable[[int, int], float] | None = None,
    verify_time_fn: Callable[[int], float] | None = None,
    save: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    noise_limit: float = NOISE_LIMIT,
    other_load_limit: float = OTHER_LOAD_LIMIT,
    progress: bool = False,
) -> TuneResult:
    """Measure the cost model on this device, pick (budget, top_k) and (by default) store it.

    Timings are taken in interleaved rounds and summarised by their minimum (load only adds time).
    The choice is NOT stored, and `result.refused` says why, when the rounds disagree by more than
    `noise_limit` (median/min - 1), when other processes kept more than `other_load_limit` CPU cores
    busy during the timings (CPU targets), or when the best tree is predicted slower than plain
    decoding (a stale record for this target and device is then removed, so `generate` sizes trees
    per step again).

    Args:
        target, draft: the target and its Clover-2 drafter (dynamic tree), on the device to tune for.
        prompts: calibration prompts (token id tensors), e.g. a few chat-templated MT-Bench questions.
        budgets, top_ks: candidate tree budgets and top-k values.
        max_new_tokens: length of each calibration continuation.
        context_length: KV-cache length for the timing runs (default: mean prompt length + max_new_tokens / 2).
        repeats: interleaved timing rounds per measured point.
        tokens_per_step_fn, draft_time_fn, verify_time_fn: replace a measured part of the cost model
            (tests, or a model of another device); signatures as in `choose_tree_settings`.
        save: store the choice in the tuning file for (target, dtype, device).
        cache_dir: cache root of the tuning file (default: see `clover2_hf.generation.cost_model.tuning_file`).
        timer: clock in seconds for the timings (injectable for tests).
        progress: show a progress bar (with ETA) over calibration prompts and timed passes.
    """
    if draft.config.tree_type != "dynamic":
        raise ValueError("tuning chooses a dynamic tree's budget and top_k; this drafter uses a static tree")
    budgets, top_ks = sorted(set(budgets)), sorted(set(top_ks))
    if not budgets or not top_ks or min(budgets) < 1 or min(top_ks) < 1:
        raise ValueError("budgets and top_ks must be non-empty lists of integers >= 1")
    draft.attach_target(target)
    depths = draft.config.num_draft_depths

    def max_nodes(k: int) -> int:
        return tree_nodes(k, depths)

    if context_length is None:
        lengths = [int(p.numel()) for p in prompts] or [128]
        context_length = int(sum(lengths) / len(lengths)) + max_new_tokens // 2
    qs = sorted({1} | {min(b, max_nodes(k)) + 1 for b in budgets for k in top_ks})
    short = sorted({b for b in budgets if b < depths})
    total = ((len(prompts) if tokens_per_step_fn is None else 0)
             + (len(qs) * repeats if verify_time_fn is None else 0)
             + (len(top_ks) * repeats * (1 + len(short)) if draft_time_fn is None else 0))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="clover2 tune", unit="step", disable=not progress, leave=False)
    verify_table: dict[int, float] = {}
    draft_table: dict[str, float] = {}
    wide_linear = False
    samples: dict[Any, list[float]] = {}
    usage = CpuUsage()
    try:
        if tokens_per_step_fn is None:
            logger.info("calibrating acceptance on %d prompt(s), %d new tokens each", len(prompts), max_new_tokens)
            if not prompts:
                raise ValueError("tune needs at least one calibration prompt (or tokens_per_step_fn)")
            measured: dict[tuple[int, int], list[float]] = {}
            per_prompt = []
            for prompt in prompts:
                per_prompt.append(measure_tokens_per_step(target, draft, [prompt], budgets, top_ks, max_new_tokens,
                                                          as_totals=True))
                bar.update(1)
            for key in per_prompt[0]:
                measured[key] = [sum(t[key][0] for t in per_prompt), sum(t[key][1] for t in per_prompt)]
            if all(steps == 0 for _, steps in measured.values()):
                raise ValueError("calibration produced no decoding step: use longer generations or more prompts")

            def tokens_per_step_fn(b: int, k: int) -> float:
                tokens, steps = measured[(b, k)]
                return tokens / steps if steps else 1.0
        with usage:
            if verify_time_fn is None:
                logger.info("timing target forwards over %d token counts at context %d", len(qs), context_length)
                wide = bool(known.wide_linear) if (known := device_costs(target, cache_dir, calibrate=False)) else False
                verify_samples = measure_verify_samples(target, qs, context_length, repeats, timer=timer,
                                                        progress=lambda: bar.update(1), wide_linear=wide)
                wide_linear = wide
                samples.update({("verify", q): ts for q, ts in verify_samples.items()})
                verify_table = {q: min(ts) for q, ts in verify_samples.items()}
                verify_time_fn = verify_table.__getitem__
            if draft_time_fn is None:
                logger.info("timing the drafter for top_k in %s", top_ks)
                # budgets below the depth count grow fewer depths (see build_tree): timed apart
                tables = {}
                for b in [None, *short]:
                    draft_samples: dict = {}
                    tables[b] = measure_draft_time(draft, top_ks, context_length, repeats=repeats, budget=b,
                                                   timer=timer, progress=lambda: bar.update(1), samples=draft_samples)
                    samples.update({("draft", b, k): ts for k, ts in draft_samples.items()})
                draft_table = {f"{k}" if b is None else f"{k}@budget{b}": t for b, table in tables.items()
                               for k, t in table.items()}

                def draft_time_fn(b: int, k: int) -> float:
                    return tables[b if b < depths else None][k]
    finally:
        bar.close()

    result = choose_tree_settings(budgets, top_ks, tokens_per_step_fn, draft_time_fn, verify_time_fn, max_nodes)
    try:
        base = float(verify_time_fn(1))
        result.baseline_tokens_per_s = 1.0 / base if base > 0 else None
    except (KeyError, ValueError):
        result.baseline_tokens_per_s = None
    result.context_length = context_length
    result.verify_time_s, result.draft_time_s = verify_table, draft_table
    result.target, result.device = target_key(target), device_key(target.device)
    result.draft = getattr(draft, "name_or_path", "") or None
    result.wide_linear = wide_linear
    result.noise = timing_spread(samples) if samples else None
    if samples and target.device.type == "cpu":
        result.other_cpu_load = usage.other_cores

    if result.noise is not None and result.noise > noise_limit:
        result.refused = (f"the timings varied by {100 * result.noise:.0f}% between rounds (limit "
                          f"{100 * noise_limit:.0f}%): another process is probably using this device; "
                          "rerun `clover2 tune` on a quiet machine")
    elif result.other_cpu_load is not None and result.other_cpu_load > other_load_limit:
        result.refused = (f"other processes kept {result.other_cpu_load:.1f} CPU cores busy while timing (limit "
                          f"{other_load_limit:.2f}): rerun `clover2 tune` on a quiet machine")
    elif result.expected_speedup is not None and result.expected_speedup < 1.0:
        result.refused = (f"the best tree (budget {result.budget}, top-k {result.top_k}) is predicted slower than "
                          f"plain decoding ({result.expected_speedup:.2f}x); generate() keeps sizing trees per step")
        if save:
            removed = remove_tuned_settings(target, cache_dir)
            if removed:
                result.refused += "; the earlier stored choice for this target and device was removed"
    if save and result.refused is None:
        path = save_tuned_settings(result, target, cache_dir)
        result.stored = True
        logger.info("stored tree_budget=%d tree_top_k=%d for %s in %s", result.budget, result.top_k,
                    entry_key(target), path)
    return result


def stored_settings(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Every record of the tuning file ({"<target> [dtype] @ <device>": record}); {} when there is none."""
    return dict(read_entries(tuning_file(cache_dir)))


def remove_tuned_settings(target=None, cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Remove `target`'s record on its current device (or, with `target` None, every record); returns
    how many records were removed."""
    path = tuning_file(cache_dir)
    entries = dict(read_entries(path))
    if target is None:
        removed = len(entries)
        if path.exists():
            path.unlink()
        return removed
    if entry_key(target) not in entries:
        return 0
    del entries[entry_key(target)]
    write_entries(path, entries)
    return 1
