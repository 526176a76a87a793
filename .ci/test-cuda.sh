#!/usr/bin/env bash
# CUDA backend without a GPU: installs NVIDIA's NVRTC (and the runtime headers) from PyPI into the
# shared .venv, then compiles every kernel for sm_80 and sm_90 (the ignored NVRTC tests, run with
# --include-ignored) and runs the no-driver tests. Fails if NVRTC cannot be loaded.
# Wheels in $AUTOGLM_NV_WHEELS (default /tmp/nvpkgs) are used when present, else PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
WHEELS=${AUTOGLM_NV_WHEELS:-/tmp/nvpkgs}
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== venv ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
links=()
if [ -d "$WHEELS" ]; then
  links=(--find-links "$WHEELS")
fi
"$VENV/bin/python" -m pip install -q "${links[@]}" \
  "nvidia-cuda-nvrtc==13.5.37" "nvidia-cuda-runtime==13.5.37"

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIB="$SITE/nvidia/cu13/lib"
if [ ! -e "$LIB/libnvrtc.so.13" ]; then
  echo "error: libnvrtc.so.13 is not under $LIB" >&2
  exit 1
fi
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== NVRTC: every kernel for sm_80 and sm_90"
cargo test -p autoglm-core --test cuda_kernels -- --include-ignored

echo "== device selection without a driver"
cargo test -p autoglm-core --test cuda_engine

echo "== cuda ok"
