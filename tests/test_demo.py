"""clover2_hf.tools.demo: accepted-draft marking in the streamer, and `clover2 demo` end to end on SmolLM2."""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import pytest
import torch
from conftest import BYTE_VOCAB as VOCAB
from conftest import byte_chat_tokenizer, make_tiny_target
from drafters import train_on_own_outputs

from clover2_hf import Clover2Stats
from clover2_hf.tools.cli import _shipped_drafter, main
from clover2_hf.tools.demo import DraftHighlightStreamer, labels_from_stats

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def trained_pair():
    target = make_tiny_target("llama", seed=1, peaked=True, vocab_size=VOCAB)
    draft = train_on_own_outputs(target, steps=40, seqs=24, length=40, seed=0)
    prompts = torch.randint(3, VOCAB, (4, 4), generator=torch.Generator().manual_seed(0))
    return target, draft, prompts


def _ids(text: str) -> list[int]:
    return [3 + b for b in text.encode()] if text else []


def test_bracket_rendering_follows_tree_passes():
    """Tree mode puts one token per call; tokens_per_step grows just before each bonus token."""
    stats = Clover2Stats(mode="tree")
    out = io.StringIO()
    streamer = DraftHighlightStreamer(byte_chat_tokenizer(), stats, stream=out, style="brackets")
    streamer.put(torch.tensor([_ids("prompt")]))  # the prompt: not shown
    streamer.put(torch.tensor(_ids("a")))  # prefill token: the target's
    for drafted, bonus in [("bc", "d"), ("", "e"), ("fgh", "i")]:
        for ch in drafted:
            streamer.put(torch.tensor(_ids(ch)))
        stats.tokens_per_step.append(len(drafted) + 1)
        streamer.put(torch.tensor(_ids(bonus)))
    streamer.end()
    assert out.getvalue() == "a[bc]de[fgh]i\n"
    stats.new_tokens = 9
    assert streamer.labels == labels_from_stats(stats)


def test_chain_chunks_mark_all_but_the_last_token():
    stats = Clover2Stats(mode="chain")
    out = io.StringIO()
    streamer = DraftHighlightStreamer(byte_chat_tokenizer(), stats, stream=out, style="ansi")
    for chunk in ["prompt", "a", "bcd", "e"]:
        streamer.put(torch.tensor([_ids(chunk)]))
    streamer.end()
    assert out.getvalue() == "a\033[32mbc\033[0mde\n"


@pytest.mark.slow  # trains a drafter first (40 steps); a streamer-labelling feature, not losslessness
@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_live_labels_match_the_decoding_stats(mode):
    target, draft, prompts = trained_pair()
    tokenizer = byte_chat_tokenizer()
    draft.config.decoding = mode
    drafted = 0
    try:
        for prompt in prompts:
            stats = Clover2Stats()
            out = io.StringIO()
            streamer = DraftHighlightStreamer(tokenizer, stats, stream=out, style="ansi")
            seq = target.generate(prompt[None], do_sample=False, max_new_tokens=30, assistant_model=draft,
                                  clover2_stats=stats, streamer=streamer)
            new = seq[0, prompt.numel():].tolist()
            assert streamer.token_ids == new
            if mode == "tree":
                assert streamer.labels == labels_from_stats(stats)
            assert sum(streamer.labels) == sum(stats.accepted_depths)
            shown = re.sub(r"\033\[(32|0)m", "", out.getvalue())
            assert shown == tokenizer.decode(new, skip_special_tokens=True) + "\n"
            drafted += sum(streamer.labels)
    finally:
        draft.config.decoding = "tree"
    assert drafted > 10  # the trained drafter's tokens were accepted and marked


def test_shipped_drafter_is_found():
    """In a source checkout the CLI's default drafter is the repository's trained one, not an untrained one
    (the lookup once pointed inside the package after the CLI moved to clover2_hf/tools/)."""
    shipped = Path(__file__).resolve().parents[1] / "hub_configs" / "clover2-smollm2-135m-instruct"
    assert (shipped / "model.safetensors").is_file()
    assert _shipped_drafter() == str(shipped)


@pytest.mark.slow  # the embedded SmolLM2 target
def test_cli_demo_on_embedded_target(capsys):
    """`clover2 demo` on the embedded SmolLM2 with the shipped (or, until trained, an untrained) drafter."""
    assert main(["demo", "--max-new-tokens", "12", "--style", "brackets", "--device", "cpu",
                 "--prompt", "Name three colours."]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" not in out  # this checkout ships a trained drafter (test_shipped_drafter_is_found)
    assert "prompt: Name three colours." in out
    plain = re.search(r"plain generate : (\d+) tokens in [\d.]+ s = ([\d.]+) tokens/s", out)
    clover = re.search(r"Clover-2 \(tree\): (\d+) tokens in [\d.]+ s = ([\d.]+) tokens/s, tau ([\d.]+) tokens/pass", out)
    speedup = re.search(r"speedup        : ([\d.]+)x \((?:fastest of \d+ runs each; )?outputs identical: yes\)", out)
    assert plain and clover and speedup, out
    assert plain.group(1) == clover.group(1) == "12"
    assert float(clover.group(3)) >= 1.0 and float(speedup.group(1)) > 0
