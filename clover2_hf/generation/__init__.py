"""Everything that runs inside `generate(assistant_model=<Clover2ForDrafting>)`.

routing.py      the one hook into transformers' `generate` and the one input check
tree_step.py    tree decoding (the paper's method): draft a tree, verify it in one pass, walk, compact
device_step.py  the same step for greedy calls, built and walked on the device (two host reads per step)
chain.py        chain decoding through transformers' own assisted decoding (a CandidateGenerator)
cost_model.py   what a verification pass costs on this device, and the per-step tree sizing ("auto")
cpu_kernels.py  the CPU-only switches used while verifying a tree
capture.py      the target's pre-norm hidden states (shared with training)
stats.py        Clover2Stats
"""

from .chain import Clover2ChainCandidateGenerator
from .routing import install_generate_hook
from .stats import Clover2Stats
from .tree_step import check_generate_arguments, clover2_tree_decode

__all__ = [
    "Clover2ChainCandidateGenerator",
    "Clover2Stats",
    "check_generate_arguments",
    "clover2_tree_decode",
    "install_generate_hook",
]
