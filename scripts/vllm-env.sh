#!/usr/bin/env bash
# Sourced by test.sh: makes the vLLM virtualenv (outside the clone, so CI reuses it; ~9.5 GB,
# its own because vLLM pins a torch of its own) with vllm and pytest. kvpool is not
# installed there: the tests run with PYTHONPATH=python, and the abi3 extension that
# python-env.sh built loads in any CPython >= 3.9.
#   KVPOOL_VLLM_VENV  the virtualenv [~/.cache/kvpool-venv-vllm]
# When vllm cannot be installed this does not fail: it writes the reason (pip's last lines)
# to $KVPOOL_VLLM_INSTALL_ERROR, and the next run tries again.
# Afterwards $KVPOOL_VLLM_PYTHON runs the vLLM tests: the vLLM virtualenv's python, or,
# when the install failed, the dev virtualenv's (python-env.sh), where they skip quoting the
# reason.
export KVPOOL_VLLM_VENV="${KVPOOL_VLLM_VENV:-$HOME/.cache/kvpool-venv-vllm}"
export KVPOOL_VLLM_INSTALL_ERROR="$KVPOOL_VLLM_VENV.install-error"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"

kvpool_vllm_ready() {
  # find_spec, not import: importing vllm takes seconds, and this runs on every test run.
  [ -x "$KVPOOL_VLLM_VENV/bin/python" ] && "$KVPOOL_VLLM_VENV/bin/python" -c '
import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("vllm", "pytest")))' 2>/dev/null
}

kvpool_vllm_failed() {
  {
    echo "$1"
    if [ -n "${2:-}" ]; then tail -n 30 "$2"; fi
  } >"$KVPOOL_VLLM_INSTALL_ERROR"
  echo "vllm is not installed ($1); see $KVPOOL_VLLM_INSTALL_ERROR" >&2
}

kvpool_vllm_install() {
  local python="" v log
  # vLLM needs Python >= 3.10.
  for v in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$v" >/dev/null 2>&1 &&
      "$v" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      python="$v"
      break
    fi
  done
  if [ -z "$python" ]; then
    kvpool_vllm_failed "no Python >= 3.10 with venv and ensurepip on PATH"
    return 0
  fi
  if [ ! -x "$KVPOOL_VLLM_VENV/bin/python" ]; then
    echo "creating the vLLM virtualenv $KVPOOL_VLLM_VENV (vllm is ~9.5 GB: minutes)" >&2
    if ! "$python" -m venv "$KVPOOL_VLLM_VENV"; then
      kvpool_vllm_failed "$python -m venv $KVPOOL_VLLM_VENV failed"
      return 0
    fi
  fi
  log="$(mktemp)"
  echo "installing vllm and pytest into $KVPOOL_VLLM_VENV" >&2
  if "$KVPOOL_VLLM_VENV/bin/python" -m pip install -q --upgrade pip >"$log" 2>&1 &&
    "$KVPOOL_VLLM_VENV/bin/python" -m pip install -q vllm "pytest>=7" >"$log" 2>&1; then
    rm -f "$KVPOOL_VLLM_INSTALL_ERROR"
  else
    kvpool_vllm_failed "pip install vllm failed" "$log"
  fi
  rm -f "$log"
}

if kvpool_vllm_ready; then
  rm -f "$KVPOOL_VLLM_INSTALL_ERROR"
else
  kvpool_vllm_install
fi
if [ -f "$KVPOOL_VLLM_INSTALL_ERROR" ]; then
  export KVPOOL_VLLM_PYTHON="${KVPOOL_VENV:-$HOME/.cache/kvpool-venv}/bin/python"
else
  export KVPOOL_VLLM_PYTHON="$KVPOOL_VLLM_VENV/bin/python"
fi
