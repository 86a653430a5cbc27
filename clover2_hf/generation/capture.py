"""The one place that reads the target's pre-norm last hidden states h_t (the drafter's input).

Clover-2 conditions the drafter on h_t, the input of the target's final norm (clover2_spec.md,
"Inputs"); the target's own output g_t = norm(h_t) is the regression label in training. Both are read
with a forward hook on `target.get_decoder().norm`, a public `nn.Module` mechanism, so any decoder whose
final norm is called once per forward on [B, T, H] works (decoding, training and the tests share this).

A drafter with `feature_layers` (EAGLE-3-style fusion) also reads the outputs of those decoder layers, with
forward hooks on `get_decoder().layers[i]`; its input is then [h_t ; f_l1 ; ... ; f_lk], [B, T, (1 + k) H].
"""

from __future__ import annotations

import torch

__all__ = ["PreNormCapture"]


class PreNormCapture:
    """Records the drafter's input features and g = norm(h) on every forward of the target.

    Use as a context manager, or call `remove()` when done::

        with PreNormCapture(target, draft.config.feature_layers) as capture:
            target(input_ids)
            h = capture.hidden  # [B, T, H], or [B, T, (1 + k) H] with k feature layers
    """

    def __init__(self, target, feature_layers: list[int] | None = None) -> None:
        decoder = target.get_decoder()
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise ValueError(f"{type(target).__name__}: cannot find the final norm `get_decoder().norm`")
        self.norm = norm
        self.hidden: torch.Tensor | None = None  # [B, T, (1 + k) H] [h_t ; f_l1 ; ...] of the latest forward
        self.post_norm: torch.Tensor | None = None  # [B, T, H] g_t = norm(h_t) of the latest forward
        self.feature_layers = list(feature_layers or ())
        self._layer_outputs: dict[int, torch.Tensor] = {}
        self._handles = [norm.register_forward_hook(self._hook)]
        for index in self.feature_layers:
            # relies on a decoder layer returning its output hidden states (a tensor in transformers 5; the first
            # item of a tuple in 4.x, also accepted); caught by tests/test_feature_layers.py::test_capture_reads_the_layer_outputs
            self._handles.append(decoder.layers[index].register_forward_hook(self._layer_hook(index)))

    def _layer_hook(self, index: int):
        def hook(module, args, output) -> None:
            self._layer_outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def _hook(self, module, args, output) -> None:
        h = args[0]
        if self.feature_layers:
            h = torch.cat([h] + [self._layer_outputs.pop(i).to(h.device) for i in self.feature_layers], dim=-1)
        self.hidden, self.post_norm = h, output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> PreNormCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
