"""Configuration of a Clover-2 draft model (arXiv 2408.00264).

This file is self-contained (it imports only `transformers`) because `save_pretrained` copies it next
to the weights, so that a machine without `clover2_hf` can load a checkpoint with
`trust_remote_code=True`.
"""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Target architectures whose own decoder layer, RMSNorm and rotary embedding the augmenting block
# reuses. The value is the class-name prefix inside `transformers.models.<type>.modeling_<type>`.
SUPPORTED_TARGET_TYPES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
}

DECODING_MODES = ("tree", "chain")
TREE_TYPES = ("dynamic", "static")


class Clover2Config(PreTrainedConfig):
    r"""
    Configuration of [`Clover2ForDrafting`], a draft model that proposes tokens for one target LM.

    The draft is built *for* a target: `text_config` is the target's own text config (hidden size H,
    vocabulary V, attention heads, decoder-layer hyper-parameters). The drafter's augmenting block is
    made of decoder layers of the target's architecture built from this config, and the drafter
    checks at run time that the attached target matches it.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            The target model's text config. Its `model_type` must be one of `SUPPORTED_TARGET_TYPES`.
        num_draft_depths (`int`, defaults to 5):
            N, the number of regressive head steps; depth 0 drafts the token two positions after the
            last verified hidden state, depth N-1 the token N+1 positions after it.
        num_augmenting_layers (`int`, defaults to 2):
            L, the number of target-architecture decoder layers in the augmenting block.
        regression_loss_weight (`float`, defaults to 10.0):
            v_w, weight of the SmoothL1 loss between the head output o_i and the target's post-norm state.
        distillation_loss_weight (`float`, defaults to 1.0):
            p_w, weight of the soft cross-entropy against the target's next-token distribution.
        depth_decay (`float`, defaults to 0.7):
            Loss weight of depth i is `depth_decay ** i`.
        feature_layers (`list[int]`, *optional*):
            Target decoder layers (0-based) whose outputs are fused into the drafter's input beside h_t, as
            EAGLE-3 fuses low-, mid- and high-level features: the input becomes
            h_t + W_f [RMSNorm(f_l1); ...; RMSNorm(f_lk)], with W_f initialised at zero so that a drafter
            grown this way starts out exactly as the h_t-only drafter it continues. `None` (the default)
            reads h_t only, as the paper does.
        draft_vocab_size (`int`, *optional*):
            When set, the heads score only this many target tokens (the most frequent ones in the
            training data, stored in the `d2t` buffer); drafted ids are mapped back to target ids, so
            verification stays exact. `None` drafts over the target's full vocabulary.
        base_model_name_or_path (`str`, *optional*):
            Hub id or path of the target the drafter was trained for (informative; used in model cards).
        decoding, tree_type, tree_budget, tree_top_k, tree_lookup_tokens, tree_lookup_ngram, static_shapes:
            The drafter's DEFAULT decoding options, saved with it; one `generate()` call overrides any of
            them with a keyword of the same name (`clover2_decoding=` for `decoding`), and nothing a call
            does changes them (`clover2_hf.generation.options`).
        decoding (`"tree"` or `"chain"`, defaults to `"tree"`):
            How `generate(assistant_model=draft)` uses the drafter: a dynamic token tree verified in one
            target pass (the paper's method) or a top-1 chain through transformers' assisted decoding.
        tree_type (`"dynamic"` or `"static"`, defaults to `"dynamic"`):
            Dynamic expands nodes by cumulative path probability; static uses the reference tree shape.
        tree_budget (`int` or `"auto"`, defaults to `"auto"`):
            Number of draft tokens (tree nodes, root excluded) verified per target forward pass. `"auto"`:
            `clover2 tune`'s stored choice for this target and device when there is one, else the tree is
            sized at every step from the device's measured verification costs and the drafter's own path
            probabilities, down to a plain step when no tree pays (`clover2_hf.generation.cost_model`). An integer
            is used as it is (the paper's setting is 25).
        tree_top_k (`int` or `"auto"`, defaults to `"auto"`):
            Number of children considered per expanded node (the paper's setting is 10); `"auto"`: the
            tuned value, else about sqrt(budget) + 1.
        tree_lookup_tokens (`int`, defaults to 10):
            Tree mode: also verify up to this many prompt-lookup tokens per pass (what followed the latest
            earlier occurrence of the last `tree_lookup_ngram`..2 tokens of prompt + output), merged into
            the draft tree as one extra path. Costs verification work only on steps that find a match;
            output is unchanged (every token is still the target's). 0 = off.
        tree_lookup_ngram (`int`, defaults to 3):
            Longest context tail (in tokens) searched by the lookup path.
        static_shapes (`bool`, defaults to `False`):
            Greedy tree mode: run every drafting step with the same tensor shapes (the augmenting block over
            a fixed number of positions with a preallocated KV buffer, every draft depth grown, the lookup path
            padded to `tree_lookup_tokens`, a fixed number of nodes verified), so that the step can be
            captured as a graph (`clover2_hf.generation.static_step`). A `"auto"` budget is then fixed to
            the device cost model's largest useful tree. Needs greedy decoding without logits processors.
        initializer_range (`float`, defaults to 0.02):
            Std of the normal init of weights that are not initialised from the target.
        init_noise (`float`, defaults to 0.01):
            Upper bound of the U(0, init_noise) noise added to the identity-initialised new weights.
    """

    model_type = "clover2"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_draft_depths: int = 5
    num_augmenting_layers: int = 2
    regression_loss_weight: float = 10.0
    distillation_loss_weight: float = 1.0
    depth_decay: float = 0.7
    draft_vocab_size: int | None = None
    feature_layers: list[int] | None = None
    base_model_name_or_path: str | None = None
    decoding: Literal["tree", "chain"] = "tree"
    tree_type: Literal["dynamic", "static"] = "dynamic"
    tree_budget: int | Literal["auto"] = "auto"
    tree_top_k: int | Literal["auto"] = "auto"
    tree_lookup_tokens: int = 10
    tree_lookup_ngram: int = 3
    static_shapes: bool = False
    initializer_range: float = 0.02
    init_noise: float = 0.01
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_clover2()

    def _validate_clover2(self) -> None:
        tc = self.text_config
        if tc.model_type not in SUPPORTED_TARGET_TYPES:
            raise ValueError(
                f"Clover-2 cannot build an augmenting block for target architecture '{tc.model_type}'. "
                f"Supported target model types: {', '.join(sorted(SUPPORTED_TARGET_TYPES))}."
            )
        if tc.hidden_size % tc.num_attention_heads != 0:
            raise ValueError(
                f"target hidden_size ({tc.hidden_size}) must be divisible by num_attention_heads "
                f"({tc.num_attention_heads}): the regressive attention cells split H into the target's heads."
            )
        _check_int("num_draft_depths", self.num_draft_depths, 1)
        _check_int("num_augmenting_layers", self.num_augmenting_layers, 1)
        check_decoding_options(self)
        for name in ("regression_loss_weight", "distillation_loss_weight", "init_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.depth_decay <= 1.0:
            raise ValueError(f"depth_decay must be in (0, 1], got {self.depth_decay}")
        if self.feature_layers is not None:
            self.feature_layers = check_feature_layers(self.feature_layers, tc.num_hidden_layers)
        if self.draft_vocab_size is not None:
            _check_int("draft_vocab_size", self.draft_vocab_size, 1)
            if self.draft_vocab_size > tc.vocab_size:
                raise ValueError(
                    f"draft_vocab_size ({self.draft_vocab_size}) exceeds the target vocabulary size ({tc.vocab_size})"
                )

    @property
    def hidden_size(self) -> int:
        """H, the target's (and the drafter's) hidden size."""
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        """V, the target's vocabulary size (drafted ids always live in this id space)."""
        return self.text_config.vocab_size


def _check_int(name: str, value: object, minimum: int, also: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' ' + also if also else ''}, got {value!r}")


def check_feature_layers(layers, num_target_layers: int) -> list[int]:
    """`layers` as a list of distinct target layer indices in [0, num_target_layers - 2], or a ValueError.

    The last layer's output is h_t itself, which the drafter always reads."""
    last = num_target_layers - 2
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= last for i in layers)
        or len(set(layers)) != len(layers)
    ):
        raise ValueError(
            f"feature_layers must be distinct target decoder layer indices in [0, {last}] (layer {last + 1}'s "
            f"output is h_t, which the drafter always reads), got {layers!r}"
        )
    return list(layers)


def check_decoding_options(options) -> None:
    """Validate the decoding options of a config or of one call (`generation.options.DecodingOptions`)."""
    if options.decoding not in DECODING_MODES:
        raise ValueError(f"decoding must be one of {DECODING_MODES}, got {options.decoding!r}")
    if options.tree_type not in TREE_TYPES:
        raise ValueError(f"tree_type must be one of {TREE_TYPES}, got {options.tree_type!r}")
    for name in ("tree_budget", "tree_top_k"):
        if getattr(options, name) != "auto":
            _check_int(name, getattr(options, name), 1, also='or "auto"')
    _check_int("tree_lookup_tokens", options.tree_lookup_tokens, 0)
    _check_int("tree_lookup_ngram", options.tree_lookup_ngram, 2)
    if not isinstance(options.static_shapes, bool):
        raise ValueError(f"static_shapes must be True or False, got {options.static_shapes!r}")


Clover2Config.register_for_auto_class()

__all__ = ["Clover2Config", "SUPPORTED_TARGET_TYPES"]
