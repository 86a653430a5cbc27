"""Train a Clover-2 drafter: `python examples/train_clover2.py --output-dir runs/x [options]`.

Same options as `clover2 train --help`. Multi-GPU: `accelerate launch examples/train_clover2.py ...`
(DDP by default; FSDP / DeepSpeed with `--config_file examples/accelerate_fsdp.yaml` or
`examples/accelerate_deepspeed.yaml`).
"""

import sys

from clover2_hf.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
