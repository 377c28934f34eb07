#!/usr/bin/env bash
# System packages the tests need beyond Python: headless Chromium and its driver (the dashboard test,
# tests/test_api_swarm.py). Idempotent: does nothing when they are present; installs only as root
# (elsewhere it says what is missing, and the dashboard test skips).
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || need+=(fonts-dejavu-core)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-test-system: missing ${need[*]}; run this script as root to install them (the dashboard test skips without them)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "setup-test-system: installed ${need[*]}"
