"""Precomputed feature store: layout, atomic resumable shards, round trip, fingerprints, training from it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_target
from safetensors.torch import load_file
from transformers import TrainingArguments

import clover2_hf.tools.features as features_module
from clover2_hf import Clover2ForDrafting
from clover2_hf.data import ConversationCollator, DataSummary, DistillationData
from clover2_hf.tools.features import (
    FeatureCollator,
    FeatureDataset,
    FeatureRecipe,
    FeatureStoreMismatchError,
    build_feature_store,
    build_features,
    open_feature_data,
)
from clover2_hf.training import Clover2Trainer, target_features


def _examples(n: int = 10, vocab: int = 160, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 9 + (7 * i) % 13
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"id": f"ex{i}", "input_ids": ids, "loss_mask": [0] * 4 + [1] * (length - 4)})
    return out


def _shard_files(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("shard-"))


def _hidden_files(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


def test_store_layout_and_fp32_round_trip(tmp_path):
    target = make_tiny_target("llama")
    examples = _examples()
    manifest = build_feature_store(target, examples, tmp_path / "s", shard_tokens=40, dtype=torch.float32,
                                   batch_size=3, progress=False)
    files = _shard_files(tmp_path / "s")
    assert manifest["complete"] and len(files) == manifest["num_shards"] > 2
    assert not _hidden_files(tmp_path / "s")  # no temporary files left
    assert manifest["num_tokens"] == sum(len(ex["input_ids"]) for ex in examples)
    on_disk = sum((tmp_path / "s" / f).stat().st_size for f in files) + (tmp_path / "s" / "manifest.json").stat().st_size
    assert manifest["bytes"] == on_disk
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["bytes"] == on_disk
    shard = load_file(tmp_path / "s" / files[0])
    assert shard["hidden_states"].dtype == torch.float32 and shard["hidden_states"].shape[1] == 64
    assert shard["offsets"][0] == 0 and shard["offsets"][-1] == shard["input_ids"].numel() == shard["hidden_states"].shape[0]

    dataset = FeatureDataset(tmp_path / "s")
    assert len(dataset) == len(examples)
    for i, ex in enumerate(examples):
        item = dataset[i]
        assert item["id"] == ex["id"]
        assert item["input_ids"].tolist() == ex["input_ids"] and item["loss_mask"].tolist() == ex["loss_mask"]
        expected = target_features(target, torch.tensor([ex["input_ids"]])).hidden[0]
        torch.testing.assert_close(item["hidden_states"], expected, rtol=1e-5, atol=1e-5)
    assert [e["input_ids"].tolist() for e in dataset.token_examples()] == [ex["input_ids"] for ex in examples]
    assert len(dataset[2:5]) == 3 and dataset[2:5][0]["id"] == "ex2"
    with pytest.raises(IndexError):
        dataset[len(examples)]


def test_bf16_store_round_trip_and_size(tmp_path):
    target = make_tiny_target("qwen2")
    examples = _examples(6)
    manifest = build_feature_store(target, examples, tmp_path, shard_tokens=1 << 20, progress=False)
    dataset = FeatureDataset(tmp_path)
    assert manifest["num_shards"] == 1 and dataset.dtype == torch.bfloat16
    for i, ex in enumerate(examples):
        expected = target_features(target, torch.tensor([ex["input_ids"]])).hidden[0]
        assert dataset[i]["hidden_states"].dtype == torch.bfloat16
        torch.testing.assert_close(dataset[i]["hidden_states"].float(), expected, rtol=1e-2, atol=1e-2)
    # 64 x 2 bytes of hidden state + 4 (id) + 1 (mask) per token, plus headers and the manifest
    assert 133 <= manifest["bytes_per_token"] < 133 + 4096 / manifest["num_tokens"] + 40


def test_crash_mid_shard_leaves_no_partial_shard_and_resume_matches_one_shot(tmp_path, monkeypatch):
    target = make_tiny_target("llama")
    examples = _examples(12)
    kwargs = dict(shard_tokens=45, dtype=torch.float32, batch_size=2, progress=False)
    reference = build_feature_store(target, examples, tmp_path / "oneshot", **kwargs)
    assert reference["num_shards"] >= 4

    real_save = features_module.save_file
    calls = {"n": 0}

    def crashing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard: half a file, then the process "dies"
            with open(filename, "wb") as fh:
                fh.write(b"\x00" * 100)
            raise KeyboardInterrupt("simulated crash")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(features_module, "save_file", crashing_save)
    store = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(target, examples, store, **kwargs)
    monkeypatch.setattr(features_module, "save_file", real_save)
    assert _shard_files(store) == ["shard-00000.safetensors"]
    assert not _hidden_files(store)
    manifest = json.loads((store / "manifest.json").read_text())
    assert not manifest["complete"] and [e["file"] for e in manifest["shards"]] == ["shard-00000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        FeatureDataset(store)
    # a hard kill (no cleanup) can leave a temporary file behind: the next run removes it
    (store / ".shard-00001.safetensors.tmp-999").write_bytes(b"junk")
    first_mtime = (store / "shard-00000.safetensors").stat().st_mtime_ns

    seen = []
    real_features = features_module.target_features

    def counting_features(model, ids, attention_mask=None):
        seen.append(int(attention_mask.sum()))
        return real_features(model, ids, attention_mask)

    monkeypatch.setattr(features_module, "target_features", counting_features)
    resumed = build_feature_store(target, examples, store, **kwargs)
    first_shard_tokens = reference["shards"][0]["tokens"]
    assert sum(seen) == reference["num_tokens"] - first_shard_tokens  # shard 0 was not recomputed
    assert (store / "shard-00000.safetensors").stat().st_mtime_ns == first_mtime
    assert not _hidden_files(store)
    assert resumed["complete"] and resumed["shards"] == reference["shards"]
    assert resumed["fingerprint"] == reference["fingerprint"]
    for name in _shard_files(tmp_path / "oneshot"):
        a, b = load_file(tmp_path / "oneshot" / name), load_file(store / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished store is not rebuilt
    seen.clear()
    build_feature_store(target, examples, store, **{**kwargs, "batch_size": 5})
    assert seen == []


def test_fingerprint_mismatch_is_refused(tmp_path):
    target = make_tiny_target("llama")
    examples = _examples(4)
    build_feature_store(target, examples, tmp_path, progress=False)
    with pytest.raises(FeatureStoreMismatchError, match="different data"):
        build_feature_store(target, _examples(4, seed=1), tmp_path, progress=False)
    other = make_tiny_target("llama", seed=1)
    with pytest.raises(FeatureStoreMismatchError, match="different target"):
        build_feature_store(other, examples, tmp_path, progress=False)
    with pytest.raises(FeatureStoreMismatchError, match="different settings"):
        build_feature_store(target, examples, tmp_path, dtype=torch.float32, progress=False)
    dataset = FeatureDataset(tmp_path)
    dataset.check_target(target)
    dataset.check_target(make_tiny_target("llama").to(torch.bfloat16))  # same weights, other load dtype
    with pytest.raises(FeatureStoreMismatchError, match="another target"):
        dataset.check_target(other)
    manifest = build_feature_store(other, examples, tmp_path, overwrite=True, progress=False)
    assert manifest["complete"]
    FeatureDataset(tmp_path).check_target(other)


def test_collator_pads_hidden_states():
    examples = [
        {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1], "hidden_states": torch.ones(3, 4, dtype=torch.bfloat16)},
        {"input_ids": [5], "loss_mask": [1], "hidden_states": torch.full((1, 4), 2.0, dtype=torch.bfloat16)},
    ]
    batch = FeatureCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    plain = ConversationCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert all(torch.equal(batch[k], plain[k]) for k in plain)
    assert batch["hidden_states"].shape == (2, 4, 4) and batch["hidden_states"].dtype == torch.bfloat16
    assert batch["hidden_states"][0, :3].eq(1).all() and batch["hidden_states"][0, 3:].eq(0).all()
    assert batch["hidden_states"][1, 0].eq(2).all() and batch["hidden_states"][1, 1:].eq(0).all()
    bad = [{**examples[0], "hidden_states": torch.ones(2, 4)}]
    with pytest.raises(ValueError, match="hidden_states"):
        FeatureCollator()(bad)


def _trainer(target, data, collator, out_dir, max_steps=3):
    torch.manual_seed(0)
    draft = Clover2ForDrafting.from_target(target, num_draft_depths=3)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=3, learning_rate=3e-3,
        save_strategy="no", logging_steps=1, remove_unused_columns=False, report_to=[], use_cpu=True, seed=0,
        lr_scheduler_type="constant", disable_tqdm=True,
    )
    return Clover2Trainer(model=draft, args=args, train_dataset=data, data_collator=collator, target=target)


def test_trainer_from_fp32_store_matches_on_the_fly(tmp_path):
    target = make_tiny_target("qwen2", peaked=True)
    examples = _examples(9)
    build_feature_store(target, examples, tmp_path / "store", shard_tokens=50, dtype=torch.float32, progress=False)
    store = FeatureDataset(tmp_path / "store")

    live = _trainer(target, examples, ConversationCollator(pad_token_id=0), tmp_path / "a")
    cached = _trainer(target, store, FeatureCollator(pad_token_id=0), tmp_path / "b")
    batch_live = live.data_collator(examples[:3])
    batch_cached = cached.data_collator([store[i] for i in range(3)])
    assert batch_cached["hidden_states"].shape == (*batch_live["input_ids"].shape, 64)
    with torch.no_grad():
        loss_live, metrics_live = live._loss_and_metrics(live.model, batch_live)
        loss_cached, metrics_cached = cached._loss_and_metrics(cached.model, batch_cached)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-5)
    assert metrics_cached.keys() == metrics_live.keys()

    # a few optimizer steps: same data order, same losses
    live.train()
    cached.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (live, cached)]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-5)
    # the target's decoder did not run when training from the store
    calls = []
    handle = target.get_decoder().layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        cached._loss_and_metrics(cached.model, batch_cached)
        assert calls == []
        live._loss_and_metrics(live.model, batch_live)
        assert calls == [1]
    finally:
        handle.remove()


def test_features_recipe_and_train_from_store(tmp_path, monkeypatch):
    """`clover2 features` then `clover2 train --features` with a tiny target (loader and data stubbed)."""
    import clover2_hf.data as data_module
    import clover2_hf.tools.targets as targets_module
    from clover2_hf.tools.cli import main

    target = make_tiny_target("llama")
    tokenizer = SimpleNamespace(pad_token_id=0)
    examples = _examples(12)
    monkeypatch.setattr(targets_module, "load_target", lambda name, dtype=torch.float32: (target.to(dtype), tokenizer))
    summary = DataSummary(records=12, conversations=12, examples=12, train=10, eval=2)
    monkeypatch.setattr(data_module, "build_examples",
                        lambda *a, **k: DistillationData(train=examples[:10], eval=examples[10:], summary=summary))
    assert main(["features", "--output-dir", str(tmp_path / "feats"), "--shard-tokens", "64"]) == 0
    manifests = build_features(FeatureRecipe(output_dir=str(tmp_path / "feats"), shard_tokens=64))  # resumes: no-op
    assert manifests["train"]["num_examples"] == 10 and manifests["eval"]["num_examples"] == 2
    data = open_feature_data(tmp_path / "feats", target)
    assert len(data.train) == 10 and len(data.eval) == 2 and data.summary.records == 12

    from clover2_hf.tools.recipes import TrainRecipe, train

    draft = train(TrainRecipe(output_dir=str(tmp_path / "run"), features=str(tmp_path / "feats"), max_steps=2,
                              batch_size=2, grad_accum=1, warmup_steps=0, logging_steps=1, eval_steps=100,
                              save_steps=100, num_draft_depths=2, draft_vocab_size=32))
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert draft.d2t is not None
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "precomputed store" in card
