"""Shared fixtures: tiny random targets of every supported architecture."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

import clover2_hf  # noqa: F401  (registers the Auto classes)
from clover2_hf.tools.bench import compile_on_any_device

# A developer's own `clover2 tune` results must not change the tree settings the tests use.
os.environ["CLOVER2_HF_TUNING"] = "0"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` workers share the cores: one torch thread each (threads spinning for cores slow everyone)
    torch.set_num_threads(1)

TINY_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2")


def tiny_target_config(arch: str, vocab_size: int = 160, hidden_size: int = 64, **overrides):
    """A 2-layer target config of `arch`; sliding windows are small so that tests cross them."""
    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch in ("mistral", "gemma2"):
        values["sliding_window"] = 8
    values.update(overrides)
    return AutoConfig.for_model(arch, **values)


def make_tiny_target(arch: str, seed: int = 0, peaked: bool = False, **overrides):
    """A tiny random target. `peaked=True` scales its output head so that next-token distributions
    are confident, as a trained LM's are (a random model's are nearly uniform)."""
    torch.manual_seed(seed)
    attn = "eager" if arch == "gemma2" else "sdpa"  # Gemma-2 has no sdpa path in transformers
    model = AutoModelForCausalLM.from_config(tiny_target_config(arch, **overrides), attn_implementation=attn)
    if peaked:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(25.0)
    return model.eval()


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param


BYTE_VOCAB = 259  # 3 special tokens + 256 bytes
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (ids 3..258 = bytes) with a ChatML template, for tiny random targets."""
    vocab = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({ch: 3 + b for b, ch in bytes_to_unicode().items()})
    tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def counting_compile_config(graphs: list) -> CompileConfig:
    """A `CompileConfig` whose backend records every graph dynamo hands it and runs it as traced."""

    def backend(graph_module, example_inputs, **_):
        graphs.append(graph_module)
        return graph_module.forward

    return compile_on_any_device(CompileConfig(backend=backend, mode=None))  # a custom backend takes no mode


def reusing_compile_config(graphs: list) -> CompileConfig:
    """Like `counting_compile_config`, but each graph writes its outputs into the same buffers on every call, as
    a CUDA graph replay does: a caller that reads an output after the next call of that graph reads the new values
    (what cudagraph trees' "overwritten by a subsequent run" means), so identity tests catch it on a CPU."""

    def backend(graph_module, example_inputs, **_):
        graphs.append(graph_module)
        buffers: list = []

        def run(*args):
            outputs = graph_module.forward(*args)
            single = not isinstance(outputs, (tuple, list))
            outputs = [outputs] if single else list(outputs)
            if not buffers:
                buffers.extend(o.clone() if isinstance(o, torch.Tensor) else None for o in outputs)
            kept = []
            for out, buffer in zip(outputs, buffers):
                if buffer is None or buffer.shape != out.shape or buffer.dtype != out.dtype:
                    kept.append(out)
                else:
                    kept.append(buffer.copy_(out))
            return kept[0] if single else type(outputs)(kept) if isinstance(outputs, tuple) else kept

        return run

    return compile_on_any_device(CompileConfig(backend=backend, mode=None))
