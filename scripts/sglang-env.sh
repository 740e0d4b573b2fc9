#!/usr/bin/env bash
# Sourced by test.sh: makes the SGLang virtualenv (outside the clone, so CI reuses it; ~11 GB,
# its own because SGLang pins a torch of its own) with sglang and pytest. kvpool is not
# installed there: the tests run with PYTHONPATH=python, and the abi3 extension that
# python-env.sh built loads in any CPython >= 3.9.
#   KVPOOL_SGLANG_VENV  the virtualenv [~/.cache/kvpool-venv-sglang]
# When sglang cannot be installed this does not fail: it writes the reason (pip's last lines)
# to $KVPOOL_SGLANG_INSTALL_ERROR, and the next run tries again.
# Afterwards $KVPOOL_SGLANG_PYTHON runs the SGLang tests: the SGLang virtualenv's python, or,
# when the install failed, the dev virtualenv's (python-env.sh), where they skip quoting the
# reason.
export KVPOOL_SGLANG_VENV="${KVPOOL_SGLANG_VENV:-$HOME/.cache/kvpool-venv-sglang}"
export KVPOOL_SGLANG_INSTALL_ERROR="$KVPOOL_SGLANG_VENV.install-error"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"

kvpool_sglang_ready() {
  # find_spec, not import: importing sglang takes seconds, and this runs on every test run.
  [ -x "$KVPOOL_SGLANG_VENV/bin/python" ] && "$KVPOOL_SGLANG_VENV/bin/python" -c '
import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("sglang", "pytest")))' 2>/dev/null
}

kvpool_sglang_failed() {
  {
    echo "$1"
    if [ -n "${2:-}" ]; then tail -n 30 "$2"; fi
  } >"$KVPOOL_SGLANG_INSTALL_ERROR"
  echo "sglang is not installed ($1); see $KVPOOL_SGLANG_INSTALL_ERROR" >&2
}

kvpool_sglang_install() {
  local python="" v log
  # SGLang needs Python >= 3.10.
  for v in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$v" >/dev/null 2>&1 &&
      "$v" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      python="$v"
      break
    fi
  done
  if [ -z "$python" ]; then
    kvpool_sglang_failed "no Python >= 3.10 with venv and ensurepip on PATH"
    return 0
  fi
  if [ ! -x "$KVPOOL_SGLANG_VENV/bin/python" ]; then
    echo "creating the SGLang virtualenv $KVPOOL_SGLANG_VENV (sglang is ~11 GB: minutes)" >&2
    if ! "$python" -m venv "$KVPOOL_SGLANG_VENV"; then
      kvpool_sglang_failed "$python -m venv $KVPOOL_SGLANG_VENV failed"
      return 0
    fi
  fi
  log="$(mktemp)"
  echo "installing sglang and pytest into $KVPOOL_SGLANG_VENV" >&2
  if "$KVPOOL_SGLANG_VENV/bin/python" -m pip install -q --upgrade pip >"$log" 2>&1 &&
    "$KVPOOL_SGLANG_VENV/bin/python" -m pip install -q sglang "pytest>=7" >"$log" 2>&1; then
    rm -f "$KVPOOL_SGLANG_INSTALL_ERROR"
  else
    kvpool_sglang_failed "pip install sglang failed" "$log"
  fi
  rm -f "$log"
}

if kvpool_sglang_ready; then
  rm -f "$KVPOOL_SGLANG_INSTALL_ERROR"
else
  kvpool_sglang_install
fi
if [ -f "$KVPOOL_SGLANG_INSTALL_ERROR" ]; then
  export KVPOOL_SGLANG_PYTHON="${KVPOOL_VENV:-$HOME/.cache/kvpool-venv}/bin/python"
else
  export KVPOOL_SGLANG_PYTHON="$KVPOOL_SGLANG_VENV/bin/python"
fi
