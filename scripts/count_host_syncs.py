"""Host syncs and ATen ops per target forward pass: plain greedy `generate()` against Clover-2 (issue 11's yardstick).

Counts, over whole greedy `generate` calls (prefill included) divided by the target forward passes made:

  ops          every ATen op dispatched (a `TorchDispatchMode` sees each one), and the same without view ops
  scalar reads `aten::_local_scalar_dense` (`.item()`, `int()`, `bool()`, `float()` of a tensor): a device sync
  host copies  calls of `Tensor.tolist` / `.cpu` / `.numpy` (a device->host transfer on an accelerator)

On a CPU nothing really waits, but every one of these would stall the host on a GPU, so the counts say
what an accelerator step would pay, measured without one. Not counted, though also syncs on a GPU:
`torch.tensor(python_list, device=...)` and explicit synchronisations. Counting makes decoding slow
(a Python call per op): the times it prints are not speeds.

    python scripts/count_host_syncs.py --draft hub_configs/clover2-smollm2-135m-instruct --questions 4
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from clover2_hf import Clover2ForDrafting, Clover2Stats, load_default_target
from clover2_hf.generation.cost_model import device_costs
from clover2_hf.tools.bench import encode_chat, load_questions
from clover2_hf.tools.host_syncs import counting
from clover2_hf.tools.tune import default_draft_dtype


def count_call(target, ids: torch.Tensor, max_new_tokens: int, **kwargs) -> dict[str, float]:
    """Counts for one greedy generate call, and its number of target forward passes."""
    forwards = [0]
    handle = target.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        with torch.no_grad(), counting() as counts:
            out = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    finally:
        handle.remove()
    return dict(counts, forwards=forwards[0], new_tokens=int(out.shape[1] - ids.shape[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", default="hub_configs/clover2-smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=4, help="MT-Bench first turns (first N questions)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tree", metavar="BUDGET,TOP_K", help="a fixed tree (generate(tree_budget=, tree_top_k=)); "
                        "default: the drafter's settings (\"auto\": sized per step from measured times, so the "
                        "counts then vary a little from run to run)")
    parser.add_argument("--output", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    target, tokenizer = load_default_target()
    # the drafter's default dtype, as `clover2 bench` / `clover2 demo` load it
    draft = Clover2ForDrafting.from_pretrained(args.draft, dtype=default_draft_dtype(target.device, target.dtype)).eval()
    device_costs(target)  # a first-use calibration, if one is due, runs here: neither counted nor timed under counting
    options = {}
    if args.tree:
        budget, top_k = (int(v) for v in args.tree.split(","))
        options = {"tree_budget": budget, "tree_top_k": top_k}
    totals = {"plain": collections.Counter(), "clover2": collections.Counter()}
    for question in load_questions(num_questions=args.questions):
        ids = encode_chat(tokenizer, [{"role": "user", "content": question.turns[0]}])
        plain = count_call(target, ids, args.max_new_tokens)
        clover2 = count_call(target, ids, args.max_new_tokens, assistant_model=draft, clover2_stats=Clover2Stats(),
                             **options)
        totals["plain"].update(plain)
        totals["clover2"].update(clover2)
    result = {}
    for method, total in totals.items():
        passes = max(total["forwards"], 1)
        result[method] = {key: round(total[key] / passes, 2) for key in
                          ("ops", "ops_without_views", "scalar_reads", "host_copies")}
        result[method]["host_syncs"] = round((total["scalar_reads"] + total["host_copies"]) / passes, 2)
        result[method].update(forwards=total["forwards"], new_tokens=total["new_tokens"])
    result["settings"] = {"questions": args.questions, "max_new_tokens": args.max_new_tokens, "tree": args.tree or "auto"}
    result["ops_ratio"] = round(result["clover2"]["ops"] / max(result["plain"]["ops"], 1e-9), 3)
    result["ops_without_views_ratio"] = round(
        result["clover2"]["ops_without_views"] / max(result["plain"]["ops_without_views"], 1e-9), 3)
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
