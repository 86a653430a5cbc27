"""The target's verification pass over a draft tree: its attention mask argument and the CPU kernel switches.

Core code shared by tree decoding (`clover2_hf.generation.tree_step`) and the device cost model
(`clover2_hf.generation.cost_model`), so that both time and run the same forward.
"""

from __future__ import annotations

import os

import torch

from .tree import ancestor_attention_mask

__all__ = ["CpuMaskedGqa", "CpuVerifyLinears", "FORCE_GQA_ENV", "target_mask_kwargs", "wide_linear_forward"]


def wide_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward`, computed as W @ x^T for the row counts where some CPU BLAS is faster that way."""
    rows = x.reshape(-1, x.shape[-1])  # [q, in]
    out_features, in_features = self.weight.shape
    if rows.shape[0] == 1 or (rows.shape[0] > 4 and out_features < 8 * in_features):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, rows.t()).t()  # [q, out]: the same products, another BLAS call shape
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


class CpuVerifyLinears:
    """Runs the target's float32 `nn.Linear` layers as W @ x^T in tree verification passes on a CPU.

    Why: with some CPU BLAS builds float32 `F.linear` over a few rows (x [q, in], the verification pass
    of a small tree) is far slower per row than over one row, while the same product written W @ x^T
    runs through a faster kernel for up to 4 rows, and for the tall vocabulary head (out >= 8 x in) at
    any q (measurements: docs/kernel_measurements.md). Plain decoding (q = 1) is unchanged, so the
    baseline is not made faster. Only exact `nn.Linear` modules with float32 CPU weights are switched,
    per instance and only inside `with self:`; the products are the same up to float rounding order,
    as with any other kernel choice (greedy identity is checked by the tests and by every benchmark).
    Whether it pays depends on the CPU and its BLAS (on others it makes the same passes slower), so it
    is off unless `enabled`: the device calibration (`clover2_hf.generation.cost_model`)
    times the passes both ways and turns it on only where it measured faster.
    `CLOVER2_HF_WIDE_LINEAR=1` / `=0` forces it on / off in decoding (timings pass `honour_env=False`,
    so what they record is the kernel that really ran).
    """

    def __init__(self, target, enabled: bool = False, honour_env: bool = True) -> None:
        forced = os.environ.get("CLOVER2_HF_WIDE_LINEAR", "").strip() if honour_env else ""
        enabled = forced != "0" if forced in ("0", "1") else bool(enabled)
        self.modules = [
            m for m in target.modules()
            if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
        ] if enabled else []

    def __enter__(self) -> None:
        # a module whose forward is already replaced on the instance (accelerate's device / offload
        # hooks) is left alone, so nothing of anyone else's is overwritten or removed
        self._patched = [m for m in self.modules if "forward" not in m.__dict__]
        for module in self._patched:
            # an instance attribute shadows nn.Linear.forward (torch's call path); caught by
            # tests/test_decoding.py::test_cpu_verify_linears_compute_the_same_products_and_are_restored
            module.forward = wide_linear_forward.__get__(module)

    def __exit__(self, *exc) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched = []


# read by transformers' sdpa_attention_forward at every call (integrations/sdpa_attention.py); caught by
# tests/test_decoding.py::test_cpu_masked_gqa_keeps_outputs_sets_the_switch_only_inside_and_respects_the_user
FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


class CpuMaskedGqa:
    """Lets transformers' SDPA attention keep grouped-query attention in tree verification passes on a CPU.

    transformers' `sdpa_attention_forward` repeats the key/value heads of grouped-query attention
    (`repeat_kv`: a copy of the layer's whole KV cache) whenever an attention mask is passed, because on
    CUDA a masked `enable_gqa` call falls back to SDPA's math kernel. A tree verification pass always
    passes a mask, so on a CPU it paid for those copies while plain decoding (no mask) did not
    (docs/kernel_measurements.md). torch's CPU SDPA takes a
    mask together with `enable_gqa=True` (the same query-to-key head mapping as `repeat_kv`), and
    transformers reads its switch `TRANSFORMERS_SDPA_FORCE_GQA` at every attention call. Inside
    `with self:` that switch is set, only when every target weight is on the CPU and the target uses
    SDPA, and never over a value the user set. The switch is an environment variable, so while a pass
    runs it also applies to masked SDPA calls of other threads (on CUDA they would take the slower math
    kernel, with the same results). Set `CLOVER2_HF_CPU_GQA=0` to switch it off.
    """

    def __init__(self, target) -> None:
        self.enabled = (
            os.environ.get("CLOVER2_HF_CPU_GQA", "1") != "0"
            and getattr(target.config, "_attn_implementation", None) == "sdpa"
            and all(p.device.type == "cpu" for p in target.parameters())
        )
        self._set = False

    def __enter__(self) -> None:
        self._set = self.enabled and FORCE_GQA_ENV not in os.environ
        if self._set:
            os.environ[FORCE_GQA_ENV] = "1"

    def __exit__(self, *exc) -> None:
        if self._set:
            os.environ.pop(FORCE_GQA_ENV, None)
        self._set = False


def target_mask_kwargs(target, cache, ancestors: torch.Tensor, depths: torch.Tensor, past_length,
                       dtype: torch.dtype):
    """The `attention_mask` argument for a verification pass over a tree: one mask, or one per layer type.

    ancestors [q, q] / depths [q]: the tree in verification order, root first (`DraftTree.ancestor_matrix`
    and `DraftTree.verify_depths`, or the device walk's tensors); `past_length`: an int or a [1] tensor."""
    config = target.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)

    def mask_for(layer_idx: int, sliding: int | None) -> torch.Tensor:
        kv_length, kv_offset = cache.get_mask_sizes(depths.numel(), layer_idx)
        return ancestor_attention_mask(ancestors, depths, past_length, kv_length, kv_offset, dtype, sliding)

    if layer_types is not None:
        masks = {t: mask_for(layer_types.index(t), window if t == "sliding_attention" else None)
                 for t in dict.fromkeys(layer_types)}
        if len(masks) == 1 and "sliding_attention" not in masks:
            return masks["full_attention"]
        return masks
    return mask_for(0, window)
