"""The one place that reads the target's pre-norm last hidden states h_t (the drafter's input).

Clover-2 conditions the drafter on h_t, the input of the target's final norm (clover2_spec.md,
"Inputs"); the target's own output g_t = norm(h_t) is the regression label in training. Both are read
with a forward hook on `target.get_decoder().norm`, a public `nn.Module` mechanism, so any decoder whose
final norm is called once per forward on [B, T, H] works (decoding, training and the tests share this).
"""

from __future__ import annotations

import torch

__all__ = ["PreNormCapture"]


class PreNormCapture:
    """Records the input (h) and output (g = norm(h)) of the target's final norm on every forward.

    Use as a context manager, or call `remove()` when done::

        with PreNormCapture(target) as capture:
            target(input_ids)
            h = capture.hidden  # [B, T, H]
    """

    def __init__(self, target) -> None:
        norm = getattr(target.get_decoder(), "norm", None)
        if norm is None:
            raise ValueError(f"{type(target).__name__}: cannot find the final norm `get_decoder().norm`")
        self.norm = norm
        self.hidden: torch.Tensor | None = None  # [B, T, H] h_t of the latest forward
        self.post_norm: torch.Tensor | None = None  # [B, T, H] g_t = norm(h_t) of the latest forward
        self._handle = norm.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.hidden, self.post_norm = args[0], output

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> PreNormCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
