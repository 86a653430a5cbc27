"""The package's checks on a CUDA GPU, in one short run (the CPU test suite covers the rest).

    python scripts/gpu_check.py --output gpu_check.json

What it checks, each on tiny random targets built here (no downloads):
1. greedy: `generate(assistant_model=draft)` in tree and chain mode against plain `generate()`, token
   for token, for every supported architecture in float32, bfloat16 and float16, 12 prompts each;
2. sampling: tree mode with a seed reproduces plain sampling with the same seed (float32);
3. training: `clover2_hf.tools.recipes.train` on CUDA with `--bf16` (float32 master weights, autocast),
   loss going down, checkpoint reloads with `AutoModel` and decodes identically;
4. `device_map="auto"` loading of target and drafter, then identical greedy decoding;
5. `accelerate launch --mixed_precision bf16` of examples/train_clover2.py on one GPU, and with
   examples/accelerate_fsdp.yaml (FSDP v2, one process); the saved drafter must reload whole;
6. the benchmark (`run_benchmark`) on CUDA: complete result, identical outputs;
7. per-phase costs at SmolLM2-135M's shape (random weights, bf16): one drafting phase (8192-token and
   full vocabulary heads) and one verification forward over q tokens.
Each check records pass/fail and its numbers; the JSON summary goes to --output.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import BYTE_VOCAB, TINY_ARCHS, byte_chat_tokenizer, make_tiny_target  # noqa: E402
from drafters import train_on_own_outputs  # noqa: E402

from clover2_hf import Clover2ForDrafting, Clover2Stats  # noqa: E402

DEVICE = torch.device("cuda")  # --device cpu: a dry run of the script itself
RESULTS: dict[str, dict] = {}
ARCHS, DTYPES, MODES = TINY_ARCHS, (torch.float32, torch.bfloat16, torch.float16), ("tree", "chain")


def check(name):
    def wrap(fn):
        def run():
            start = time.time()
            try:
                details = fn() or {}
                RESULTS[name] = {"ok": bool(details.pop("ok", True)), **details}
            except Exception as exc:  # a failed check must not hide the others
                RESULTS[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
            RESULTS[name]["seconds"] = round(time.time() - start, 1)
            print(f"[{'ok' if RESULTS[name]['ok'] else 'FAIL'}] {name}: "
                  f"{ {k: v for k, v in RESULTS[name].items() if k != 'traceback'} }", flush=True)
        return run
    return wrap


_PAIRS: dict[str, tuple] = {}


def _pair(arch: str, dtype: torch.dtype):
    """A confident tiny target and a drafter fitted to its greedy outputs (trained once per arch, in fp32)."""
    if arch not in _PAIRS:
        target = make_tiny_target(arch, seed=1, peaked=True).to(DEVICE)
        _PAIRS[arch] = (target, train_on_own_outputs(target, steps=50, seqs=24, length=40, seed=0))
    target, draft = _PAIRS[arch]
    target = copy.deepcopy(target).to(dtype)
    return target, copy.deepcopy(draft).to(dtype).eval().attach_target(target)


@check("greedy_identical")
def greedy_identical():
    mismatches, runs, taus = [], 0, {}
    prompts = [torch.randint(3, 160, (1, n), generator=torch.Generator().manual_seed(n)) for n in range(1, 17, 2)]
    for arch in ARCHS:
        for dtype in DTYPES:
            target, draft = _pair(arch, dtype)
            for mode in MODES:
                draft.config.decoding = mode
                new_tokens = forwards = 0
                for i, ids in enumerate(prompts):
                    ids = ids.to(DEVICE)
                    stats = Clover2Stats()  # per call
                    expected = target.generate(ids, do_sample=False, max_new_tokens=32)
                    got = target.generate(ids, do_sample=False, max_new_tokens=32, assistant_model=draft,
                                          clover2_stats=stats)
                    new_tokens, forwards, runs = new_tokens + stats.new_tokens, forwards + stats.target_forwards, runs + 1
                    if not torch.equal(expected, got):
                        first = int((expected[0] != got[0]).nonzero()[0, 0]) if expected.shape == got.shape else -1
                        mismatches.append(f"{arch}/{str(dtype)[6:]}/{mode}/prompt{i}@{first}")
                taus[f"{arch}/{str(dtype)[6:]}/{mode}"] = round(new_tokens / max(forwards, 1), 2)
    return {"ok": not mismatches, "runs": runs, "mismatches": mismatches, "tokens_per_target_forward": taus}


@check("sampling_reproduces_plain")
def sampling():
    target, draft = _pair("llama", torch.float32)
    draft.config.decoding = "tree"
    same = 0
    for i in range(6):
        ids = torch.randint(3, 160, (1, 4), generator=torch.Generator().manual_seed(100 + i)).to(DEVICE)
        kwargs = dict(do_sample=True, max_new_tokens=30, temperature=0.8, top_k=20)
        torch.manual_seed(i)
        plain = target.generate(ids, **kwargs)
        torch.manual_seed(i)
        got = target.generate(ids, assistant_model=draft, **kwargs)
        same += int(torch.equal(plain, got))
    return {"ok": same == 6, "identical": f"{same}/6"}


def _synthetic_examples(n: int, length: int = 48) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"id": f"e{i}", "input_ids": torch.randint(3, 160, (length,), generator=g).tolist(),
             "loss_mask": [0] * 8 + [1] * (length - 8)} for i in range(n)]


@check("trainer_bf16_cuda")
def trainer_bf16():
    import clover2_hf.tools.recipes as recipes
    from transformers import AutoModel

    from clover2_hf.data import DataSummary, DistillationData

    target = make_tiny_target("llama", seed=1, peaked=True).to(DEVICE)
    examples = _synthetic_examples(40)
    summary = DataSummary(records=40, conversations=40, examples=40, train=36, eval=4)
    import clover2_hf.tools.targets as targets

    targets.load_target = lambda name, dtype=torch.float32: (target.to(dtype), None)
    recipes.build_examples = lambda *a, **k: DistillationData(train=examples[:36], eval=examples[36:], summary=summary)
    collator = recipes.ConversationCollator(pad_token_id=0)
    recipes.ConversationCollator.from_tokenizer = staticmethod(lambda tokenizer: collator)
    with tempfile.TemporaryDirectory() as tmp:
        draft = recipes.train(recipes.TrainRecipe(
            output_dir=tmp, max_steps=40, batch_size=4, grad_accum=1, warmup_steps=0, logging_steps=5,
            eval_steps=1000, save_steps=1000, bf16=True, learning_rate=3e-3, draft_vocab_size=64))
        history = json.loads((Path(tmp) / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
        losses = [h["loss"] for h in history if "loss" in h]
        master = sorted({str(p.dtype) for p in draft.parameters()})
        loaded = AutoModel.from_pretrained(Path(tmp) / "final", dtype=torch.bfloat16).to(DEVICE).eval()
        loaded.attach_target(target)
        ids = torch.tensor([examples[0]["input_ids"][:6]], device=DEVICE)
        same = torch.equal(target.generate(ids, do_sample=False, max_new_tokens=24),
                           target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=loaded))
    return {"ok": losses[-1] < losses[0] and master == ["torch.float32"] and same, "losses": losses,
            "master_dtypes": master, "reloaded_decodes_identically": same, "draft_device": str(draft.device)}


@check("device_map_auto")
def device_map_auto():
    from transformers import AutoModel, AutoModelForCausalLM

    target = make_tiny_target("qwen2", seed=1, peaked=True)
    draft = train_on_own_outputs(target, steps=30, seqs=12, length=30, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        target.save_pretrained(Path(tmp) / "target")
        draft.save_pretrained(Path(tmp) / "draft")
        t2 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "target", device_map="auto").eval()
        d2 = AutoModel.from_pretrained(Path(tmp) / "draft", device_map="auto").eval()
        ids = torch.randint(3, 160, (1, 5), generator=torch.Generator().manual_seed(3)).to(t2.device)
        stats = Clover2Stats()
        kwargs = dict(do_sample=False, max_new_tokens=30, min_new_tokens=30)  # no early eos
        same = torch.equal(t2.generate(ids, **kwargs), t2.generate(ids, **kwargs, assistant_model=d2, clover2_stats=stats))
    return {"ok": same and t2.device.type == d2.device.type == DEVICE.type, "target_device": str(t2.device),
            "draft_device": str(d2.device), "identical": same, "target_forwards": stats.target_forwards,
            "new_tokens": stats.new_tokens}


def _launch_example(launch_args: list[str]) -> dict:
    """`accelerate launch <launch_args> examples/train_clover2.py` on a tiny target; the drafter must reload."""
    from transformers import AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = byte_chat_tokenizer()
        target = make_tiny_target("llama", vocab_size=BYTE_VOCAB)
        target.save_pretrained(tmp / "target")
        tokenizer.save_pretrained(tmp / "target")
        with (tmp / "chats.jsonl").open("w") as f:
            for i in range(32):
                f.write(json.dumps({"id": f"c{i}", "conversations": [
                    {"from": "human", "value": f"What is {i} plus {i}?"},
                    {"from": "gpt", "value": f"The answer is {2 * i}. " * (1 + i % 3)}]}) + "\n")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args,
               str(ROOT / "examples" / "train_clover2.py"), "--output-dir", str(tmp / "run"),
               "--target", str(tmp / "target"), "--data", str(tmp / "chats.jsonl"), "--max-steps", "6",
               "--grad-accum", "1", "--max-length", "96", "--save-steps", "6", "--eval-steps", "6",
               "--max-eval-examples", "2", "--logging-steps", "1", "--bf16"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        ok = result.returncode == 0 and (tmp / "run" / "final" / "model.safetensors").exists()
        details = {"returncode": result.returncode, "stderr_tail": "\n".join(l for l in result.stderr.splitlines() if l.startswith("[rank0]:"))[-5000:] if not ok else ""}
        if ok:  # a full (unsharded) drafter state dict was saved
            loaded = AutoModel.from_pretrained(tmp / "run" / "final")
            fresh = Clover2ForDrafting.from_target(target)
            details["params"] = sum(p.numel() for p in loaded.parameters())
            ok = details["params"] == sum(p.numel() for p in fresh.parameters())
        return {"ok": ok, **details}


@check("accelerate_launch_bf16")
def accelerate_launch():
    return _launch_example(["--num_processes", "1", "--mixed_precision", "bf16"])


@check("accelerate_launch_fsdp")
def accelerate_launch_fsdp():
    """examples/accelerate_fsdp.yaml (FSDP v2) on the one GPU there is."""
    return _launch_example(["--config_file", str(ROOT / "examples" / "accelerate_fsdp.yaml"), "--num_processes", "1"])


@check("bench_cuda")
def bench():
    from clover2_hf.tools.bench import load_questions, run_benchmark

    tokenizer = byte_chat_tokenizer()
    target = make_tiny_target("llama", vocab_size=BYTE_VOCAB, peaked=True, eos_token_id=2).to(DEVICE)
    draft = Clover2ForDrafting.from_target(target).eval()
    result = run_benchmark(target, tokenizer, draft, load_questions(per_category=1),
                           ["clover2-tree", "clover2-chain", "prompt-lookup"], max_new_tokens=24, progress=False)
    identical = {m: all(s["identical"] for s in per_cat.values()) for m, per_cat in result.summary.items()}
    tau = {m: per_cat["overall"]["tau"] for m, per_cat in result.summary.items() if "overall" in per_cat}
    return {"ok": len(identical) == 4 and all(identical.values()), "identical": identical, "tau": tau,
            "settings": result.settings}


@check("timing_smollm2_shape")
def timing():
    """SmolLM2-135M's shape with random weights (the real weights cannot travel): per-phase costs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clover2_hf.tools.tune import measure_draft_time, measure_verify_time

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    target = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    out = {}
    for vocab in (8192, None):
        draft = Clover2ForDrafting.from_target(target, draft_vocab_size=vocab).eval()
        if vocab:
            draft.set_draft_vocab(torch.randperm(49152)[:vocab])
        out[f"draft_ms_vocab{vocab or 49152}"] = {k: round(1e3 * v, 2) for k, v in
                                                  measure_draft_time(draft, [2, 4, 10], repeats=20).items()}
    with torch.no_grad():
        out["verify_ms"] = {q: round(1e3 * v, 2) for q, v in
                            measure_verify_time(target, [1, 5, 9, 17, 33, 65], repeats=20).items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="gpu_check.json")
    parser.add_argument("--only", default=None, help="comma-separated check names")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="one architecture and dtype (a dry run)")
    args = parser.parse_args()
    global DEVICE, ARCHS, DTYPES
    DEVICE = torch.device(args.device)
    if args.quick:
        ARCHS, DTYPES = ("llama",), (torch.float32,)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    checks = [greedy_identical, sampling, trainer_bf16, device_map_auto, accelerate_launch, accelerate_launch_fsdp,
              bench, timing]
    names = ["greedy_identical", "sampling_reproduces_plain", "trainer_bf16_cuda", "device_map_auto",
             "accelerate_launch_bf16", "accelerate_launch_fsdp", "bench_cuda", "timing_smollm2_shape"]
    wanted = set(args.only.split(",")) if args.only else set(names)
    import transformers

    for name, fn in zip(names, checks):
        if name in wanted:
            fn()
            summary = {"device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu",
                       "torch": torch.__version__, "transformers": transformers.__version__, "checks": RESULTS}
            Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")  # partial results survive a kill
    print(f"{sum(r['ok'] for r in RESULTS.values())}/{len(RESULTS)} checks passed")


if __name__ == "__main__":
    main()
