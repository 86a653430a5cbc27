"""What a verification pass costs on this device, and how much of a drafted tree is worth verifying.

Clover-2 pays only when a step (drafting + one target pass over q = 1 + nodes tokens) emits more
tokens per second than plain decoding (one pass over 1 token). How the pass cost grows with q is a
property of the target and the device (nearly flat up to tens of tokens on a GPU, steep on a CPU), so
a tree that wins on one machine loses on another. This module holds:

* `measure_verify_time`: the cost of one verification forward over q tokens, timed as tree decoding
  runs it (tree mask, positions context + depth, the CPU kernel switches), in interleaved rounds;
* `DeviceCosts` / `device_costs`: that table for a (target, dtype, device), measured once on first use
  and cached in ``<cache root>/calibration.json``, or taken from `clover2 tune`'s record;
* `TreeSizer`: the per-step policy used when `tree_budget` is ``"auto"``: from the drafter's own path
  probabilities it predicts how many tokens each node adds, keeps the prefix of the tree (best nodes
  first) that maximises predicted tokens per second of verification, verifies the root alone (a plain
  step) when no tree beats that, and stops drafting for a while when drafting itself does not pay;
* the tuning file's reader (`load_tuned_settings`): `clover2 tune` writes it, and it may only fill in
  settings that are ``"auto"``.

Which tree is verified never changes which tokens are emitted (every emitted token is the target's
own choice), only how many come per pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from .._files import cache_root, write_json_atomic
from ..modeling_clover2 import CACHE_KWARG
from ..tree import DraftTree
from .cpu_kernels import CpuMaskedGqa, CpuVerifyLinears, target_mask_kwargs

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_TOKENS",
    "AcceptanceModel",
    "CpuUsage",
    "DeviceCosts",
    "TUNING_DISABLE_ENV_VAR",
    "TreeSizer",
    "auto_tree_settings",
    "device_costs",
    "device_key",
    "interleaved_samples",
    "load_tuned_settings",
    "measure_verify_samples",
    "measure_verify_time",
    "sync_device",
    "target_key",
    "timing_spread",
    "tuning_file",
]

#: Token counts q timed by the first-use calibration (1 = a plain decoding step).
CALIBRATION_TOKENS: tuple[int, ...] = (1, 2, 3, 5, 9, 17, 33, 65)
CALIBRATION_FILENAME = "calibration.json"
#: The first-use calibration is not cached when its rounds disagree by more than this (median/min - 1) ...
CALIBRATION_NOISE_LIMIT = 0.15
#: ... or when other processes kept more than this many CPU cores busy while it timed.
CALIBRATION_LOAD_LIMIT = 0.25
TUNING_FILENAME = "tuning.json"
#: Set to "0" to ignore the tuning file (e.g. for reproducible benchmarks).
TUNING_DISABLE_ENV_VAR = "CLOVER2_HF_TUNING"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- keys and files


def target_key(target) -> str:
    """Identity of a target for the tuning and calibration files: its name or path (else an
    architecture fingerprint) and dtype."""
    config = target.config.get_text_config()
    name = getattr(target, "name_or_path", "") or (
        f"{config.model_type}-h{config.hidden_size}-l{config.num_hidden_layers}-v{config.vocab_size}"
    )
    return f"{name} [{str(target.dtype).removeprefix('torch.')}]"


def device_key(device: torch.device | str) -> str:
    """Identity of a device: the CUDA device name, or CPU architecture and torch thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{platform.machine()}:{_cpu_model()}:{torch.get_num_threads()}threads"
    return device.type


def _cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), so that two kinds of CPU never share a cost table."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def entry_key(target) -> str:
    """The key of `target` on its current device in the tuning and calibration files."""
    return f"{target_key(target)} @ {device_key(target.device)}"


def tuning_file(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The tuning JSON written by `clover2 tune`: ``<cache root>/tuning.json``.

    Cache root: `cache_dir`, else ``$CLOVER2_HF_CACHE``, else ``$XDG_CACHE_HOME/clover2_hf``, else
    ``~/.cache/clover2_hf``."""
    return cache_root(cache_dir) / TUNING_FILENAME


def calibration_file(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The first-use calibration JSON: ``<cache root>/calibration.json``."""
    return cache_root(cache_dir) / CALIBRATION_FILENAME


_FILE_CACHE: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def read_entries(path: Path) -> dict[str, Any]:
    """The entries ({key: record}) of a tuning or calibration file; {} when absent or unreadable (warned)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _FILE_CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable Clover-2 file %s (%s)", path, exc)
        entries = {}
    _FILE_CACHE[path] = (stamp, entries)
    return entries


def write_entries(path: Path, entries: dict[str, Any]) -> None:
    """Replace the entries of a tuning or calibration file (atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"version": _FORMAT_VERSION, "entries": entries}, tmp_prefix=f".{path.stem}-")


def tuning_disabled() -> bool:
    return os.environ.get(TUNING_DISABLE_ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off")


def load_tuned_settings(draft, target, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """`clover2 tune`'s stored record for `target` (name, dtype) on its current device, or None.

    The record holds `tree_budget`, `tree_top_k`, the measured `verify_time_s` table, ... . A record
    tuned with another drafter is still returned (the budget mostly depends on the device), with a
    debug log. None when ``$CLOVER2_HF_TUNING=0``.
    """
    if tuning_disabled():
        return None
    record = read_entries(tuning_file(cache_dir)).get(entry_key(target))
    if record is None:
        return None
    budget, top_k = record.get("tree_budget"), record.get("tree_top_k")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (budget, top_k)):
        logger.warning("ignoring malformed Clover-2 tuning record for %s: %r", entry_key(target), record)
        return None
    name = getattr(draft, "name_or_path", "") or None
    if record.get("draft") not in (None, name):
        logger.debug("Clover-2 tuning record was measured with drafter %s, using it for %s", record.get("draft"), name)
    return dict(record)


# --------------------------------------------------------------------------- timing verification passes


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a host clock brackets it; a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def binary_tree(num_nodes: int, device: torch.device) -> DraftTree:
    """A tree of `num_nodes` draft nodes (verify index v has parent v // 2), for timing only."""
    verify = torch.arange(1, num_nodes + 1)
    parents = verify // 2
    depths = torch.zeros(num_nodes, dtype=torch.long)
    for m in range(num_nodes):
        depths[m] = 1 if parents[m] == 0 else depths[parents[m] - 1] + 1
    return DraftTree(root_token=0, tokens=torch.zeros(num_nodes, dtype=torch.long, device=device),
                     parents=parents.to(device), depths=depths.to(device), scores=torch.zeros(num_nodes, device=device))


@torch.no_grad()
def measure_verify_samples(target, num_tokens: Sequence[int], context_length: int = 256, rounds: int = 5,
                           seed: int = 0, timer: Callable[[], float] = time.perf_counter,
                           progress: Callable[[], None] | None = None,
                           stop_ratio: float | None = None, wide_linear: bool = False) -> dict[int, list[float]]:
    """Seconds of one target verification forward over q tokens, `rounds` samples for each q.

    Each forward uses a tree attention mask (a binary tree of q - 1 nodes) and positions context +
    depth on top of a KV cache of `context_length` random tokens, with the same CPU kernel switches as
    tree decoding; q = 1 is a plain decoding step (no mask, no switches, as plain decoding runs it).
    The q values are timed in interleaved rounds (every q once per round, after one warm-up round),
    so a burst of load from another process hits all of them alike instead of one q. `timer` returns
    seconds (injectable for tests); `progress` is called after every timed forward. With `stop_ratio`,
    the warm-up round stops at the first q whose pass costs more than `stop_ratio` 1-token passes, and
    larger q are not timed (`DeviceCosts` extrapolates). `wide_linear`: run float32 CPU linears of
    the tree passes as W @ x^T (`CpuVerifyLinears`).
    """
    device = target.device
    vocab = target.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, vocab, (1, max(context_length, 1)), generator=g).to(device)
    cache = DynamicCache(config=target.config)
    cache.activate_past_recording()
    target(input_ids=ctx, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
    past = cache.get_seq_length()
    linears, gqa = CpuVerifyLinears(target, enabled=wide_linear, honour_env=False), CpuMaskedGqa(target)
    qs = sorted(set(int(n) for n in num_tokens))
    if not qs or qs[0] < 1:
        raise ValueError(f"token counts must be >= 1, got {num_tokens}")
    steps = {}
    for q in qs:
        tree = binary_tree(q - 1, device)
        tokens = torch.randint(0, vocab, (1, q), generator=g).to(device)

        def step(tree=tree, tokens=tokens, q=q) -> None:
            if q == 1:
                target(input_ids=tokens, position_ids=torch.tensor([[past]], device=device),
                       use_cache=True, **{CACHE_KWARG: cache})
            else:
                depths = tree.verify_depths().to(device)
                mask = target_mask_kwargs(target, cache, tree.ancestor_matrix().to(device), depths, past, target.dtype)
                with linears, gqa:  # as tree decoding runs it
                    target(input_ids=tokens, attention_mask=mask, position_ids=(past + depths)[None],
                           use_cache=True, **{CACHE_KWARG: cache})
            cache.crop(-q)

        steps[q] = step
    first = None
    for i, q in enumerate(qs):  # warm-up round: the second of two passes decides where to stop
        for _ in range(2 if stop_ratio is not None else 1):
            sync_device(device)
            t0 = time.perf_counter()
            steps[q]()
            sync_device(device)
            elapsed = time.perf_counter() - t0
        first = elapsed if first is None else first
        if stop_ratio is not None and q > 1 and elapsed > stop_ratio * first:
            qs = qs[: i + 1]
            break
    return interleaved_samples({q: steps[q] for q in qs}, device, rounds, timer, progress, warmup=False)


def interleaved_samples(fns: dict[Any, Callable[[], None]], device: torch.device, rounds: int,
                        timer: Callable[[], float] = time.perf_counter,
                        progress: Callable[[], None] | None = None, warmup: bool = True) -> dict[Any, list[float]]:
    """`rounds` timings of every fn, one of each per round (after a warm-up round unless `warmup` is
    False): a burst of load from another process then hits all of them alike instead of one."""
    if warmup:
        for fn in fns.values():
            fn()
    samples: dict[Any, list[float]] = {key: [] for key in fns}
    for _ in range(max(rounds, 1)):
        for key, fn in fns.items():
            sync_device(device)
            t0 = timer()
            fn()
            sync_device(device)
            samples[key].append(timer() - t0)
            if progress is not None:
                progress()
    return samples


def measure_verify_time(target, num_tokens: Sequence[int], context_length: int = 256, repeats: int = 5,
                        seed: int = 0, timer: Callable[[], float] = time.perf_counter) -> dict[int, float]:
    """Seconds of one target verification forward over q tokens, for each q in `num_tokens`.

    The minimum over `repeats` interleaved rounds (`measure_verify_samples`): load from other processes
    only ever adds time, so the minimum is the least disturbed estimate of the pass itself.
    """
    samples = measure_verify_samples(target, num_tokens, context_length, repeats, seed, timer)
    return {q: min(ts) for q, ts in samples.items()}


class CpuUsage:
    """CPU cores that other processes kept busy while the `with` block ran, beyond the cores this
    process's torch threads leave free (Linux /proc/stat; None elsewhere)."""

    def __init__(self) -> None:
        self.other_cores: float | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(v) for v in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuUsage:
        self._busy, self._own, self._wall = self._busy_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = self._busy_s()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (time.process_time() - self._own)
        # cores this process's threads do not use may be busy without slowing it down
        spare = max((os.cpu_count() or 1) - torch.get_num_threads(), 0)
        self.other_cores = max(others / wall - spare, 0.0)


def timing_spread(samples: dict[Any, list[float]]) -> float:
    """Median over timed points of median / min - 1: how much the rounds disagree."""
    spreads = [statistics.median(ts) / min(ts) - 1.0 for ts in samples.values() if ts and min(ts) > 0]
    return statistics.median(spreads) if spreads else 0.0


# --------------------------------------------------------------------------- the device's cost table


@dataclass
class DeviceCosts:
    """Verification-pass cost (seconds) as a function of the number of tokens q, from a measured table."""

    verify_s: dict[int, float]
    wide_linear: bool = False  # tree passes run their float32 CPU linears as W @ x^T (measured faster)
    # "calibration" (first use) or "tune" (`clover2 tune`'s record): corrected online by observed pass
    # times; "given": a table the caller supplies (e.g. a model of another device), used as it is
    source: str = "calibration"

    def __post_init__(self) -> None:
        if not self.verify_s or 1 not in self.verify_s:
            raise ValueError("a cost table needs at least the time of a 1-token pass (q = 1)")
        qs = sorted(self.verify_s)
        running = 1e-9  # a degenerate (zero) timer must not divide by zero later
        table = {}
        for q in qs:  # a longer pass never costs less than a shorter one (noise aside)
            running = max(running, float(self.verify_s[q]))
            table[q] = running
        self.verify_s = table
        self._qs = qs

    @property
    def plain_step_s(self) -> float:
        """One plain decoding step: a pass over one token."""
        return self.verify_s[1]

    def verify_time(self, q: int) -> float:
        """Seconds of a pass over q tokens: linear between measured points, beyond the last one along the
        last segment's slope."""
        qs, table = self._qs, self.verify_s
        if q in table:
            return table[q]
        if q <= qs[0]:
            return table[qs[0]]
        for lo, hi in zip(qs, qs[1:]):
            if lo < q < hi:
                return table[lo] + (table[hi] - table[lo]) * (q - lo) / (hi - lo)
        if len(qs) == 1:
            return table[qs[0]]
        lo, hi = qs[-2], qs[-1]
        return table[hi] + (table[hi] - table[lo]) / (hi - lo) * (q - hi)

    def max_useful_tokens(self, ratio: float = 2.0, cap: int = 65) -> int:
        """The largest q whose pass costs at most `ratio` plain steps (at most `cap`): a tree verifying
        more could only pay with more than `ratio` tokens per step."""
        best = 1
        for q in range(1, cap + 1):
            if self.verify_time(q) <= ratio * self.plain_step_s:
                best = q
        return best

    def to_dict(self) -> dict[str, Any]:
        return {"verify_time_s": {str(q): t for q, t in self.verify_s.items()}, "source": self.source,
                "wide_linear": self.wide_linear}


_COSTS: dict[str, DeviceCosts] = {}


def device_costs(target, cache_dir: str | os.PathLike[str] | None = None, calibrate: bool = True,
                 tuned: dict[str, Any] | None = None) -> DeviceCosts | None:
    """The verification cost table of `target` on its device.

    Order: `tuned` (a `clover2 tune` record with a `verify_time_s` table), this process's memory, the
    calibration file, else (when `calibrate`) a measurement now: `CALIBRATION_TOKENS` in 3 interleaved
    rounds at context 256, a few seconds once per (target, dtype, device), stored in the calibration
    file (q beyond the first that costs 3 plain steps are not timed). None when nothing is known and
    `calibrate` is False.
    """
    if tuned and isinstance(tuned.get("verify_time_s"), dict):
        try:
            table = {int(q): float(t) for q, t in tuned["verify_time_s"].items()}
            if 1 in table:
                return DeviceCosts(table, wide_linear=bool(tuned.get("wide_linear", False)), source="tune")
        except (TypeError, ValueError):
            pass
    key = entry_key(target)
    path = calibration_file(cache_dir)
    memo_key = f"{path}::{key}"
    if memo_key in _COSTS:
        return _COSTS[memo_key]
    record = read_entries(path).get(key)
    costs = None
    if isinstance(record, dict):
        try:
            costs = DeviceCosts({int(q): float(t) for q, t in record["verify_time_s"].items()},
                                wide_linear=bool(record.get("wide_linear", False)))
        except (KeyError, TypeError, ValueError, AttributeError):
            logger.warning("ignoring malformed Clover-2 calibration record for %s", key)
    if costs is None:
        if not calibrate:
            return None
        logger.info("Clover-2: timing %s's verification passes on %s once (cached in %s)", target_key(target),
                    device_key(target.device), path)
        with CpuUsage() as usage:
            samples = measure_verify_samples(target, CALIBRATION_TOKENS, context_length=256, rounds=3, stop_ratio=3.0)
            costs = DeviceCosts({q: min(ts) for q, ts in samples.items()})
            if uses_cpu_float32_linears(target):  # time the other kernel choice too, keep the faster one
                wide = measure_verify_samples(target, sorted(samples), context_length=256, rounds=3, wide_linear=True)
                wide_costs = DeviceCosts({q: min(ts) for q, ts in wide.items()}, wide_linear=True)
                tree_qs = [q for q in costs.verify_s if q > 1]
                if sum(wide_costs.verify_s[q] for q in tree_qs) < sum(costs.verify_s[q] for q in tree_qs):
                    costs, samples = wide_costs, wide
        spread = timing_spread(samples)
        busy = usage.other_cores if target.device.type == "cpu" else None
        if spread > CALIBRATION_NOISE_LIMIT or (busy is not None and busy > CALIBRATION_LOAD_LIMIT):
            # used by this process (and corrected online by TreeSizer), but not kept for later ones
            logger.warning("Clover-2: the device was busy while timing verification passes (spread %.0f%%, other "
                           "processes %.2f cores); not caching the calibration", 100 * spread, busy or 0.0)
        else:
            try:
                entries = dict(read_entries(path))
                entries[key] = {**costs.to_dict(), "spread": spread, "other_cpu_load": busy,
                                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                write_entries(path, entries)
            except OSError as exc:  # a read-only cache only costs a re-measurement next time
                logger.warning("could not store the Clover-2 calibration in %s (%s)", path, exc)
    _COSTS[memo_key] = costs
    return costs


#: The smallest tree an "auto" budget may grow (the `TreeSizer` still verifies only what pays).
MIN_AUTO_NODES = 4


def uses_cpu_float32_linears(target) -> bool:
    """Whether `target` has float32 `nn.Linear` weights on the CPU (where `CpuVerifyLinears` may apply)."""
    return any(type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
               for m in target.modules())


def auto_top_k(max_nodes: int) -> int:
    """Children per expanded node for an automatic tree of up to `max_nodes` nodes (2..8, about sqrt + 1)."""
    return max(2, min(8, round(math.sqrt(max_nodes)) + 1))


@dataclass
class TreeSettings:
    """The tree settings one `generate` call uses, and where they came from."""

    top_k: int
    budget: int
    adaptive: bool  # the per-step `TreeSizer` picks how much of the tree to verify
    source: str  # "explicit value", "tuning file" or "device cost model"
    costs: DeviceCosts | None = None
    wide_linear: bool = False  # run the tree passes' float32 CPU linears as W @ x^T (`CpuVerifyLinears`)

    def describe(self) -> str:
        if self.adaptive:
            source = "clover2 tune" if self.costs and self.costs.source == "tune" else "first-use calibration"
            return (f"tree sized per step by the device cost model (up to {self.budget} nodes, top-k {self.top_k}; "
                    f"pass costs from {source})")
        origin = "explicit values" if self.source == "explicit value" else f"from the {self.source}"
        return f"tree_budget={self.budget}, tree_top_k={self.top_k} ({origin})"


def auto_tree_settings(draft, target, cache_dir: str | os.PathLike[str] | None = None,
                       options=None) -> TreeSettings:
    """Resolve the drafter's tree settings for `target` on its device, never changing `draft.config`.

    `options`: the call's `DecodingOptions` (default: the drafter config's `tree_budget` / `tree_top_k`).
    Integers in `tree_budget` / `tree_top_k` are the caller's choice and are used as they
    are (a fixed tree). An ``"auto"`` budget means the per-step `TreeSizer`: with `clover2 tune`'s record
    for this target and device, over tune's measured pass costs and with tune's budget and top-k as
    the largest tree; without one, over the device's first-use calibration, with up to
    `DeviceCosts.max_useful_tokens() - 1` (at least `MIN_AUTO_NODES`) nodes.
    """
    source_of = options if options is not None else draft.config
    budget, top_k = source_of.tree_budget, source_of.tree_top_k
    record = None if budget != "auto" and top_k != "auto" else load_tuned_settings(draft, target, cache_dir)
    if record is not None and top_k == "auto":
        top_k = record["tree_top_k"]
    if budget != "auto":  # a fixed tree, run with the kernel choice measured for this device, if any
        if record is not None:
            wide_linear = bool(record.get("wide_linear", False))
        else:
            known = device_costs(target, cache_dir, calibrate=False)
            wide_linear = bool(known and known.wide_linear)
        return TreeSettings(top_k=auto_top_k(budget) if top_k == "auto" else top_k, budget=budget, adaptive=False,
                            source="tuning file" if record is not None else "explicit value", wide_linear=wide_linear)
    if record is not None:
        # tune's budget caps the tree; the sizer still verifies only the part that pays, at tune's pass costs
        costs, max_nodes, source = device_costs(target, cache_dir, tuned=record), record["tree_budget"], "tuning file"
    else:
        costs, source = device_costs(target, cache_dir), "device cost model"
        # at least a few nodes: the sizer corrects the table online and verifies fewer when they do not pay
        max_nodes = max(costs.max_useful_tokens() - 1, MIN_AUTO_NODES)
    return TreeSettings(top_k=auto_top_k(max_nodes) if top_k == "auto" else top_k, budget=max_nodes, adaptive=True,
                        source=source, costs=costs, wide_linear=costs.wide_linear)


# --------------------------------------------------------------------------- the per-step policy


@dataclass
class AcceptanceModel:
    """What decoding has learnt about a drafter's acceptance and the target's pass times.

    Kept across `generate` calls of one (drafter, target) pair in this process (`TreeSizer.for_pair`),
    halved in weight at every new call, so that each call starts from what the last ones saw.
    """

    predicted: list[float] = field(default_factory=list)  # per depth: sum of exp(score) of verified drafted nodes
    accepted: list[float] = field(default_factory=list)  # per depth: accepted drafted nodes
    lookup_reached: float = 0.0
    lookup_accepted: float = 0.0
    # what drafting brought, in plain steps per drafted step (`TreeSizer.finish_step`): a decayed sum that starts
    # from a prior, so that a new pair drafts through its first few misses
    drafting_gain: float = 1.0
    # observed and predicted seconds of 1-token passes and of tree passes
    observed_s: list[float] = field(default_factory=lambda: [0.0, 0.0])
    predicted_s: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # [2, D + 1] `predicted` / `accepted` (index = depth) as the device-side greedy loop keeps them
    # (`device_step.DeviceAcceptance`): when set, they are newer than the two lists
    device_counts: Any = None

    def decay(self, factor: float = 0.5) -> None:
        for values in (self.predicted, self.accepted, self.observed_s, self.predicted_s):
            values[:] = [factor * v for v in values]
        if self.device_counts is not None:
            self.device_counts.mul_(factor)  # on the device: nothing is read back
        self.lookup_reached *= factor
        self.lookup_accepted *= factor
        self.drafting_gain *= factor

    def pull_device_counts(self) -> None:
        """Make `predicted` / `accepted` current again after device-side calls (one host read)."""
        if self.device_counts is not None:
            predicted, accepted = self.device_counts.tolist()
            self.predicted[:], self.accepted[:] = predicted[1:], accepted[1:]
            self.device_counts = None

    def correction(self, depth: int, prior: float = 2.0) -> float:
        """accepted / predicted at `depth` (1-based), from a prior of 1 worth `prior` predicted nodes."""
        i = depth - 1
        accepted = self.accepted[i] if i < len(self.accepted) else 0.0
        predicted = self.predicted[i] if i < len(self.predicted) else 0.0
        return min(max((accepted + prior) / (predicted + prior), 0.05), 3.0)

    def add(self, depth: int, predicted: float, accepted: float) -> None:
        while len(self.predicted) < depth:
            self.predicted.append(0.0)
            self.accepted.append(0.0)
        self.predicted[depth - 1] += predicted
        self.accepted[depth - 1] += accepted


_MEMORY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class TreeSizer:
    """Chooses, each step, how many of the drafted (and looked-up) nodes to verify.

    Predicted acceptance: a drafted node at depth d is accepted with probability c_d * exp(path score)
    (the drafter's cumulative path probability, times a per-depth correction c_d = accepted / predicted
    over the verified trees so far, from a prior of 1); a node that only the prompt-lookup path
    proposes, at depth d, with rho^d (rho: the running rate at which reached lookup tokens were
    accepted). A node on both gets the larger. Each node's value is capped by its parent's, so the
    best-first prefix of nodes is a valid tree.

    Choice: the prefix of b nodes maximising (1 + sum of their probabilities) / verify_time(b + 1); b = 0
    is a plain step. The pass costs are the device table's, each class (1-token passes, tree passes)
    scaled by the ratio of the observed times to the table's predictions, so a table measured on a busy
    machine, or a context much longer than the calibration's, is corrected as decoding goes. Drafting is
    skipped for the next 1, 2, 4, ... `max_backoff` steps while what drafting brought is negative: per
    drafted step, whatever it then verified, the tokens emitted beyond a plain step's one, minus the drafting
    time and the pass's extra cost over a 1-token pass, in plain-step times (a decayed sum from a small prior,
    so what the drafter really brings decides, not its own confidence, and one miss does not stop it); the
    drafter reads the skipped positions in one batch when drafting resumes. Trees are grown one depth
    deeper than the deepest drafted node the last choice kept (`depth_cap`), so a drafter that is
    only trusted near the root spends no head steps on depths nobody verifies.
    """

    costs: DeviceCosts
    model: AcceptanceModel = field(default_factory=AcceptanceModel)
    margin: float = 1.0  # a tree is verified only when predicted to beat plain decoding's rate by this factor
    max_backoff: int = 16  # the longest run of steps without drafting
    gain_decay: float = 0.9  # weight the running drafting gain keeps at each drafted step
    backoff: int = 0
    skip: int = 0
    history: list[int] = field(default_factory=list)  # nodes verified per step (tests, stats)
    depth_cap: int = 64  # depths worth growing: one more than the deepest drafted node last kept

    @classmethod
    def for_pair(cls, draft, target, costs: DeviceCosts) -> TreeSizer:
        """A sizer for one `generate` call that starts from what earlier calls of this pair learnt."""
        per_draft = _MEMORY.setdefault(draft, weakref.WeakKeyDictionary())
        model = per_draft.get(target)
        if model is None:
            model = per_draft[target] = AcceptanceModel()
        else:
            model.decay()
        return cls(costs, model)

    def verify_time(self, q: int) -> float:
        """The table's pass cost for q tokens, times what has been observed against the table."""
        return self.costs.verify_time(q) * self.time_scales()[0 if q == 1 else 1]

    def time_scales(self) -> tuple[float, float]:
        """(1-token passes, tree passes): observed over predicted seconds, from a prior of 2 passes' worth."""
        if self.costs.source == "given":
            return 1.0, 1.0
        scales = []
        for cls, q in ((0, 1), (1, 5)):
            prior = 2.0 * self.costs.verify_time(q)
            scales.append((self.model.observed_s[cls] + prior) / (self.model.predicted_s[cls] + prior))
        return scales[0], scales[1]

    def observe_verify(self, q: int, seconds: float) -> None:
        """Record the measured time of a verification pass over q tokens."""
        cls = 0 if q == 1 else 1
        self.model.observed_s[cls] += seconds
        self.model.predicted_s[cls] += self.costs.verify_time(q)

    @property
    def correction(self) -> float:
        """The depth-1 correction c_1 (tests, diagnostics)."""
        return self.model.correction(1)

    @property
    def lookup_rate(self) -> float:
        return (self.model.lookup_accepted + 2.0) / (self.model.lookup_reached + 3.0)

    def should_draft(self) -> bool:
        """False while drafting is being skipped (the step verifies the root and any lookup path only)."""
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def worth_growing(self, first_logprobs: torch.Tensor, top_k: int) -> bool:
        """Whether a tree from these depth-1 log-probabilities [V_draft] could pay for its verification.

        Optimistic bound: every depth keeps the corrected probability mass m of the top-k depth-1 nodes,
        so a chain of d nodes brings 1 + m + ... + m^d tokens for a pass over d + 1 tokens. When no d
        beats plain decoding, the rest of the tree is not grown (a few head steps saved per step)."""
        top = torch.topk(first_logprobs.float(), min(top_k, first_logprobs.numel())).values
        mass = min(self.model.correction(1) * float(top.exp().sum()), 1.0)
        plain = self.margin / self.verify_time(1)
        tokens, power = 1.0, 1.0
        for d in range(1, 65):
            power *= mass
            tokens += power
            if tokens / self.verify_time(d + 1) > plain:
                return True
            if power < 1e-3:
                break
        return False

    def node_probabilities(self, tree: DraftTree, num_drafted: int) -> list[float]:
        """Predicted acceptance probability of each node (verify index m + 1 -> entry m)."""
        rho = self.lookup_rate
        scores = tree.scores.float().cpu().tolist()
        depths = tree.depths.cpu().tolist()
        parents = tree.parents.cpu().tolist()
        lookup = set(self._lookup_nodes(tree, num_drafted))
        probs: list[float] = []
        for m in range(tree.num_nodes):  # parents come first, so each cap reads a finished value
            p = min(self.model.correction(depths[m]) * math.exp(scores[m]), 1.0) if m < num_drafted else 0.0
            if m in lookup:
                p = max(p, rho ** depths[m])
            if parents[m] > 0:
                p = min(p, probs[parents[m] - 1])
            probs.append(p)
        return probs

    @staticmethod
    def _lookup_nodes(tree: DraftTree, num_drafted: int) -> list[int]:
        """Nodes on the lookup path: the appended ones and their drafted ancestors."""
        if tree.num_nodes == num_drafted:
            return []
        parents = tree.parents.cpu().tolist()
        nodes = set(range(num_drafted, tree.num_nodes))
        v = parents[num_drafted]  # the drafted node the appended path hangs from (0 = root)
        while v > 0:
            nodes.add(v - 1)
            v = parents[v - 1]
        return sorted(nodes)

    def choose(self, tree: DraftTree, num_drafted: int, drafted: bool) -> tuple[list[int], float]:
        """(kept node indices in verify order, predicted tokens of the step) for this step's tree.

        `num_drafted`: the first nodes are the drafter's, the rest come from the lookup path;
        `drafted`: whether this step paid for drafting (it did not when skipping)."""
        probs = self.node_probabilities(tree, num_drafted)
        depths = tree.depths.cpu().tolist()
        order = sorted(range(tree.num_nodes), key=lambda m: (-probs[m], depths[m]))
        best_b, gain = self.best_prefix([probs[m] for m in order])
        kept = sorted(order[:best_b])
        expected = 1.0 + gain[best_b]
        self.record_choice(best_b, drafted, max((depths[m] for m in kept if m < num_drafted), default=0) + 1)
        return kept, expected

    def best_prefix(self, values: Sequence[float]) -> tuple[int, list[float]]:
        """(b, gains): how many of the nodes, best first with predicted acceptance `values`, to verify — the
        prefix maximising (1 + their sum) / verify_time(b + 1), 0 (a plain step) unless one beats plain
        decoding by `margin` — and the running sums (gains[b] = sum of the first b values)."""
        best_b, best_rate, total = 0, self.margin / self.verify_time(1), 0.0
        gains = [0.0]
        for b, value in enumerate(values, start=1):
            total += value
            gains.append(total)
            rate = (1.0 + total) / self.verify_time(b + 1)
            if rate > best_rate:
                best_b, best_rate = b, rate
        return best_b, gains

    def record_choice(self, num_nodes: int, drafted: bool, depth_cap: int) -> None:
        """After a choice of `num_nodes` nodes: the next depth cap (one more than the deepest drafted node
        kept). (Shared by `choose` and the device-side choice of `device_step`.)"""
        if drafted:  # grow one depth beyond what is used: deeper drafting costs head steps and is not verified
            self.depth_cap = depth_cap
        self.history.append(num_nodes)

    def _back_off(self) -> None:
        self.backoff = min(max(2 * self.backoff, 1), self.max_backoff)
        self.skip = self.backoff

    def finish_step(self, drafted: bool, tokens: int, draft_seconds: float, q: int) -> None:
        """Judge drafting by what it really brought, after a step that drafted (whatever it then verified).

        `tokens`: what the step emitted; `draft_seconds`: its drafting time after the augmenting block's update
        (the drafter must read every verified position before it drafts again, so skipping only defers that
        update: the catch-up after skipped steps is not charged to the step that resumes); `q`: the tokens its
        pass verified, the root included. The gain, in plain steps, is the tokens beyond a plain step's one minus
        the drafting time and the pass's predicted extra cost over a 1-token pass (predicted, not measured: one
        pass's jitter would swamp a one-token gain). While the decayed sum of gains is negative, drafting backs
        off; once it is not, the back-off is reset."""
        if not drafted:
            return
        plain = self.verify_time(1)
        extra = max(self.verify_time(q) - plain, 0.0) if q > 1 else 0.0
        gain = tokens - 1 - (draft_seconds + extra) / plain
        self.model.drafting_gain = self.gain_decay * self.model.drafting_gain + gain
        if self.model.drafting_gain < 0:
            self._back_off()
        else:
            self.backoff = 0

    def update(self, tree: DraftTree, num_drafted: int, accepted_nodes: Sequence[int]) -> None:
        """Learn from a verified step: `accepted_nodes` are the accepted node indices (verify index - 1)."""
        accepted = set(accepted_nodes)
        scores = tree.scores.float().cpu().tolist()
        depths = tree.depths.cpu().tolist()
        for m in range(num_drafted):
            self.model.add(depths[m], math.exp(scores[m]), float(m in accepted))
        lookup = self._lookup_nodes(tree, num_drafted)
        if lookup:
            parents = tree.parents.cpu().tolist()
            for m in lookup:
                if m >= num_drafted and (parents[m] == 0 or parents[m] - 1 in accepted):  # reached
                    self.model.lookup_reached += 1
                    self.model.lookup_accepted += m in accepted
