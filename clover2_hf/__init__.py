"""clover2_hf: Clover-2 speculative-decoding drafters for Hugging Face transformers.

Importing the package registers `Clover2Config` / `Clover2ForDrafting` with `AutoConfig` /
`AutoModel`, so `AutoModel.from_pretrained(<clover2 checkpoint>)` works without
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel

from .configuration_clover2 import SUPPORTED_TARGET_TYPES, Clover2Config
from .modeling_clover2 import Clover2ForDrafting, Clover2Output
from .generation import Clover2Stats, install_generate_hook

__version__ = "0.1.0"

AutoConfig.register(Clover2Config.model_type, Clover2Config, exist_ok=True)
AutoModel.register(Clover2Config, Clover2ForDrafting, exist_ok=True)
install_generate_hook()  # generate(assistant_model=<Clover2ForDrafting>) -> Clover-2 decoding


def load_default_target(**kwargs):
    """Load the embedded default target (SmolLM2-135M-Instruct); see `clover2_hf.tools.embedded`.

    The package's public surface re-exports this one tool function; it is imported on call, so
    `import clover2_hf` stays light and the core never imports the tools."""
    from .tools.embedded import load_default_target as _load

    return _load(**kwargs)


__all__ = [
    "Clover2Config",
    "Clover2ForDrafting",
    "Clover2Output",
    "Clover2Stats",
    "SUPPORTED_TARGET_TYPES",
    "load_default_target",
]
