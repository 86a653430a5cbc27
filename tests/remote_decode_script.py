"""Run in an environment WITHOUT clover2_hf (tests/test_hub_files.py's fresh virtualenv).

argv: drafter dir, target dir (safetensors + tokenizer), max new tokens, JSON list of prompts.
Loads the drafter with trust_remote_code=True, decodes each prompt with
generate(assistant_model=draft, custom_generate=<drafter dir>, trust_remote_code=True) and with plain greedy
generate, and checks they are identical token for token; then checks the stock path's error message.
Prints one JSON line: {"ok": true, ...}.
"""

import json
import sys

try:
    import clover2_hf  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("clover2_hf is importable in this environment: the test needs one without it")

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

draft_dir, target_dir, max_new_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(target_dir)
target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
draft = AutoModel.from_pretrained(draft_dir, trust_remote_code=True)
assert type(draft).__name__ == "Clover2ForDrafting", type(draft)
assert type(draft).__module__.startswith("transformers_modules."), type(draft).__module__

# Warm-up call: on first use the drafter's decoding loop times the target's passes (device calibration).
warm = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                               add_generation_prompt=True), return_tensors="pt")
target.generate(**warm, assistant_model=draft, custom_generate=draft_dir, trust_remote_code=True, do_sample=False,
                max_new_tokens=4)

forwards = []
target.register_forward_pre_hook(lambda module, args: forwards.append(1))
results = []
for prompt in prompts:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    plain = target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    forwards.clear()
    clover = target.generate(**inputs, assistant_model=draft, custom_generate=draft_dir, trust_remote_code=True,
                             do_sample=False, max_new_tokens=max_new_tokens)
    new_tokens = clover.shape[1] - inputs["input_ids"].shape[1]
    assert torch.equal(plain, clover), (prompt, plain.tolist(), clover.tolist())
    results.append({"prompt": prompt, "new_tokens": int(new_tokens), "target_forwards": len(forwards)})

# Without custom_generate, stock assisted decoding must fail at once with what to do instead.
try:
    target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=4)
except AttributeError as exc:
    message = str(exc)
else:
    raise AssertionError("generate(assistant_model=<Clover-2 drafter>) without the package did not fail")
assert "pip install clover2-hf" in message and "custom_generate" in message, message
print(json.dumps({"ok": True, "results": results, "stock_error": message}))
