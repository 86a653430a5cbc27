"""Save / load round trips, Auto* and trust_remote_code loading, checkpoint contents, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_target
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from clover2_hf import Clover2Config, Clover2ForDrafting


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A drafter for a tiny qwen2 target with a truncated draft vocabulary, saved to disk."""
    target = make_tiny_target("qwen2")
    draft = Clover2ForDrafting.from_target(target, draft_vocab_size=32, num_draft_depths=4).eval()
    draft.set_draft_vocab(torch.randperm(160)[:32])
    path = tmp_path_factory.mktemp("draft")
    draft.save_pretrained(path)
    target_path = tmp_path_factory.mktemp("target")
    target.save_pretrained(target_path)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 6, 64, generator=g)
    ids = torch.randint(0, 160, (1, 6), generator=g)
    with torch.no_grad():
        logits = draft(hidden, ids, return_logits=True).logits
    torch.save({"hidden": hidden, "ids": ids, "logits": logits}, path / "expected.pt")
    return draft, target, path, target_path


def test_files_written(saved):
    _, _, path, _ = saved
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "configuration_clover2.py", "modeling_clover2.py", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt")) and n != "expected.pt" for n in names)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "clover2"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_clover2.Clover2Config",
        "AutoModel": "modeling_clover2.Clover2ForDrafting",
    }
    assert config["text_config"]["model_type"] == "qwen2"


def test_checkpoint_holds_no_target_head_or_embedding(saved):
    draft, target, path, _ = saved
    tensors = load_file(path / "model.safetensors")
    V = target.config.vocab_size
    assert not any("lm_head" in k or "embed" in k for k in tensors)
    assert not any(V in t.shape for t in tensors.values())
    assert set(tensors) == set(draft.state_dict())


def test_round_trip_is_bit_exact(saved):
    draft, target, path, _ = saved
    loaded = AutoModel.from_pretrained(path)
    assert isinstance(loaded, Clover2ForDrafting)
    original = draft.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    loaded.attach_target(target).eval()
    expected = torch.load(path / "expected.pt")
    with torch.no_grad():
        logits = loaded(expected["hidden"], expected["ids"], return_logits=True).logits
    assert torch.equal(logits, expected["logits"])


def test_loaded_drafter_needs_attaching(saved):
    _, _, path, _ = saved
    loaded = AutoModel.from_pretrained(path)
    with pytest.raises(RuntimeError, match="attach_target"):
        loaded(torch.zeros(1, 2, 64), torch.zeros(1, 2, dtype=torch.long))


_FRESH = textwrap.dedent(
    """
    import sys, torch
    mode, draft_dir, target_dir = sys.argv[1:]
    if mode == "remote":
        sys.modules["clover2_hf"] = None  # the package is not importable in this process
    else:
        import clover2_hf
    from transformers import AutoModel, AutoModelForCausalLM
    kwargs = {"trust_remote_code": True} if mode == "remote" else {}
    draft = AutoModel.from_pretrained(draft_dir, **kwargs)
    assert type(draft).__name__ == "Clover2ForDrafting"
    assert (type(draft).__module__.startswith("clover2_hf")) == (mode != "remote"), type(draft).__module__
    draft.attach_target(AutoModelForCausalLM.from_pretrained(target_dir)).eval()
    expected = torch.load(f"{draft_dir}/expected.pt")
    with torch.no_grad():
        logits = draft(expected["hidden"], expected["ids"], return_logits=True).logits
    assert torch.equal(logits, expected["logits"])
    print("OK", type(draft).__module__)
    """
)


@pytest.mark.slow  # a fresh interpreter per mode
@pytest.mark.parametrize("mode", ["package", "remote"])
def test_automodel_in_fresh_process(saved, mode, tmp_path):
    _, _, path, target_path = saved
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", _FRESH, mode, str(path), str(target_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_corrupt_checkpoint_gives_clear_error(saved, tmp_path):
    _, _, path, _ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "configuration_clover2.py", "modeling_clover2.py"):
        (bad / name).write_bytes((path / name).read_bytes())
    data = (path / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=r"(?i)safetensors|header|incomplete|corrupt|deserializ"):
        AutoModel.from_pretrained(bad)


def test_refuses_pickle_serialization(saved, tmp_path):
    draft, _, _, _ = saved
    with pytest.raises(ValueError, match="safetensors"):
        draft.save_pretrained(tmp_path, safe_serialization=False)


def test_model_card_metadata(tmp_path):
    target = make_tiny_target("llama")
    target.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    draft = Clover2ForDrafting.from_target(target)
    draft.save_pretrained(tmp_path, training_command="clover2 train --target X")
    card = (tmp_path / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "library_name: transformers" in card
    assert "clover2" in card and "speculative-decoding" in card
    assert "clover2 train --target X" in card
    assert AutoConfig.from_pretrained(tmp_path).base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_push_to_hub_offline_fails_in_hub_client(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    draft = Clover2ForDrafting(Clover2Config(text_config=make_tiny_target("llama").config.to_dict()))
    with pytest.raises(Exception) as info:
        draft.push_to_hub("someone/clover2-test", token="hf_dummy")
    assert type(info.value).__module__.startswith(("huggingface_hub", "requests", "httpx")), repr(info.value)


def test_never_loads_a_pickle_checkpoint(saved, tmp_path):
    draft, _, path, _ = saved
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((path / "config.json").read_bytes())
    torch.save(draft.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        AutoModel.from_pretrained(folder)
