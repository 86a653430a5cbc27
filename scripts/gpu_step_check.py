"""Issue 11's accelerator checks in one call: host syncs, per-phase step times, and the loop's speed at a chosen tau.

    python scripts/gpu_step_check.py --output gpu_step_check.json      # on a CUDA device (< 8 min on one H200)
    python scripts/gpu_step_check.py --smoke --output smoke.json       # on a CPU, tiny shapes (tests run this)

No download: every target has random weights in a real model's shape (SmolLM2-135M's and Llama-3-8B's,
bf16 on CUDA), every drafter is `Clover2ForDrafting.from_target` of it (draft vocabulary 8192).

0. graph exactness: static shapes graph-captured by the package (`compile_config=CompileConfig()`: real CUDA
   graphs on CUDA) on a small float32 target, against plain greedy decoding, token for token (bf16 runs
   below cannot show exactness: multi-token passes round differently).
1. syncs: greedy `generate(assistant_model=draft)`; on CUDA under `torch.cuda.set_sync_debug_mode("warn")`
   (each synchronising call warns once: counted), on a CPU with `clover2_hf.tools.host_syncs.counting`
   (scalar reads + host copies). Per target pass, for the device walk (fixed tree, then "auto" sizing)
   and the host walk (the same call returning scores).
2. phases: `scripts/profile_tree_step.py`'s clock around the device walk (per phase per pass, and the
   median / 90th percentile of each drafting call), synchronised at phase boundaries.
3. oracle: per shape, interleaved in one process: plain `generate()` eager; plain `generate()` with a
   static cache, which transformers compiles on CUDA (its graph-captured baseline); and Clover-2 tree
   decoding whose lookup path is the target's own answer (`clover2_hf.tools.oracle`), L = tau - 1
   tokens for tau = 2, 3, 4, 5, eager, with and without static shapes (drafting and, for these Llama
   shapes, verification on a StaticCache; `disable_compile=True`, since transformers' rule would compile
   them on CUDA); then static shapes compiled the package's way (`compile_config=CompileConfig()`: the
   drafting step and the verification pass under `torch.compile(mode="reduce-overhead")`, CUDA graphs).
   Reported: measured tau, ms per token, compile time, and speed-up against each plain baseline; outputs
   checked identical to plain.

The JSON is rewritten after every part, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from transformers import CompileConfig

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import profile_tree_step  # noqa: E402

from clover2_hf import Clover2ForDrafting, Clover2Stats  # noqa: E402
from clover2_hf.tools.bench import compile_on_any_device  # noqa: E402
from clover2_hf.tools.host_syncs import counting  # noqa: E402
from clover2_hf.tools.oracle import OracleLookup  # noqa: E402
from clover2_hf.tools.targets import RANDOM_SHAPES, random_target  # noqa: E402

SHAPES = RANDOM_SHAPES
SMOKE_SHAPE = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, tie_word_embeddings=True)}
FIXED_TREE = {"tree_budget": 8, "tree_top_k": 4}


def build_pair(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama target of `shape` and a random drafter for it (draft vocabulary <= 8192)."""
    target = random_target(shape, device, dtype)
    draft = Clover2ForDrafting.from_target(target, draft_vocab_size=min(8192, shape["vocab_size"])).eval()
    return target, draft


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def sync_counter(device: torch.device):
    """Yields a dict whose "syncs" is filled on exit: CUDA sync-debug warnings, or the CPU proxy's count."""
    result = {}
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    else:
        with counting() as counts:
            yield result
        result["syncs"] = counts["scalar_reads"] + counts["host_copies"]


def check_syncs(target, draft, ids, new_tokens: int) -> dict:
    device = ids.device
    rows = {}
    calls = {
        "device walk, fixed tree 8/4": dict(FIXED_TREE),
        "device walk, auto": {},
        "host walk, fixed tree 8/4": dict(FIXED_TREE, return_dict_in_generate=True, output_scores=True),
    }
    for name, kwargs in calls.items():
        target.generate(ids, do_sample=False, max_new_tokens=4, assistant_model=draft, **kwargs)  # warm-up
        stats = Clover2Stats()
        with torch.no_grad(), sync_counter(device) as counted:
            target.generate(ids, do_sample=False, max_new_tokens=new_tokens, assistant_model=draft,
                            clover2_stats=stats, **kwargs)
        rows[name] = {"walk": stats.walk, "passes": stats.target_forwards,
                      "syncs_per_pass": round(counted["syncs"] / stats.target_forwards, 2)}
    plain_passes = new_tokens
    with torch.no_grad(), sync_counter(device) as counted:
        target.generate(ids, do_sample=False, max_new_tokens=new_tokens)
    rows["plain"] = {"passes": plain_passes, "syncs_per_pass": round(counted["syncs"] / plain_passes, 2)}
    return rows


def check_phases(target, draft, ids, new_tokens: int) -> dict:
    device = ids.device
    clock = profile_tree_step.PhaseClock(device, sync=True)
    wrapped = {key: phase for key, phase in profile_tree_step.wrapped_functions().items()}
    originals = {key: getattr(*key) for key in wrapped}
    forward = target.forward
    try:
        for (owner, name), phase in wrapped.items():
            setattr(owner, name, clock.wrap(originals[(owner, name)], phase))
        target.forward = clock.wrap(forward, "verify.forward")
        stats = Clover2Stats()
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            target.generate(ids, do_sample=False, max_new_tokens=new_tokens, assistant_model=draft,
                            clover2_stats=stats, **FIXED_TREE)
        synchronize(device)
        total = time.perf_counter() - t0
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
        target.forward = forward
    passes = stats.target_forwards
    phases = {}
    for phase in profile_tree_step.PHASES:
        calls = sorted(clock.per_call[phase]) or [0.0]
        phases[phase] = {"ms_per_pass": round(1000 * clock.seconds[phase] / passes, 3),
                         "ms_per_call_p50": round(1000 * statistics.median(calls), 3),
                         "ms_per_call_p90": round(1000 * calls[int(0.9 * (len(calls) - 1))], 3)}
    phases["other"] = {"ms_per_pass": round(1000 * (total - sum(clock.seconds.values())) / passes, 3)}
    return {"walk": stats.walk, "passes": passes, "tau": round(stats.new_tokens / passes, 3),
            "ms_per_pass": round(1000 * total / passes, 3), "phases": phases}


def graph_config(device: torch.device) -> tuple[CompileConfig, str]:
    """(compile config, row label) of the graph-captured rows: transformers' default on CUDA (inductor,
    "reduce-overhead": CUDA graphs); elsewhere the same plumbing traced by dynamo without code generation (a
    CPU check of this script)."""
    if device.type == "cuda":
        return CompileConfig(), "compiled (reduce-overhead)"
    return compile_on_any_device(CompileConfig(backend="eager", mode=None)), "traced (eager backend)"


def graph_exactness(device: torch.device) -> dict:
    """The graph-captured static path in float32 (where a tree pass and a 1-token pass agree) on a small
    random target: identical to plain greedy decoding on several prompts and answer lengths? On CUDA this runs
    real CUDA graphs (`CompileConfig()`, "reduce-overhead"), so a graph output read after the next replay
    would show here; on a CPU it traces with the eager backend."""
    shape = dict(SMOKE_SHAPE["tiny"], hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=4096)
    target, draft = build_pair(shape, device, torch.float32)
    config, _ = graph_config(device)
    rows, generator = [], torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, (length, new_tokens) in enumerate([(24, 40), (24, 40), (31, 64), (24, 40)]):
            pattern = torch.randint(3, shape["vocab_size"], (6,), generator=generator)
            ids = (pattern.repeat(length // 6 + 1)[:length] if i % 2 else
                   torch.randint(3, shape["vocab_size"], (length,), generator=generator))[None].to(device)
            plain = target.generate(ids, do_sample=False, max_new_tokens=new_tokens)
            stats = Clover2Stats()
            got = target.generate(ids, do_sample=False, max_new_tokens=new_tokens, assistant_model=draft,
                                  clover2_stats=stats, tree_lookup_tokens=3, clover2_static_shapes=True,
                                  compile_config=config, **FIXED_TREE)
            rows.append({"prompt": length, "new_tokens": new_tokens, "identical": torch.equal(plain, got),
                         "tau": round(stats.tau, 3), "settings": stats.tree_settings})
    return {"identical": all(r["identical"] for r in rows), "calls": rows}


def oracle_speeds(target, draft, ids, new_tokens: int, taus: list[int], repeats: int) -> dict:
    """Every method interleaved in one process; the first call of each (untimed) compiles what it compiles."""
    device = ids.device
    reference = target.generate(ids, do_sample=False, max_new_tokens=new_tokens)
    answer = reference[0, ids.shape[1]:].tolist()
    cuda = device.type == "cuda"
    config, graph_name = graph_config(device)
    methods = {"plain eager": {"disable_compile": True}}
    if cuda:
        methods["plain compiled (static cache)"] = {"cache_implementation": "static"}
    for tau in taus:
        clover2 = dict(FIXED_TREE, assistant_model=draft, tree_lookup_tokens=tau - 1)
        methods[f"clover2 eager, oracle tau {tau}"] = clover2
        # transformers' rule would compile static shapes on CUDA: eager on request
        methods[f"clover2 static shapes eager, oracle tau {tau}"] = dict(clover2, clover2_static_shapes=True,
                                                                       disable_compile=True)
        # one lookup width for every tau (the oracle proposes tau - 1 real tokens): one graph per shape
        methods[f"clover2 static shapes {graph_name}, lookup width {max(taus) - 1}, oracle tau {tau}"] = dict(
            clover2, tree_lookup_tokens=max(taus) - 1, clover2_static_shapes=True, compile_config=config,
            oracle_tokens=tau - 1)

    def run(kwargs: dict) -> tuple[float, bool, Clover2Stats | None]:
        kwargs = dict(kwargs)
        stats = Clover2Stats() if "assistant_model" in kwargs else None
        oracle.answer_for(ids.shape[1], answer, per_step=kwargs.pop("oracle_tokens", None))
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = target.generate(ids, do_sample=False, max_new_tokens=new_tokens, **kwargs,
                                  **({"clover2_stats": stats} if stats is not None else {}))
        synchronize(device)
        return time.perf_counter() - t0, torch.equal(out, reference), stats

    times = {name: [] for name in methods}
    rows = {name: {} for name in methods}
    oracle = OracleLookup()
    with oracle:
        for name, kwargs in methods.items():  # warm-up (and compilation)
            try:
                rows[name]["first_call_seconds"] = round(run(kwargs)[0], 2)
            except Exception:
                rows[name]["error"] = traceback.format_exc(limit=3)
        methods = {name: kwargs for name, kwargs in methods.items() if "error" not in rows[name]}
        for r in range(repeats):
            order = list(methods.items()) if r % 2 == 0 else list(reversed(methods.items()))
            for name, kwargs in order:
                seconds, identical, stats = run(kwargs)
                times[name].append(seconds)
                row = rows[name]
                row["identical"] = row.get("identical", True) and identical
                if stats is not None:
                    row.update(tau=round(stats.new_tokens / stats.target_forwards, 3), walk=stats.walk,
                               mean_tree_nodes=round(statistics.mean(stats.tree_sizes), 2),
                               draft_ms_per_pass=round(1000 * stats.draft_time_s / stats.target_forwards, 3),
                               settings=stats.tree_settings)
    if "plain eager" not in methods:  # no baseline: the rows without speeds
        return rows
    plain = statistics.median(times["plain eager"])
    plain_compiled = (statistics.median(times["plain compiled (static cache)"])
                      if "plain compiled (static cache)" in methods else None)
    for name in methods:
        seconds = statistics.median(times[name])
        row = rows[name]
        row["ms_per_token"] = round(1000 * seconds / new_tokens, 3)
        row["speedup_vs_plain_eager"] = round(plain / seconds, 3)
        if plain_compiled is not None:
            row["speedup_vs_plain_compiled"] = round(plain_compiled / seconds, 3)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens (a CPU check of this script)")
    p.add_argument("--output", default="gpu_step_check.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None,
                   help="comma-separated (default: llama3-8b,smollm2-135m; the issue's bar first, in case time runs out)")
    p.add_argument("--taus", default="2,3,4,5")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per call (default 128; smoke 12)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE_SHAPE if args.smoke else {k: SHAPES[k] for k in (args.shapes or "llama3-8b,smollm2-135m").split(",")}
    new_tokens = args.new_tokens or (12 if args.smoke else 128)
    repeats = args.repeats or (1 if args.smoke else 2)
    taus = [int(t) for t in args.taus.split(",")]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "new_tokens": new_tokens,
              "repeats": repeats, "shapes": {}}
    output = Path(args.output)

    def save() -> None:
        output.write_text(json.dumps(result, indent=2) + "\n")

    t_start = time.perf_counter()
    try:
        result["graph_exactness_float32"] = graph_exactness(device)
    except Exception:
        result["graph_exactness_float32"] = {"error": traceback.format_exc(limit=4)}
    print(f"[{time.perf_counter() - t_start:6.0f} s] graph exactness: "
          f"{json.dumps(result['graph_exactness_float32'])[:400]}", flush=True)
    save()
    for shape_name, shape in shapes.items():
        entry = result["shapes"].setdefault(shape_name, {})
        try:
            target, draft = build_pair(shape, device, dtype)
            ids = torch.randint(3, shape["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
            parts = {"syncs": (check_syncs, ()), "phases": (check_phases, ()), "oracle": (oracle_speeds, (taus, repeats))}
            for part, (fn, extra) in parts.items():
                t0 = time.perf_counter()
                entry[part] = fn(target, draft, ids, new_tokens, *extra)
                entry[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
                print(f"[{time.perf_counter() - t_start:6.0f} s] {shape_name} {part}: "
                      f"{json.dumps(entry[part])[:400]}", flush=True)
                save()
            del target, draft
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception:  # keep the other shapes' results
            entry["error"] = traceback.format_exc(limit=4)
            print(entry["error"], flush=True)
            save()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    return result


if __name__ == "__main__":
    main()
