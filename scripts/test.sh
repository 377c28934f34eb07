#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the quick loop: it skips the real-model, many-process,
# network-namespace, relay and simulator-scale tests (`slow`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# System packages for the dashboard (headless Chromium) and network-namespace tests; installing
# them needs root, and those tests skip with the reason where the tools are missing.
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/setup-test-system.sh
    bash scripts/setup-netns.sh
fi
exec .venv/bin/python -m pytest -q --durations=15 "$@"
