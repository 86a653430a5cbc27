"""Clover-2 decoding through transformers' Hub mechanism for decoding loops, without the clover2-hf package.

`clover2_hf.hub.code_files` copies this file to `<drafter>/custom_generate/generate.py`, next to copies of the
package's core modules (`tree_step.py` and what it imports), so that on a machine with only torch,
transformers and safetensors::

    draft = AutoModel.from_pretrained(DRAFTER, trust_remote_code=True)
    out = target.generate(**inputs, assistant_model=draft, custom_generate=DRAFTER, trust_remote_code=True)

runs the same tree decoding as `import clover2_hf; target.generate(**inputs, assistant_model=draft)`:
transformers loads `custom_generate/generate.py` (`GenerationMixin.load_custom_generate`) and calls
`generate(model=target, **the generate() arguments)`; this function takes the drafter out of
`assistant_model=` and hands the copied `clover2_tree_decode` to stock `generate` as its decoding loop,
exactly as the package's generate hook does for tree mode, with the same options (the drafter's defaults,
per-call keywords, "auto" filled from the cache directory's calibration or tuning record). Chain mode
(`decoding="chain"`) needs the package.

Inside the package this module is importable too (`clover2_hf.hub.remote_generate.generate`), which is how its
logic is tested without a Hub round trip.
"""

from __future__ import annotations

from transformers import GenerationMixin

from ..generation.tree_step import prepare_call, run_tree_decoding

INSTALL_HINT = "pip install clover2-hf"


def is_clover2_drafter(model) -> bool:
    """True for a Clover-2 drafter, whichever module its class came from.

    Without the package the drafter's class is transformers' dynamic-module copy of `modeling_clover2.py`
    (loaded with `trust_remote_code=True`), a different class object from this folder's copy, so this is
    duck typing, not `isinstance`.
    """
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "clover2" and all(
        callable(getattr(model, name, None)) for name in ("attach_target", "augment", "head_step", "head_logits")
    )


def _stock_generate():
    """`GenerationMixin.generate` as transformers defines it (the package's hook, if installed, names it)."""
    generate = GenerationMixin.generate
    return getattr(generate, "clover2_stock_generate", generate)


def generate(model, assistant_model=None, **kwargs):
    """`generate(custom_generate=<Clover-2 drafter repo or dir>, assistant_model=<that drafter>, ...)`.

    Receives the arguments of `model.generate` (transformers passes them all by keyword, with `model`).
    Tree mode only; batch size 1, as in the package.
    """
    draft = assistant_model
    if draft is None or not is_clover2_drafter(draft):
        raise ValueError(
            "custom_generate=<a Clover-2 drafter> decodes with that drafter: pass it as assistant_model= "
            "(draft = AutoModel.from_pretrained(<drafter>, trust_remote_code=True)), got "
            f"assistant_model={type(draft).__name__ if draft is not None else None}."
        )
    stats, options = prepare_call(draft, kwargs)
    if options.decoding != "tree":
        raise ValueError(
            f"Chain decoding (decoding={options.decoding!r}) needs the clover2-hf package ({INSTALL_HINT}; then "
            "`import clover2_hf` and call generate(..., assistant_model=draft) without custom_generate). Pass "
            "clover2_decoding='tree' to use the Hub path."
        )
    draft.attach_target(model)  # validates hidden size / vocabulary against this target
    return run_tree_decoding(_stock_generate(), model, draft, kwargs, stats, options)
