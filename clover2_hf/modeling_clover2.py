"""Clover-2 draft model (arXiv 2408.00264) as a transformers `PreTrainedModel`.

One model, one file, as in transformers' own `modeling_*.py`. It knows nothing of decoding or
training: it maps target hidden states and tokens to draft head states and draft logits.

Per draft step at position t (notation of the paper; H = hidden size, V = target vocabulary):

    s_t = A1(h_t, E[x_{t+1}])                   regressive attention cell, `input_cell`
    c_t = norm(AugmentingBlock(s_<=t))[t]        L target-architecture decoder layers + norm
    depth 0:  o_0 = HeadNorm(FC1(c_t))           r_0 = c_t
    depth i:  r_i = A2(r_{i-1}, E[y_i])          `head_cell`
              o_i = HeadNorm(FC2([r_i ; E[y_i]]))
    logits_i = lm_head(o_i)

h_t is the target's last-layer hidden state BEFORE its final norm (with `feature_layers`, h_t plus a fused
projection of earlier layers' outputs: `fuse_features`); E and lm_head are the target's
output head weight (V x H). They are never stored in this model: `attach_target` borrows them from
the target at run time, so a checkpoint holds draft weights only.

This file is self-contained (imports only torch, transformers and its sibling configuration file)
because `save_pretrained` copies it next to the weights for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput, logging

from .configuration_clover2 import SUPPORTED_TARGET_TYPES, Clover2Config

logger = logging.get_logger(__name__)

# The KV-cache keyword of transformers' models, decoder layers, `create_causal_mask`, generate's model_kwargs and
# outputs: `cache` from transformers 5.24, `past_key_values` before. Read from the installed version's signature;
# caught by the whole suite, which CI runs on the oldest and the newest supported transformers (.ci/run).
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

NEEDS_PACKAGE_MESSAGE = (
    "Clover2ForDrafting is not a transformers assistant model: generate(assistant_model=<Clover-2 drafter>) needs "
    "the clover2-hf package (pip install clover2-hf, then `import clover2_hf` before calling generate), or, without "
    "the package, generate(..., assistant_model=draft, custom_generate=<this drafter's repo or directory>, "
    "trust_remote_code=True)."
)

# Target types whose RMSNorm computes `x_normed * (1 + weight)`: identity init is zeros, not ones.
_UNIT_OFFSET_NORM_TYPES = ("gemma", "gemma2")


def target_architecture_classes(model_type: str) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """Return the target architecture's (DecoderLayer, RMSNorm, RotaryEmbedding) transformers classes."""
    if model_type not in SUPPORTED_TARGET_TYPES:
        raise ValueError(
            f"Unsupported target architecture '{model_type}'. "
            f"Supported target model types: {', '.join(sorted(SUPPORTED_TARGET_TYPES))}."
        )
    prefix = SUPPORTED_TARGET_TYPES[model_type]
    # relies on transformers' module layout and class names (models/<type>/modeling_<type>.py, <Prefix>DecoderLayer,
    # ...); caught by tests/test_model.py::test_output_shapes over every supported architecture
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return (
        getattr(module, f"{prefix}DecoderLayer"),
        getattr(module, f"{prefix}RMSNorm"),
        getattr(module, f"{prefix}RotaryEmbedding"),
    )


def augmenting_block_config(text_config, num_layers: int):
    """The target's text config, cut to `num_layers` full-attention layers.

    The augmenting block attends causally over the whole context, as the reference's Llama layers do:
    sliding-window layer types of the target (Mistral, Qwen2, Gemma-2) are replaced by full attention.
    """
    values = text_config.to_dict()
    values["num_hidden_layers"] = num_layers
    if values.get("layer_types") is not None:
        values["layer_types"] = ["full_attention"] * num_layers
    if text_config.model_type == "mistral":
        values["sliding_window"] = None
    if "use_sliding_window" in values:
        values["use_sliding_window"] = False
    return text_config.__class__.from_dict(values)


class Clover2RMSNorm(nn.Module):
    """RMSNorm with a weight initialised to ones; used on the state input of the attention cells."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Clover2RegressiveAttention(nn.Module):
    """The regressive attention cell A(x, y) of Clover-2.

    x is a state, y a token embedding, both [..., H]. With n = the target's attention heads and
    d = H / n, per head j: a_j = cos(q_j, k_j) (a scalar), and the output is x + concat_j(a_j * v_j),
    where q = Wq RMSNorm(x) + bq, k = Wk y + bk, v = Wv y + bv. There is no output projection.
    """

    def __init__(self, hidden_size: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.norm = Clover2RMSNorm(hidden_size, eps=eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.q_proj._clover2_init = self.k_proj._clover2_init = "identity"
        self.v_proj._clover2_init = "noise"

    def forward(self, state: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        heads = (*state.shape[:-1], self.num_heads, self.head_dim)
        q = self.q_proj(self.norm(state)).view(heads)  # [..., n, d]
        k = self.k_proj(token_embeds).view(heads)  # [..., n, d]
        v = self.v_proj(token_embeds).view(heads)  # [..., n, d]
        score = F.cosine_similarity(q, k, dim=-1, eps=1e-6).unsqueeze(-1)  # [..., n, 1]
        return state + (score * v).flatten(-2)


@dataclass
class Clover2Output(ModelOutput):
    """Teacher-forced outputs of [`Clover2ForDrafting`] over a sequence.

    Attributes:
        head_states: [B, N, T, H] HeadNorm outputs o_i for every depth i and position t.
        logits: [B, N, T, V_draft] draft logits, only when `return_logits=True`.
        augmented_states: [B, T, H] c_t, the augmenting block's normed output.
        cache: the augmenting block's KV cache when `use_cache=True`.
    """

    head_states: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    augmented_states: torch.FloatTensor | None = None
    cache: Cache | None = None


class Clover2PreTrainedModel(PreTrainedModel):
    config: Clover2Config
    config_class = Clover2Config
    base_model_prefix = "clover2"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.", r"embed_tokens\."]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading safetensors only (a pickle file is never loaded)."""
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialisation rules of the paper for the new weights.

        `Clover2ForDrafting.__init__` tags each new Linear with `_clover2_init` ("identity": I + U(0, noise),
        or [I | 0] + U(0, noise) for FC2; "noise": U(0, noise)); biases start at 0. The rules live on the
        Linear modules themselves because transformers skips `_init_weights` for custom-code modules that
        own no parameters directly. Weights loaded from a checkpoint carry `_is_hf_initialized` and are
        left alone.
        """
        super()._init_weights(module)
        rule = getattr(module, "_clover2_init", None)
        noise = self.config.init_noise
        if rule == "identity":
            _identity_plus_noise_(module.weight, noise)
        elif rule == "noise":
            init.uniform_(module.weight, 0.0, noise)
        elif rule == "zeros":
            init.zeros_(module.weight)
        if rule is not None and module.bias is not None:
            init.zeros_(module.bias)
        if (
            "RMSNorm" in type(module).__name__
            and not isinstance(module, Clover2RMSNorm)
            and self.config.text_config.model_type in _UNIT_OFFSET_NORM_TYPES
        ):
            init.zeros_(module.weight)  # (1 + weight) parametrisation: zeros is the identity scale
        d2t = getattr(module, "d2t", None)
        # relies on transformers tagging loaded tensors `_is_hf_initialized` (private); caught by
        # tests/test_checkpoint.py's reload tests (a re-initialised d2t or weight changes the outputs)
        if isinstance(module, Clover2PreTrainedModel) and d2t is not None and not getattr(d2t, "_is_hf_initialized", False):
            d2t.copy_(torch.arange(d2t.numel(), device=d2t.device))


def _identity_plus_noise_(weight: torch.Tensor, noise: float) -> None:
    """weight <- [I | 0] + U(0, noise), for a [out, in] weight with in >= out; skips loaded weights."""
    if getattr(weight, "_is_hf_initialized", False):
        return
    with torch.no_grad():
        weight.uniform_(0.0, noise)
        weight.diagonal().add_(1.0)


def _drop_draft_head_cache(module: nn.Module, incompatible_keys) -> None:
    """`load_state_dict` post-hook: the cached head rows were gathered with the old `d2t`."""
    module._draft_head_weight = None


class Clover2ForDrafting(Clover2PreTrainedModel):
    """Clover-2 draft model: regressive attention cells, augmenting block and recurrent heads.

    Build one for a target with [`Clover2ForDrafting.from_target`], or load one with
    `AutoModel.from_pretrained` and call [`attach_target`] before use.

    Two ways to run it:
    - `forward(hidden_states, next_input_ids)`: all positions and all depths, teacher-forced
      (training). Depth i at position t reads the token `next_input_ids[:, t + i]`.
    - incremental (decoding): `augment(...)` once per newly verified token with a KV cache, then
      `head_step(...)` once per draft depth on any set of tree nodes, and `head_logits(...)`.
    """

    def __init__(self, config: Clover2Config) -> None:
        tc = config.text_config
        layer_cls, norm_cls, rotary_cls = target_architecture_classes(tc.model_type)
        # The augmenting layers support the attention kernels that the target's own layers support
        # (Gemma-2's soft-capping rules out sdpa); transformers checks this during __init__.
        # relies on <Prefix>PreTrainedModel beside the layer class and its `_supports_sdpa` flag; caught by
        # tests/test_decoding.py::test_greedy_identical_across_attention_kernels_and_dtypes
        target_base = getattr(importlib.import_module(layer_cls.__module__), f"{SUPPORTED_TARGET_TYPES[tc.model_type]}PreTrainedModel")
        object.__setattr__(self, "_supports_sdpa", target_base._supports_sdpa)
        super().__init__(config)
        hidden, heads, eps = tc.hidden_size, tc.num_attention_heads, tc.rms_norm_eps
        self._augmenting_config = augmenting_block_config(tc, config.num_augmenting_layers)

        self.input_cell = Clover2RegressiveAttention(hidden, heads, eps)  # A1
        self.augmenting_layers = nn.ModuleList(
            [layer_cls(self._augmenting_config, i) for i in range(config.num_augmenting_layers)]
        )
        self.augmenting_norm = norm_cls(hidden, eps=eps)
        self.rotary_emb = rotary_cls(config=self._augmenting_config)
        self.fc1 = nn.Linear(hidden, hidden, bias=True)
        self.head_cell = Clover2RegressiveAttention(hidden, heads, eps)  # A2
        self.fc2 = nn.Linear(2 * hidden, hidden, bias=True)
        self.head_norm = norm_cls(hidden, eps=eps)  # HeadNorm, shared by all depths
        self.fc1._clover2_init = self.fc2._clover2_init = "identity"
        if config.feature_layers:  # EAGLE-3-style fusion of earlier target layers (see `fuse_features`)
            num_features = len(config.feature_layers)
            self.feature_norms = nn.ModuleList([Clover2RMSNorm(hidden, eps=eps) for _ in range(num_features)])
            self.feature_fc = nn.Linear(num_features * hidden, hidden, bias=False)
            self.feature_fc._clover2_init = "zeros"  # starts as the h_t-only drafter
        else:
            self.feature_norms = self.feature_fc = None
        if config.draft_vocab_size is not None:
            # d2t[j] = target token id of draft-vocabulary entry j
            self.register_buffer("d2t", torch.arange(config.draft_vocab_size, dtype=torch.long), persistent=True)
        else:
            self.d2t = None
        self._no_split_modules = [layer_cls.__name__]
        self._target_head = None  # the target's output head; kept out of the module tree on purpose
        self._draft_head_weight = None  # cached head rows (lm_head.weight[d2t], cast); see _head_weight_and_bias
        # loading a state dict may bring another d2t: drop the cached rows (runs for a parent's load_state_dict too)
        self.register_load_state_dict_post_hook(_drop_draft_head_cache)
        self.post_init()

    def __setattr__(self, name: str, value) -> None:
        if name == "_target_head":  # keep the borrowed head out of parameters, state_dict and .to()
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name == "generation_config":
            # A drafter has no generation config (it cannot generate on its own). The one caller that asks for it
            # is stock assisted decoding, reached by `generate(assistant_model=draft)` without the package's
            # generate hook: fail there with what to do instead (still an AttributeError, so hasattr() is False).
            raise AttributeError(NEEDS_PACKAGE_MESSAGE)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ target attachment

    @classmethod
    def from_target(cls, target: PreTrainedModel, **config_overrides) -> Clover2ForDrafting:
        """Build a drafter for `target`, initialised from it as the paper says, and attach it.

        The augmenting layers copy the target's last decoder layer; the augmenting norm and HeadNorm
        copy its final norm; the cells and FC layers get the identity-plus-noise init. The result is
        on the target's (first) device and in its dtype.

        Args:
            target: a causal LM of a supported architecture (`target.get_output_embeddings()` is its head).
            **config_overrides: any [`Clover2Config`] field (e.g. `num_draft_depths=4`).
        """
        text_config = target.config.get_text_config()
        values = text_config.to_dict()
        for key in ("quantization_config", "_name_or_path", "architectures", "auto_map"):
            values.pop(key, None)
        config_overrides.setdefault("base_model_name_or_path", getattr(target, "name_or_path", None) or None)
        config = Clover2Config(text_config=values, **config_overrides)
        head = target.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(target).__name__} has no output embeddings: Clover-2 needs a causal LM target.")
        draft = cls(config).to(device=head.weight.device, dtype=head.weight.dtype)
        decoder = target.get_decoder()
        last_layer_state = decoder.layers[-1].state_dict()
        with torch.no_grad():
            for layer in draft.augmenting_layers:
                layer.load_state_dict(last_layer_state)
            draft.augmenting_norm.load_state_dict(decoder.norm.state_dict())
            draft.head_norm.load_state_dict(decoder.norm.state_dict())
        return draft.attach_target(target)

    def attach_target(self, target: PreTrainedModel) -> Clover2ForDrafting:
        """Borrow the target's output head (used as both E and lm_head). Returns self.

        Raises:
            ValueError: when the target's hidden size or vocabulary differs from the drafter's config.
        """
        tc = self.config.text_config
        target_tc = target.config.get_text_config()
        problems = []
        if getattr(target_tc, "hidden_size", None) != tc.hidden_size:
            problems.append(f"hidden size {getattr(target_tc, 'hidden_size', None)} != drafter's {tc.hidden_size}")
        head = target.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(target).__name__} has no output head to borrow: Clover-2 needs a causal LM.")
        if tuple(head.weight.shape) != (tc.vocab_size, tc.hidden_size) or target_tc.vocab_size != tc.vocab_size:
            problems.append(
                f"vocabulary {target_tc.vocab_size} (head {tuple(head.weight.shape)}) != drafter's {tc.vocab_size}"
            )
        if problems:
            raise ValueError(
                f"This Clover-2 drafter was built for a different target "
                f"({self.config.base_model_name_or_path or tc.model_type}): " + "; ".join(problems) + "."
            )
        self._target_head = head
        self._draft_head_weight = None
        return self

    @property
    def target_head(self) -> nn.Module:
        """The attached target's output head ([V, H] weight). Raises if no target is attached."""
        if self._target_head is None:
            raise RuntimeError(
                "This Clover-2 drafter has no target attached: call `draft.attach_target(target)` (or build it "
                "with `Clover2ForDrafting.from_target(target)`). Its checkpoint holds draft weights only; the "
                "token embedding and lm_head are borrowed from the target at run time."
            )
        return self._target_head

    def get_input_embeddings(self) -> None:
        """None: the drafter owns no embedding (E is the target's head, borrowed at run time).

        Frameworks that look for embeddings to tie or wrap (accelerate's FSDP preparation) skip it."""
        return None

    def get_output_embeddings(self) -> None:
        """None: the drafter's output head is the target's, borrowed at run time (see `target_head`)."""
        return None

    @property
    def is_attached(self) -> bool:
        return self._target_head is not None

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Set the truncated draft vocabulary: `token_ids` [V_draft] are target ids, in head order."""
        if self.d2t is None:
            raise ValueError("set_draft_vocab needs a config with draft_vocab_size set")
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if token_ids.numel() != self.d2t.numel():
            raise ValueError(f"expected {self.d2t.numel()} token ids, got {token_ids.numel()}")
        if token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size or token_ids.unique().numel() != token_ids.numel():
            raise ValueError("draft vocabulary ids must be distinct target ids in [0, vocab_size)")
        self.d2t.copy_(token_ids.to(self.d2t.device))
        self._draft_head_weight = None

    # ------------------------------------------------------------------ building blocks

    @property
    def feature_width(self) -> int:
        """Width of the captured target features the drafter reads: H, or (1 + k) H with k feature layers."""
        return self.config.hidden_size * (1 + len(self.config.feature_layers or ()))

    def fuse_features(self, features: torch.Tensor) -> torch.Tensor:
        """The drafter's input state from captured target features: [..., feature_width] -> [..., H].

        Without feature layers this is h_t itself. With k feature layers, `features` is [h_t ; f_1 ; ... ; f_k]
        (`generation.capture.PreNormCapture`) and the result is h_t + W_f [RMSNorm(f_1); ...; RMSNorm(f_k)]:
        each earlier layer is normalised first (their scales differ by an order of magnitude), and W_f starts
        at zero.
        """
        if features.shape[-1] != self.feature_width:
            raise ValueError(
                f"the drafter reads target features of width {self.feature_width} (hidden size "
                f"{self.config.hidden_size}, feature_layers {self.config.feature_layers}), got {features.shape[-1]}: "
                "capture them with PreNormCapture(target, draft.config.feature_layers)"
            )
        features = features.to(self.fc1.weight.dtype)
        if self.feature_fc is None:
            return features
        hidden = self.config.hidden_size
        parts = features[..., hidden:].split(hidden, dim=-1)  # k x [..., H]
        fused = torch.cat([norm(part) for norm, part in zip(self.feature_norms, parts)], dim=-1)  # [..., k H]
        return features[..., :hidden] + self.feature_fc(fused)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """E[token_ids]: rows of the target's head weight. token_ids [...] target ids -> [..., H]."""
        weight = self.target_head.weight
        return F.embedding(token_ids.to(weight.device), weight).to(self.fc1.weight.device, self.fc1.weight.dtype)

    def head_logits(self, head_states: torch.Tensor) -> torch.Tensor:
        """lm_head(o): [..., H] -> [..., V_draft] logits (V_draft = V unless a draft vocabulary is set).

        The head runs in the lower of the drafter's and the target's precisions: a bf16 drafter of a
        float32 target scores with a bf16 copy of the head's rows (cached; on CPUs with bf16 matrix
        instructions that is several times faster than float32), while a float32 drafter trained against
        a bf16 target reads the bf16 head as it is (no float32 copy of a large head).
        """
        weight, bias = self._head_weight_and_bias()
        return F.linear(head_states.to(weight.device, weight.dtype), weight, bias)

    def _head_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.target_head
        weight, bias = head.weight, getattr(head, "bias", None)
        dtype = self.fc1.weight.dtype
        cast = torch.finfo(dtype).bits < torch.finfo(weight.dtype).bits
        if self.d2t is None and not cast:
            return weight, bias
        wanted = dtype if cast else weight.dtype
        cached = self._draft_head_weight
        if cached is None or cached.device != weight.device or cached.dtype != wanted:
            rows = weight.detach() if self.d2t is None else weight.detach()[self.d2t.to(weight.device)]
            cached = self._draft_head_weight = rows.to(wanted)  # [V_draft, H]
        if bias is not None:
            bias = (bias if self.d2t is None else bias[self.d2t.to(bias.device)]).to(wanted)
        return cached, bias

    def draft_to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map indices into the draft logits to target token ids (identity without a draft vocabulary)."""
        if self.d2t is None:
            return draft_ids
        return self.d2t.to(draft_ids.device)[draft_ids]

    def augment(
        self,
        hidden_states: torch.Tensor,
        next_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Steps 2-3 of the paper over S new positions: c = norm(AugmentingBlock(A1(h, E[x_next]))).

        Args:
            hidden_states: [B, S, feature_width] the target's pre-norm last hidden states h_t (followed by the
                feature layers' outputs when the drafter has `feature_layers`; see `fuse_features`).
            next_input_ids: [B, S] the token that follows each of those positions (x_{t+1}).
            attention_mask: optional [B, past + S] 2D padding mask (1 = real token).
            position_ids: optional [B, S] absolute positions; default continues from the cache length.
            cache: the augmenting block's KV cache (a `DynamicCache`), updated in place.
        Returns:
            [B, S, H] augmented states c_t.
        """
        # relies on `config._attn_implementation` selecting the layers' attention kernel at call time (private);
        # caught by tests/test_decoding.py::test_greedy_identical_across_attention_kernels_and_dtypes
        self._augmenting_config._attn_implementation = self.config._attn_implementation
        states = self.input_cell(self.fuse_features(hidden_states), self.embed(next_input_ids))  # s_t
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + states.shape[1], device=states.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self._augmenting_config,
            inputs_embeds=states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: cache},
        )
        position_embeddings = self.rotary_emb(states, position_ids=position_ids)
        for layer in self.augmenting_layers:
            states = layer(
                states,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                **{CACHE_KWARG: cache},
                position_embeddings=position_embeddings,
            )
        return self.augmenting_norm(states)

    def head_step(
        self, state: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One recurrent head step (step 4 of the paper) on any leading shape.

        Depth 0: `state` is c_t [..., H] and `token_ids` is None; returns (o_0, r_0 = c_t).
        Depth i > 0: `state` is r_{i-1} [..., H], `token_ids` [...] is y_i; returns (o_i, r_i).
        o_i is the HeadNorm output [..., H]; `head_logits(o_i)` scores it.
        """
        if token_ids is None:
            return self.head_norm(self.fc1(state)), state
        token_embeds = self.embed(token_ids)
        state = self.head_cell(state, token_embeds)  # r_i
        return self.head_norm(self.fc2(torch.cat([state, token_embeds], dim=-1))), state

    # ------------------------------------------------------------------ teacher-forced forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        next_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        return_logits: bool = False,
    ) -> Clover2Output:
        """All depths over a sequence, teacher-forced (training and evaluation).

        Args:
            hidden_states: [B, T, feature_width] target pre-norm hidden states h_t (and feature layers).
            next_input_ids: [B, T] x_{t+1}, the token after each position. Depth i at position t reads
                `next_input_ids[:, t + i]`; beyond T it reads token 0, and those outputs are meaningless
                (a loss must mask positions t + i + 1 >= T).
            attention_mask: optional [B, T] padding mask.
            position_ids, cache, use_cache: as in `augment`.
            return_logits: also return [B, N, T, V_draft] logits (memory heavy for large vocabularies).
        """
        if use_cache and cache is None:
            cache = DynamicCache(config=self._augmenting_config)
        augmented = self.augment(hidden_states, next_input_ids, attention_mask, position_ids, cache)  # [B, T, H]
        seq_len = next_input_ids.shape[1]
        padded_ids = F.pad(next_input_ids, (0, self.config.num_draft_depths))  # [B, T + N]
        head_states = []
        out, state = self.head_step(augmented)
        head_states.append(out)
        for depth in range(1, self.config.num_draft_depths):
            out, state = self.head_step(state, padded_ids[:, depth : depth + seq_len])
            head_states.append(out)
        head_states = torch.stack(head_states, dim=1)  # [B, N, T, H]
        logits = self.head_logits(head_states) if return_logits else None
        return Clover2Output(head_states=head_states, logits=logits, augmented_states=augmented, cache=cache)

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for the augmenting block."""
        return DynamicCache(config=self._augmenting_config)

    # ------------------------------------------------------------------ Hub

    def model_card(self, training_command: str | None = None, extra_text: str = ""):
        """A `huggingface_hub.ModelCard` with base_model, library_name and tags filled in."""
        from huggingface_hub import ModelCard, ModelCardData

        base = self.config.base_model_name_or_path
        data = ModelCardData(
            base_model=base if base and not os.path.isdir(str(base)) else None,
            library_name="transformers",
            tags=["clover2", "speculative-decoding", "draft-model"],
            license=None,
        )
        lines = [
            "---",
            data.to_yaml(),
            "---",
            f"# Clover-2 drafter for `{base or 'a ' + self.config.text_config.model_type + ' target'}`",
            "",
            "A Clover-2 draft model (arXiv 2408.00264) for lossless speculative decoding with `transformers`.",
            "It holds draft weights only: the target's embedding / lm_head are borrowed at run time.",
            "",
            "With the package (`pip install clover2-hf`):",
            "",
            "```python",
            "import clover2_hf  # registers the model and routes generate(assistant_model=<drafter>)",
            "from transformers import AutoModel, AutoModelForCausalLM",
            f'target = AutoModelForCausalLM.from_pretrained("{base or "<target>"}")',
            'draft = AutoModel.from_pretrained("<this repo>").attach_target(target)',
            "out = target.generate(**inputs, assistant_model=draft)",
            "```",
            "",
            "Without the package (only torch, transformers and safetensors): this repo carries its code, the model",
            "files and, in `custom_generate/`, the decoding loop that transformers' `custom_generate` runs (tree mode;",
            "same output as with the package):",
            "",
            "```python",
            "from transformers import AutoModel, AutoModelForCausalLM",
            f'target = AutoModelForCausalLM.from_pretrained("{base or "<target>"}")',
            'draft = AutoModel.from_pretrained("<this repo>", trust_remote_code=True)',
            'out = target.generate(**inputs, assistant_model=draft, custom_generate="<this repo>", trust_remote_code=True)',
            "```",
            "",
            f"Draft depths: {self.config.num_draft_depths}; augmenting layers: {self.config.num_augmenting_layers}; "
            f"draft vocabulary: {self.config.draft_vocab_size or self.config.vocab_size}.",
        ]
        if training_command:
            lines += ["", "## Training command", "", "```bash", training_command, "```"]
        if extra_text:
            lines += ["", extra_text]
        return ModelCard("\n".join(lines) + "\n")

    def save_pretrained(
        self, save_directory, *args, training_command: str | None = None, extra_text: str = "", **kwargs
    ):
        """`PreTrainedModel.save_pretrained` (safetensors only) plus the code files and a model card.

        The code files (`clover2_hf.hub.code_files`) let the folder load with `trust_remote_code=True` and decode with
        `generate(custom_generate=<folder or repo>, trust_remote_code=True)` without the package. The card is
        (re)written when none exists yet or when `training_command` / `extra_text` is given.
        """
        if kwargs.get("safe_serialization") is False:
            raise ValueError("Clover-2 checkpoints are saved as safetensors only")
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            try:  # not a relative import: this file is itself shipped, and the hub package is not
                hub_files = importlib.import_module("clover2_hf.hub.code_files")
            except ModuleNotFoundError:  # a drafter loaded with trust_remote_code, saved without the package
                logger.warning(
                    "clover2-hf is not installed: %s gets the model code files but not custom_generate/ "
                    "(pip install clover2-hf, then `python -m clover2_hf.hub %s`)", save_directory, save_directory
                )
            else:
                hub_files.write_code_files(save_directory)
        card_path = os.path.join(save_directory, "README.md")
        if kwargs.get("is_main_process", True) and (training_command or extra_text or not os.path.exists(card_path)):
            self.model_card(training_command, extra_text).save(card_path)
        return result

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", training_command: str | None = None, **kwargs):
        """Upload config, code, safetensors and the Clover-2 model card in one Hub commit."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size, training_command=training_command)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp_dir,
                commit_message=commit_message or "Upload Clover-2 drafter",
                revision=revision,
                create_pr=create_pr,
            )


Clover2ForDrafting.register_for_auto_class("AutoModel")

__all__ = ["Clover2ForDrafting", "Clover2Output", "Clover2PreTrainedModel", "Clover2RegressiveAttention"]
