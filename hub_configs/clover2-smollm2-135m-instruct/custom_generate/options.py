"""Clover-2's decoding options: the drafter's saved defaults, overridden per call by `generate()` keywords.

Transformers keeps an assistant model's speculation settings (`num_assistant_tokens`, ...) with the
assistant and lets a `generate()` call override them. Clover-2 does the same:

* the drafter's config holds its defaults (`decoding`, `tree_type`, `tree_budget`, `tree_top_k`,
  `tree_lookup_tokens`, `tree_lookup_ngram`, `static_shapes`), saved and loaded with it;
* a call overrides any of them with keywords of the same name (`decoding` and `static_shapes` are
  spelled `clover2_decoding` and `clover2_static_shapes`, the bare words being too generic for
  `generate()`)::

      target.generate(**inputs, assistant_model=draft, tree_budget=8, tree_top_k=4)

* `"auto"` (`tree_budget` / `tree_top_k`) is the only value a tuning record or the device cost model
  fills in (`cost_model.auto_tree_settings`); an explicit value is used as it is.

Nothing is written back: `generate()` never changes `draft.config`. (The drafter has no
`generation_config` on purpose: without this package, stock assisted decoding would take it for an
ordinary assistant model; see `modeling_clover2.NEEDS_PACKAGE_MESSAGE`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from .configuration_clover2 import check_decoding_options

__all__ = ["GENERATE_KWARGS", "DecodingOptions", "pop_decoding_options"]

#: generate() keyword -> option (config field) name
GENERATE_KWARGS = {
    "clover2_decoding": "decoding",
    "tree_type": "tree_type",
    "tree_budget": "tree_budget",
    "tree_top_k": "tree_top_k",
    "tree_lookup_tokens": "tree_lookup_tokens",
    "tree_lookup_ngram": "tree_lookup_ngram",
    "clover2_static_shapes": "static_shapes",
}


@dataclass(frozen=True)
class DecodingOptions:
    """The options one Clover-2 `generate` call runs with (see the module docstring)."""

    # no defaults here: the drafter's config is the one place that holds them
    decoding: str
    tree_type: str
    tree_budget: int | str
    tree_top_k: int | str
    tree_lookup_tokens: int
    tree_lookup_ngram: int
    static_shapes: bool

    def __post_init__(self) -> None:
        check_decoding_options(self)

    @classmethod
    def resolve(cls, config, overrides: Mapping[str, object] | None = None) -> DecodingOptions:
        """The drafter config's defaults with `overrides` ({option name: value}) applied; validated."""
        return cls(**{**{f.name: getattr(config, f.name) for f in fields(cls)}, **dict(overrides or {})})


def pop_decoding_options(kwargs: dict) -> dict[str, object]:
    """Remove Clover-2's option keywords from `generate()` keyword arguments: {option name: value}."""
    return {option: kwargs.pop(key) for key, option in GENERATE_KWARGS.items() if key in kwargs}
