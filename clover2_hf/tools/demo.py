"""`clover2 demo`: stream a Clover-2 answer, marking the tokens that came from accepted drafts.

Each Clover-2 verification pass emits the drafter's accepted tokens followed by one token the target
chose itself (the "bonus" token; the very first new token, from the prefill, is the target's too).
`DraftHighlightStreamer` shows accepted-draft tokens in colour (ANSI, when the stream is a terminal)
or inside square brackets, so one sees how much of the answer the drafter wrote. After the answer,
the demo times plain greedy `generate()` on the same prompt in the same process and prints tokens/s
for both, tau (tokens per verification pass) and the speedup.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import torch
from transformers.generation.streamers import BaseStreamer

from ..generation.stats import Clover2Stats

__all__ = ["DEFAULT_PROMPT", "DemoResult", "DraftHighlightStreamer", "labels_from_stats", "run_demo"]

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."

_ANSI_DRAFT = "\033[32m"  # green
_ANSI_RESET = "\033[0m"


def labels_from_stats(stats: Clover2Stats) -> list[bool]:
    """Per new token of a finished tree-mode call: True when it was an accepted draft token.

    Token 0 comes from the prefill (the target's); then each verification pass emits
    `tokens_per_step[i]` tokens: accepted drafts, then the target's bonus token, except when a
    stopping criterion fired inside the accepted path (then the pass has no bonus token).
    """
    if stats.mode != "tree":
        raise ValueError(f"labels_from_stats needs tree-mode stats, got mode {stats.mode!r}")
    labels = [False] if stats.new_tokens else []
    for i, n in enumerate(stats.tokens_per_step):
        last = i == len(stats.tokens_per_step) - 1
        if last and stats.stopped_in_path:
            labels += [True] * n
        else:
            labels += [True] * (n - 1) + [False]
    return labels


class DraftHighlightStreamer(BaseStreamer):
    """A streamer that writes the decoded answer, marking accepted-draft tokens.

    Pass it as `streamer=` together with the same `clover2_stats=` object. How tokens are told apart:
    tree mode puts one token per call, and `stats.tokens_per_step` grows right before the target's
    bonus token is put; chain mode (transformers' assisted decoding) puts each pass's tokens in one
    call, the last being the target's. Without `stats` (plain generate) every token is the target's.

    Args:
        tokenizer: decodes the tokens (special tokens skipped).
        stats: the `Clover2Stats` of the running call, or None.
        stream: where the text goes (default: stdout).
        style: "ansi" (colour), "brackets" ([drafted text]), "none", or "auto" (ansi on a tty, else brackets).
    """

    def __init__(self, tokenizer, stats: Clover2Stats | None = None, stream: TextIO | None = None,
                 style: str = "auto") -> None:
        if style not in ("auto", "ansi", "brackets", "none"):
            raise ValueError(f"style must be auto, ansi, brackets or none, got {style!r}")
        self.tokenizer = tokenizer
        self.stats = stats
        self.stream = stream if stream is not None else sys.stdout
        if style == "auto":
            style = "ansi" if getattr(self.stream, "isatty", lambda: False)() else "brackets"
        self.style = style
        self.token_ids: list[int] = []
        self.labels: list[bool] = []  # True: accepted draft token
        self._prompt_seen = False
        self._steps_seen = 0
        self._printed = ""  # decoded text already written
        self._open = False  # inside a drafted run

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        if self.stats is None:
            labels = [False] * len(ids)
        elif self.stats.mode == "chain" or len(ids) > 1:
            labels = [True] * (len(ids) - 1) + [False]
        else:
            steps = len(self.stats.tokens_per_step)
            labels = [bool(self.token_ids) and steps == self._steps_seen]
            self._steps_seen = steps
        for token, drafted in zip(ids, labels):
            self.token_ids.append(token)
            self.labels.append(drafted)
            self._write(drafted, final=False)

    def end(self) -> None:
        self._write(False, final=True)
        self._close_run()
        self.stream.write("\n")
        self.stream.flush()

    def _write(self, drafted: bool, final: bool) -> None:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        new = text[len(self._printed):]
        if not new:
            return
        if drafted and not self._open and self.style != "none":
            self.stream.write(_ANSI_DRAFT if self.style == "ansi" else "[")
            self._open = True
        elif not drafted:
            self._close_run()
        self.stream.write(new)
        self.stream.flush()
        self._printed = text

    def _close_run(self) -> None:
        if self._open:
            self.stream.write(_ANSI_RESET if self.style == "ansi" else "]")
            self._open = False


@dataclass
class DemoResult:
    """Timings (seconds) and counts of one demo run; both generations are greedy with the same cap."""

    answer: str
    new_tokens: int
    plain_new_tokens: int
    clover2_time_s: float
    plain_time_s: float
    tau: float  # tokens per verification pass
    steps: int  # verification passes after the prefill
    draft_share: float  # fraction of the Clover-2 call spent drafting
    identical: bool  # Clover-2 output == plain greedy output
    drafted_tokens: int  # new tokens that were accepted drafts
    tree_settings: str = ""  # the tree settings the Clover-2 call used and where they came from
    plain_steps: int = 0  # verification passes over the root token alone (no tree paid there)
    timed_runs: int = 1  # runs per method; the times are the fastest of them

    @property
    def clover2_tokens_per_s(self) -> float:
        return self.new_tokens / self.clover2_time_s if self.clover2_time_s > 0 else 0.0

    @property
    def plain_tokens_per_s(self) -> float:
        return self.plain_new_tokens / self.plain_time_s if self.plain_time_s > 0 else 0.0

    @property
    def speedup(self) -> float:
        """Clover-2 tokens/s over plain tokens/s."""
        return self.clover2_tokens_per_s / self.plain_tokens_per_s if self.plain_tokens_per_s > 0 else 0.0

    def summary(self) -> str:
        """The numbers as a few lines of text."""
        return "\n".join([
            f"plain generate : {self.plain_new_tokens} tokens in {self.plain_time_s:.2f} s = "
            f"{self.plain_tokens_per_s:.1f} tokens/s",
            f"Clover-2 (tree): {self.new_tokens} tokens in {self.clover2_time_s:.2f} s = "
            f"{self.clover2_tokens_per_s:.1f} tokens/s, tau {self.tau:.2f} tokens/pass, "
            f"{self.drafted_tokens}/{self.new_tokens} tokens from accepted drafts, "
            f"draft share {100 * self.draft_share:.0f}%",
            f"speedup        : {self.speedup:.2f}x ("
            + (f"fastest of {self.timed_runs} runs each; " if self.timed_runs > 1 else "")
            + f"outputs identical: {'yes' if self.identical else 'NO'})",
            f"tree settings  : {self.tree_settings}"
            + (f"; {self.plain_steps} of {self.steps} passes verified no draft (plain steps)" if self.plain_steps else ""),
        ])


def _timed_generate(target, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, float]:
    device = target.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def run_demo(target, tokenizer, draft, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 128,
             stream: TextIO | None = None, style: str = "auto", warmup: bool = True,
             timing_rounds: int = 3) -> DemoResult:
    """Stream a Clover-2 tree-decoding answer to `prompt` into `stream`, then time plain generate.

    All runs are greedy with `max_new_tokens`; all write through a `DraftHighlightStreamer` (the timed
    repeats and plain's to a throw-away buffer) so that they pay the same streaming cost. After the
    streamed run and one plain run, `timing_rounds - 1` more pairs run in alternating order, and each
    method's fastest run is reported (a burst of load from another process then hurts neither side
    alone). Tree decoding is asked for per call (`clover2_decoding="tree"`); the drafter is not changed.
    """
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"].to(target.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tree = {"assistant_model": draft, "clover2_decoding": "tree"}
    if warmup:
        _timed_generate(target, ids, max_new_tokens=4, pad_token_id=pad)
        _timed_generate(target, ids, max_new_tokens=4, pad_token_id=pad, **tree)
    stats = Clover2Stats()
    streamer = DraftHighlightStreamer(tokenizer, stats, stream=stream, style=style)
    out, clover2_time = _timed_generate(target, ids, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                        **tree, clover2_stats=stats, streamer=streamer)
    quiet = DraftHighlightStreamer(tokenizer, None, stream=io.StringIO(), style="none")
    plain, plain_time = _timed_generate(target, ids, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                        streamer=quiet)
    for _ in range(max(timing_rounds, 1) - 1):
        quiet = DraftHighlightStreamer(tokenizer, None, stream=io.StringIO(), style="none")
        _, again = _timed_generate(target, ids, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=quiet)
        plain_time = min(plain_time, again)
        quiet = DraftHighlightStreamer(tokenizer, Clover2Stats(), stream=io.StringIO(), style="none")
        _, again = _timed_generate(target, ids, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                   **tree, streamer=quiet, clover2_stats=quiet.stats)
        clover2_time = min(clover2_time, again)
    new = out[0, ids.shape[1]:]
    return DemoResult(
        answer=tokenizer.decode(new, skip_special_tokens=True),
        new_tokens=int(new.numel()),
        plain_new_tokens=int(plain.shape[1] - ids.shape[1]),
        clover2_time_s=clover2_time,
        plain_time_s=plain_time,
        tau=stats.tau,
        steps=len(stats.tokens_per_step),
        draft_share=stats.draft_share,
        identical=torch.equal(out, plain),
        drafted_tokens=sum(streamer.labels),
        tree_settings=stats.tree_settings,
        plain_steps=stats.plain_steps,
        timed_runs=max(timing_rounds, 1),
    )
