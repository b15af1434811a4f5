#!/usr/bin/env bash
# Install everything the tests need into .venv, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The emulated-link tests need iproute2 (ip, tc) and root; without them they skip and say why.
# The security tests make their certificates with the openssl command.
missing=""
command -v tc >/dev/null 2>&1 || missing="$missing iproute2"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq $missing >/dev/null
fi
# The aarch64 checks (tests/test_arm64.py, marker arm64) run on an emulated arm64
# build (scripts/arm64.sh: a Debian arm64 root, aarch64 wheels, llama-cpp-python
# cross-compiled; cached under ~/.cache/edgeroute-arm64).  It needs root and
# Debian's packages; without them, or with EDGEROUTE_ARM64=0, those tests skip.
if [ "$(id -u)" = 0 ] && [ "${EDGEROUTE_ARM64:-1}" != 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash scripts/arm64.sh setup || echo "arm64 setup failed: the arm64 tests will skip" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
