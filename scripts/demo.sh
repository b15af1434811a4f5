#!/usr/bin/env bash
# Install the device + edge runtime into .venv, then run the main job on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh device
export HF_HUB_OFFLINE=1
exec .venv/bin/edgeroute demo "$@"
