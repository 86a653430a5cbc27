"""Where does one Clover-2 tree step spend its time? Per-phase wall time and host-device syncs.

Written for the open GPU question (README "Results"): on an H200 the SmolLM2 tree step cost 61-63 ms
while its parts, timed alone by `clover2 tune`, cost ~6 ms (drafting) + ~21 ms (verification). This
script runs tree decoding once and times each phase of every step by wrapping the functions the loop
calls (nothing in the package is changed):

  draft.augment      the augmenting block over the newly verified positions
  draft.grow_tree    head depths + candidates (device walk: `device_step.draft_candidates`, lookup merge
                     included; host walk: `tree_step.grow_tree`)
  draft.lookup       the prompt-lookup search (and, on the host walk, its merge into the tree)
  draft.choose       the device walk's choice of nodes (values, order, sizing read, verification order)
  verify.mask        the tree attention mask
  verify.forward     the target's forward passes (prefill included: 1 of the passes)
  accept.compact     keeping the accepted path in the target's KV cache
  other              everything else in `generate` (the walk, logits processors, bookkeeping)

Per phase it prints the mean time per target pass and, for drafting phases, the median and 90th
percentile per call (`--json` writes every call's time).

With `--sync` (default on CUDA) the device is synchronised at every phase boundary, so a phase's time
includes its own queued kernels (not the next phase's); on CUDA, host-device syncs made inside each
phase are counted with `torch.cuda.set_sync_debug_mode`. No download: the target is the embedded
SmolLM2 (`--target embedded`) or, by default, a target with random weights built from the drafter's
`text_config` (same shapes and costs; the drafts are then rarely accepted, which changes tau, not what
a step costs).

    python scripts/profile_tree_step.py --draft hub_configs/clover2-smollm2-135m-instruct --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
import warnings

import torch
from transformers import AutoModelForCausalLM

import clover2_hf.generation.device_step as device_step
import clover2_hf.generation.tree_step as decoding
from clover2_hf import Clover2ForDrafting, Clover2Stats, load_default_target

PHASES = ("draft.augment", "draft.grow_tree", "draft.lookup", "draft.choose", "verify.mask", "verify.forward",
          "accept.compact")


class PhaseClock:
    """Wraps callables so that each call adds its wall time (and syncs) to a named phase."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.device, self.sync = device, sync and device.type == "cuda"
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.per_call: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        self._active: str | None = None

    def wrap(self, fn, phase: str):
        def timed(*args, **kwargs):
            if self._active is not None:  # nested (e.g. lookup inside another phase): count once
                return fn(*args, **kwargs)
            if self.sync:
                torch.cuda.synchronize(self.device)
            self._active = phase
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = fn(*args, **kwargs)
                if self.sync:  # outside the catch: this sync is the clock's, not the phase's
                    torch.cuda.synchronize(self.device)
            finally:
                self._active = None
            self.seconds[phase] += time.perf_counter() - t0
            self.per_call[phase].append(time.perf_counter() - t0)
            self.calls[phase] += 1
            self.syncs[phase] += sum("synchroniz" in str(w.message) for w in caught)
            for w in caught:
                if "synchroniz" not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return out

        return timed


def wrapped_functions() -> dict[tuple[object, str], str]:
    """(owner, attribute) -> phase, for every function of both walks the clock times."""
    return {
        (Clover2ForDrafting, "augment"): "draft.augment",
        (decoding, "grow_tree"): "draft.grow_tree",
        (decoding, "lookup_continuation"): "draft.lookup",
        (decoding, "add_path"): "draft.lookup",
        (decoding, "target_mask_kwargs"): "verify.mask",
        (decoding, "compact_cache"): "accept.compact",
        (device_step, "draft_candidates"): "draft.grow_tree",
        (device_step, "lookup_continuation"): "draft.lookup",
        (device_step, "node_values"): "draft.choose",
        (device_step, "best_first"): "draft.choose",
        (device_step, "_choose"): "draft.choose",
        (device_step, "dfs_keys"): "draft.choose",
        (device_step, "verified_tree"): "draft.choose",
        (device_step, "target_mask_kwargs"): "verify.mask",
        (device_step, "compact_cache"): "accept.compact",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draft", default="hub_configs/clover2-smollm2-135m-instruct")
    p.add_argument("--target", default="random", help="'random' (weights from the drafter's text_config) or 'embedded'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="target dtype (default: float32 on CPU, bfloat16 on CUDA); the drafter runs in bf16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--budget", type=int, help="fixed tree budget (default: the drafter's config; \"auto\" sizes trees per step)")
    p.add_argument("--top-k", type=int, help="tree top-k (default: the drafter's config)")
    p.add_argument("--no-sync", action="store_true", help="do not synchronise CUDA at phase boundaries")
    p.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    p.add_argument("--json", help="also write the per-phase totals and every call's time (seconds) here")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    draft = Clover2ForDrafting.from_pretrained(args.draft, dtype=torch.bfloat16)
    if args.target == "embedded":
        target, tokenizer = load_default_target(dtype=dtype)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    elif args.target == "random":
        torch.manual_seed(0)
        target = AutoModelForCausalLM.from_config(draft.config.text_config).to(dtype)
        ids = torch.randint(3, target.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    else:
        p.error("--target must be 'random' or 'embedded'")
    target.to(device).eval()
    draft.to(device)
    ids = ids.to(device)

    clock = PhaseClock(device, sync=not args.no_sync)
    wrapped = wrapped_functions()
    originals = {key: getattr(*key) for key in wrapped}
    for (owner, name), phase in wrapped.items():
        setattr(owner, name, clock.wrap(originals[(owner, name)], phase))
    target.forward = clock.wrap(target.forward, "verify.forward")

    # --budget / --top-k set a fixed tree; unset, the drafter's own settings ("auto": sized per step)
    if args.budget:
        draft.config.tree_budget = args.budget
    if args.top_k:
        draft.config.tree_top_k = args.top_k

    def generate(tokens: int) -> Clover2Stats:
        stats = Clover2Stats()
        with torch.no_grad():
            target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                            assistant_model=draft, clover2_stats=stats, pad_token_id=0)
        return stats

    generate(8)  # warm-up
    clock.seconds.clear(), clock.calls.clear(), clock.syncs.clear(), clock.per_call.clear()
    if device.type == "cuda" and clock.sync:
        torch.cuda.set_sync_debug_mode("warn")
    t0 = time.perf_counter()
    stats = generate(args.max_new_tokens)
    total = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    steps = stats.target_forwards
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), target "
          f"{args.target} {str(dtype).split('.')[-1]}, {stats.tree_settings}, {stats.new_tokens} tokens, {steps} target passes (tau {stats.new_tokens / steps:.2f}), "
          f"mean tree {sum(stats.tree_sizes) / max(len(stats.tree_sizes), 1):.1f} nodes")
    print(f"walk: {stats.walk}")
    print(f"{'phase':16s} {'ms/step':>8s} {'calls/step':>10s} {'syncs/step':>10s} {'ms/call p50':>11s} {'p90':>6s}")
    for phase in PHASES:
        calls = sorted(clock.per_call[phase]) or [0.0]
        print(f"{phase:16s} {1000 * clock.seconds[phase] / steps:8.2f} {clock.calls[phase] / steps:10.2f} "
              f"{clock.syncs[phase] / steps:10.2f} {1000 * statistics.median(calls):11.2f} "
              f"{1000 * calls[int(0.9 * (len(calls) - 1))]:6.2f}")
    other = total - sum(clock.seconds.values())
    print(f"{'other':16s} {1000 * other / steps:8.2f}")
    print(f"{'total':16s} {1000 * total / steps:8.2f}   (syncs counted on CUDA only, inside the phases above)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"walk": stats.walk, "passes": steps, "tokens": stats.new_tokens, "total_s": total,
                       "phases_s": dict(clock.seconds), "calls_s": dict(clock.per_call)}, f, indent=1)


if __name__ == "__main__":
    main()
