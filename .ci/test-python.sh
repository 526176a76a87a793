#!/usr/bin/env bash
# Python bindings: builds and installs autoglm-py into .venv the way a user would
# (`pip install ./autoglm-py`), then runs its pytest suite (the in-process server's tests use the
# official `openai` client and the `autoglm` console script; the image tests pass Pillow images,
# an optional dependency of the package), checks the type stubs against the native module with
# mypy.stubtest, and type-checks the tests and examples against the stubs.
# Works on a fresh machine (needs python3 >= 3.10 with venv, cargo, and PyPI); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
# Keep tool caches out of the work tree.
export MYPY_CACHE_DIR="$VENV/.mypy_cache"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== venv ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" --version
"$VENV/bin/python" -m pip install -q "maturin==1.16.0" "pytest==9.2.0" "mypy==2.4.1" "openai==3.57.0" "pillow==13.0.0"

echo "== pip install ./autoglm-py"
"$VENV/bin/python" -m pip install ./autoglm-py

echo "== pytest"
"$VENV/bin/python" -m pytest autoglm-py/tests -q -p no:cacheprovider

echo "== stubtest"
"$VENV/bin/python" -m mypy.stubtest autoglm._autoglm

echo "== mypy (tests and examples against the stubs)"
"$VENV/bin/python" -m mypy autoglm-py/tests examples/python

echo "== python ok"
