#!/usr/bin/env bash
# Set up (if needed) and run the main job: a small local swarm on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m potluck.demo "$@"
