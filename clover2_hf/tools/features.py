"""Precomputed target features for Clover-2 training: a sharded safetensors store on disk.

Training needs, per position, the frozen target's pre-norm last hidden state h_t (the drafter's
input); the labels are g_t = norm(h_t) and the target distribution softmax(lm_head(g_t)). This module
runs the target ONCE over a list of examples and writes h_t to disk, so that training can skip the
target's decoder (`Clover2Trainer` then only runs the target's final norm and lm_head).

What is stored, per shard (``shard-00000.safetensors``, ...; an example never spans two shards):

* ``hidden_states`` [sum T, H] in ``dtype`` (bfloat16 by default): h_t of every token, concatenated;
* ``input_ids`` [sum T] int32, ``loss_mask`` [sum T] uint8;
* ``offsets`` [n + 1] int64: example j of the shard is rows ``offsets[j]:offsets[j + 1]``;
* metadata: the example ids (JSON) and the index of the shard's first example.

What is NOT stored: g = norm(h) (as big as h and one RMSNorm away) and the target's distributions
(V floats per position: 49152 x 4 bytes = 192 KiB per token for SmolLM2, ~170x the size of h). Both
are recomputed from h at every training step, so a store saves the target's decoder forward only.
Disk use is about H x 2 + 5 bytes per token in bfloat16 (1157 B/token for SmolLM2, H = 576).

A ``manifest.json`` (written atomically, after every shard) records the shard plan, the finished
shards and a fingerprint of (target weights + config, data, store settings). Each shard is written
to a temporary file, fsynced and ``os.replace``d into place, so a crash never leaves a partial shard
under a shard name. Re-running `build_feature_store` with the same arguments resumes: finished
shards are kept, the rest are computed; a different target / data / settings raises
`FeatureStoreMismatchError` (``overwrite=True`` starts over).

On-the-fly features stay the default of ``clover2 train`` (``--features DIR`` opts in): building
costs about one target forward per token, as much as the target's share of one on-the-fly epoch
(less when the build batches better than training does), and the store saves at most that share
per epoch, minus reading h from disk; so it pays off only for runs of more than about one epoch,
and it costs ~H x 2 bytes per token of disk. ``scripts/measure_features.py`` measures the three
throughputs and the break-even number of epochs on a given machine.

Public API::

    build_feature_store(target, examples, out_dir, *, shard_tokens=131072, dtype=torch.bfloat16,
                        batch_size=4, overwrite=False, progress=True, info=None) -> dict  # manifest
    FeatureDataset(path)                  # map-style Dataset: input_ids, loss_mask, hidden_states
    FeatureCollator(pad_token_id=0)       # ConversationCollator that also pads hidden_states
    open_feature_data(path, target=None) -> DistillationData   # train (+ eval) stores of a directory
    build_features(FeatureRecipe)         # `clover2 features`: render data, build train/ and eval/
    target_digest(target), FeatureStoreMismatchError
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data import ConversationCollator, DataSummary, DistillationData
from ..training import target_features

from .._files import write_json_atomic
from . import targets

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureCollator",
    "FeatureDataset",
    "FeatureRecipe",
    "FeatureStoreMismatchError",
    "build_feature_store",
    "build_features",
    "open_feature_data",
    "target_digest",
]

FORMAT = "clover2-features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 17
_SHARD_NAME = "shard-{:05d}.safetensors"
_TMP_MARK = ".tmp-"
_DIGEST_SAMPLES = 4096  # values sampled per parameter tensor for the target digest
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_attn_implementation", "_commit_hash",
)


class FeatureStoreMismatchError(ValueError):
    """A feature store was built for another target, other data or other settings."""


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def target_digest(target) -> str:
    """SHA-256 of a target's text config and a strided sample of every parameter tensor.

    Sampled values are rounded to bfloat16 first, so the same checkpoint loaded in float32 or
    bfloat16 gives the same digest (the load dtype is checked separately when resuming a build);
    another checkpoint, architecture or size gives another digest.
    """
    config = target.config.get_text_config().to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in target.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _DIGEST_SAMPLES)
        sample = flat[::step][:_DIGEST_SAMPLES].to("cpu", torch.bfloat16).float()
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _data_digest(examples: Sequence[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.int64)
        mask = torch.as_tensor(ex["loss_mask"], dtype=torch.int64)
        digest.update(f"{ids.numel()}:{mask.numel()}:".encode())
        digest.update(ids.to(torch.int32).numpy().tobytes())
        digest.update(mask.to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(parts: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_shard_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write a safetensors file under a temporary name, fsync it, then rename it to `path`. Returns bytes."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path.stat().st_size


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[tuple[int, int]]:
    """[start, end) example ranges; a shard closes once it holds >= shard_tokens tokens."""
    plan, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        tokens += n
        if tokens >= shard_tokens:
            plan.append((start, i + 1))
            start, tokens = i + 1, 0
    if start < len(lengths):
        plan.append((start, len(lengths)))
    return plan


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _shard_features(target, examples: Sequence[Mapping[str, Any]], dtype: torch.dtype, batch_size: int,
                    progress) -> dict[str, torch.Tensor]:
    """Run the target over one shard's examples (length-sorted batches) and pack the shard's tensors."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    order = sorted(range(len(examples)), key=lambda j: -lengths[j])
    hidden: list[torch.Tensor | None] = [None] * len(examples)
    device = target.device
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        width = max(lengths[j] for j in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, j in enumerate(rows):
            ids[r, : lengths[j]] = torch.as_tensor(examples[j]["input_ids"], dtype=torch.long)
            attention_mask[r, : lengths[j]] = 1
        feats = target_features(target, ids.to(device), attention_mask.to(device))
        for r, j in enumerate(rows):
            hidden[j] = feats.hidden[r, : lengths[j]].to("cpu", dtype)
        progress.update(sum(lengths[j] for j in rows))
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    offsets[1:] = torch.as_tensor(lengths, dtype=torch.int64).cumsum(0)
    return {
        "hidden_states": torch.cat(hidden, dim=0).contiguous(),
        "input_ids": torch.cat([torch.as_tensor(ex["input_ids"], dtype=torch.int32) for ex in examples]),
        "loss_mask": torch.cat([torch.as_tensor(ex["loss_mask"], dtype=torch.uint8) for ex in examples]),
        "offsets": offsets,
    }


def build_feature_store(
    target,
    examples: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the frozen `target` over `examples` once and store h_t (pre-norm last hidden states).

    Args:
        target: the frozen causal LM (any device; features are moved to CPU).
        examples: ``{"input_ids", "loss_mask"[, "id"]}`` examples (lists or 1-D tensors), e.g.
            `clover2_hf.data.build_examples(...).train`. Their order is kept: store example i is
            ``examples[i]``.
        out_dir: the store's directory (created). Holds ``manifest.json`` and the shards.
        shard_tokens: a shard is closed once it holds at least this many tokens (whole examples).
            Peak host memory is about two shards; 131072 tokens are 151 MiB for H = 576 in bf16.
        dtype: dtype of the stored hidden states (float32 stores exactly what the target computed).
        batch_size: examples per target forward (length-sorted within a shard, right-padded).
            May change between resumed runs.
        overwrite: delete an existing store of different fingerprint instead of raising.
        progress: show a tqdm progress bar (tokens).
        info: extra JSON-serialisable facts stored under ``manifest["info"]`` (e.g. data source).

    Returns:
        The final manifest (``num_examples``, ``num_tokens``, ``bytes``, ``bytes_per_token``,
        ``shards``, ``seconds`` of this run, ...).

    Raises:
        FeatureStoreMismatchError: `out_dir` holds a store of another target / data / settings.
    """
    from tqdm.auto import tqdm

    if shard_tokens <= 0 or batch_size <= 0:
        raise ValueError("shard_tokens and batch_size must be positive")
    start_time = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target_dtype = next(target.parameters()).dtype
    hidden_size = target.config.get_text_config().hidden_size
    parts = {
        "target": target_digest(target),
        "data": _data_digest(examples),
        "settings": _fingerprint({
            "format_version": str(FORMAT_VERSION), "dtype": _dtype_name(dtype), "shard_tokens": str(shard_tokens),
            "target_dtype": _dtype_name(target_dtype),
        }),
    }
    fingerprint = _fingerprint(parts)
    lengths = [len(ex["input_ids"]) for ex in examples]
    plan = _plan_shards(lengths, shard_tokens)

    manifest_path = out / MANIFEST
    done: dict[int, dict[str, Any]] = {}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fingerprint:
            differ = [k for k in parts if old.get("fingerprint_parts", {}).get(k) != parts[k]] or ["format"]
            if not overwrite:
                raise FeatureStoreMismatchError(
                    f"{out} holds a feature store built for a different {' / '.join(differ)} "
                    f"(fingerprint {str(old.get('fingerprint'))[:12]} != {fingerprint[:12]}). Use another "
                    f"directory, or overwrite it (overwrite=True / `clover2 features --overwrite`)."
                )
            logger.warning("%s: overwriting a feature store built for a different %s", out, " / ".join(differ))
            for entry in old.get("shards", []):
                (out / entry["file"]).unlink(missing_ok=True)
            manifest_path.unlink()
        else:
            for entry in old.get("shards", []):
                path = out / entry["file"]
                if path.is_file() and path.stat().st_size == entry["bytes"]:
                    done[entry["index"]] = entry
                else:
                    logger.warning("%s: shard %s is missing or damaged; it will be rebuilt", out, entry["file"])
    for stale in out.glob(f".*{_TMP_MARK}*"):  # left by a crash in the middle of a write
        stale.unlink(missing_ok=True)

    total_tokens = sum(lengths)
    per_token = hidden_size * torch.empty((), dtype=dtype).element_size() + 5
    todo_tokens = sum(sum(lengths[a:b]) for k, (a, b) in enumerate(plan) if k not in done)
    free = shutil.disk_usage(out).free
    logger.info(
        "feature store %s: %d examples, %d tokens in %d shards (%d already done); about %s to write, %s free",
        out, len(examples), total_tokens, len(plan), len(done), _human_bytes(todo_tokens * per_token),
        _human_bytes(free),
    )
    if todo_tokens * per_token > free:
        logger.warning("%s: the store needs about %s but only %s are free", out,
                       _human_bytes(todo_tokens * per_token), _human_bytes(free))

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_parts": parts,
        "dtype": _dtype_name(dtype),
        "hidden_size": hidden_size,
        "shard_tokens": shard_tokens,
        "target": {
            "model_type": target.config.get_text_config().model_type,
            "name_or_path": getattr(target, "name_or_path", None) or None,
            "dtype": _dtype_name(target_dtype),
            "vocab_size": target.config.get_text_config().vocab_size,
        },
        "num_examples": len(examples),
        "num_tokens": total_tokens,
        "num_shards": len(plan),
        "shards": [],
        "complete": False,
        "info": dict(info or {}),
    }

    def save_manifest() -> None:
        manifest["shards"] = [done[k] for k in sorted(done)]
        manifest["complete"] = len(done) == len(plan)
        write_json_atomic(manifest_path, manifest, indent=1, tmp_prefix=f".{manifest_path.name}{_TMP_MARK}")

    save_manifest()
    bar = tqdm(total=total_tokens, initial=total_tokens - todo_tokens, unit="tok", unit_scale=True,
               desc="target features", disable=not progress, dynamic_ncols=True)
    try:
        for index, (a, b) in enumerate(plan):
            if index in done:
                continue
            tensors = _shard_features(target, examples[a:b], dtype, batch_size, bar)
            ids = [str(ex.get("id", a + j)) for j, ex in enumerate(examples[a:b])]
            name = _SHARD_NAME.format(index)
            size = _write_shard_atomic(out / name, tensors, {
                "format": FORMAT, "version": str(FORMAT_VERSION), "first_example": str(a), "ids": json.dumps(ids),
            })
            done[index] = {"index": index, "file": name, "examples": [a, b], "tokens": sum(lengths[a:b]),
                           "bytes": size}
            save_manifest()
            bar.set_postfix_str(_human_bytes(sum(e["bytes"] for e in done.values())))
    finally:
        bar.close()
    shard_bytes = sum(e["bytes"] for e in done.values())
    manifest["seconds"] = round(time.time() - start_time, 3)
    for _ in range(4):  # bytes counts the manifest itself, whose size depends on the number written
        manifest["bytes"] = shard_bytes + manifest_path.stat().st_size
        manifest["bytes_per_token"] = round(manifest["bytes"] / max(total_tokens, 1), 3)
        save_manifest()
        if manifest_path.stat().st_size + shard_bytes == manifest["bytes"]:
            break
    logger.info(
        "feature store %s complete: %d examples, %d tokens, %d shards, %s on disk (%d bytes, %.1f bytes/token, "
        "%s hidden states) in %.1f s",
        out, len(examples), total_tokens, len(plan), _human_bytes(manifest["bytes"]), manifest["bytes"],
        manifest["bytes_per_token"], manifest["dtype"], manifest["seconds"],
    )
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class FeatureDataset(torch.utils.data.Dataset):
    """A finished feature store as a map-style Dataset (shards opened lazily, memory-mapped).

    ``dataset[i]`` is ``{"id": str, "input_ids": LongTensor [T], "loss_mask": LongTensor [T],
    "hidden_states": Tensor [T, H]}`` (the store's dtype), for the i-th example given to
    `build_feature_store`. Only the example's rows of ``hidden_states`` are read from disk.
    ``dataset[a:b]`` is a `torch.utils.data.Subset`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a feature store (no {MANIFEST}); build one with "
                                    f"`clover2 features` or `build_feature_store`")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{self.path}: unsupported feature store format "
                             f"{self.manifest.get('format')} v{self.manifest.get('version')}")
        if not self.manifest.get("complete"):
            raise ValueError(
                f"{self.path}: the feature store is incomplete ({len(self.manifest['shards'])} of "
                f"{self.manifest['num_shards']} shards); rerun the same build to finish it"
            )
        self.shards = sorted(self.manifest["shards"], key=lambda e: e["index"])
        self._starts = [e["examples"][0] for e in self.shards]
        self._open: dict[int, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers: handles reopen lazily
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _shard(self, k: int):
        if k not in self._open:
            handle = safe_open(str(self.path / self.shards[k]["file"]), framework="pt")
            ids = json.loads(handle.metadata().get("ids", "[]"))
            self._open[k] = (handle, handle.get_tensor("offsets"), handle.get_tensor("input_ids"),
                             handle.get_tensor("loss_mask"), ids)
        return self._open[k]

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for a store of {len(self)}")
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return torch.utils.data.Subset(self, range(len(self))[index])
        k, j = self._locate(int(index))
        handle, offsets, input_ids, loss_mask, ids = self._shard(k)
        a, b = int(offsets[j]), int(offsets[j + 1])
        return {
            "id": ids[j] if j < len(ids) else str(index),
            "input_ids": input_ids[a:b].long(),
            "loss_mask": loss_mask[a:b].long(),
            "hidden_states": handle.get_slice("hidden_states")[a:b],
        }

    def token_examples(self) -> Iterator[dict[str, torch.Tensor]]:
        """``{"input_ids", "loss_mask"}`` of every example in order, without reading hidden states
        (e.g. for `clover2_hf.data.token_frequencies`)."""
        for k in range(len(self.shards)):
            _, offsets, input_ids, loss_mask, _ = self._shard(k)
            for j in range(len(offsets) - 1):
                a, b = int(offsets[j]), int(offsets[j + 1])
                yield {"input_ids": input_ids[a:b].long(), "loss_mask": loss_mask[a:b].long()}

    def check_target(self, target) -> None:
        """Raise `FeatureStoreMismatchError` unless `target` is the model the store was built with
        (any load dtype: see `target_digest`)."""
        if target_digest(target) != self.manifest["fingerprint_parts"]["target"]:
            raise FeatureStoreMismatchError(
                f"{self.path} was built with another target ({self.manifest['target']}); rebuild it for this "
                f"target or train with on-the-fly features"
            )


@dataclass
class FeatureCollator(ConversationCollator):
    """`ConversationCollator` that also right-pads ``hidden_states`` ([T, H] per example) with zeros
    into a [B, T, H] tensor (the store's dtype). Examples without ``hidden_states`` are collated as
    by `ConversationCollator`."""

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        if "hidden_states" not in examples[0]:
            return batch
        states = [torch.as_tensor(ex["hidden_states"]) for ex in examples]
        B, T = batch["input_ids"].shape
        hidden = states[0].new_zeros((B, T, states[0].shape[-1]))
        for row, h in enumerate(states):
            if h.shape[0] != len(examples[row]["input_ids"]):
                raise ValueError(f"hidden_states has {h.shape[0]} rows but input_ids has "
                                 f"{len(examples[row]['input_ids'])} tokens")
            hidden[row, : h.shape[0]] = h
        batch["hidden_states"] = hidden
        return batch


def open_feature_data(path: str | os.PathLike[str], target=None) -> DistillationData:
    """The stores of a `clover2 features` directory as `DistillationData` (train / eval Datasets).

    `path` is either one store (its ``manifest.json`` inside: train only, no eval) or a directory
    with ``train/`` and optionally ``eval/`` stores. With `target`, each store is checked against it.
    """
    root = Path(path)
    if (root / MANIFEST).is_file():
        train, evaluation = FeatureDataset(root), []
    else:
        train = FeatureDataset(root / "train")
        evaluation = FeatureDataset(root / "eval") if (root / "eval" / MANIFEST).is_file() else []
    for store in (train, evaluation):
        if target is not None and isinstance(store, FeatureDataset):
            store.check_target(target)
    summary = DataSummary(**{k: v for k, v in train.manifest.get("info", {}).get("summary", {}).items()
                             if k in ("records", "conversations", "examples", "train", "eval")})
    saved = train.manifest.get("info", {}).get("summary", {})
    summary.skipped.update(saved.get("skipped", {}))
    summary.repaired.update(saved.get("repaired", {}))
    summary.train, summary.eval = len(train), len(evaluation)
    return DistillationData(train=train, eval=evaluation, summary=summary)


# --------------------------------------------------------------------------------------------------
# `clover2 features`
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureRecipe:
    """Options of `clover2 features` (see `clover2 features --help`)."""

    output_dir: str
    target: str | None = None
    data: str | None = None
    max_length: int = 1024
    max_conversations: int | None = None
    eval_fraction: float = 0.05
    max_eval_examples: int = 200
    bf16: bool = False
    dtype: str = "bfloat16"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    batch_size: int = 4
    overwrite: bool = False


def build_features(recipe: FeatureRecipe) -> dict[str, dict[str, Any]]:
    """Render the data as `clover2 train` does and store the target's features of its train split in
    ``OUTPUT/train`` and of the first `max_eval_examples` eval examples in ``OUTPUT/eval``.
    Resumable: rerun the same command after an interruption. Returns the two manifests."""
    from ..data import build_examples

    target, tokenizer = targets.load_target(recipe.target, dtype=torch.bfloat16 if recipe.bf16 else torch.float32)
    target.to(targets.local_device())
    data = build_examples(tokenizer, recipe.data, max_length=recipe.max_length,
                          eval_fraction=recipe.eval_fraction, max_conversations=recipe.max_conversations)
    summary = data.summary
    info = {
        "target": recipe.target, "data": recipe.data, "max_length": recipe.max_length,
        "max_conversations": recipe.max_conversations, "eval_fraction": recipe.eval_fraction,
        "summary": {"records": summary.records, "conversations": summary.conversations, "examples": summary.examples,
                    "train": summary.train, "eval": summary.eval, "skipped": dict(summary.skipped),
                    "repaired": dict(summary.repaired)},
    }
    manifests = {}
    splits = {"train": data.train, "eval": data.eval[: recipe.max_eval_examples]}
    for split, examples in splits.items():
        if not examples:
            continue
        manifests[split] = build_feature_store(
            target, examples, Path(recipe.output_dir) / split, shard_tokens=recipe.shard_tokens,
            dtype=getattr(torch, recipe.dtype), batch_size=recipe.batch_size, overwrite=recipe.overwrite,
            info={**info, "split": split},
        )
    total = sum(m["bytes"] for m in manifests.values())
    tokens = sum(m["num_tokens"] for m in manifests.values())
    logger.info("features in %s: %s on disk for %d tokens (%.1f bytes/token)", recipe.output_dir,
                _human_bytes(total), tokens, total / max(tokens, 1))
    return manifests
