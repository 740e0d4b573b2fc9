#!/usr/bin/env bash
# Sourced by sglang-env.sh and vllm-env.sh: one inference engine's virtualenv (outside the
# clone, so CI reuses it; each engine its own, because each pins a torch of its own) with the
# engine and pytest. kvpool is not installed there: the tests run with PYTHONPATH=python, and
# the abi3 extension that python-env.sh built loads in any CPython >= 3.9.
#
#   kvpool_engine_env PACKAGE VENV
#
# When PACKAGE cannot be installed this does not fail: it writes the reason (pip's last lines)
# to VENV.install-error, and the next run tries again. Afterwards $KVPOOL_ENGINE_PYTHON runs the
# engine's tests: VENV's python, or, when the install failed, the dev virtualenv's
# (python-env.sh), where they skip quoting the reason; $KVPOOL_ENGINE_INSTALL_ERROR is that file.
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"

kvpool_engine_env() {
  local pkg="$1" venv="$2"
  KVPOOL_ENGINE_INSTALL_ERROR="$venv.install-error"
  if _kvpool_engine_ready "$pkg" "$venv"; then
    rm -f "$KVPOOL_ENGINE_INSTALL_ERROR"
  else
    _kvpool_engine_install "$pkg" "$venv"
  fi
  if [ -f "$KVPOOL_ENGINE_INSTALL_ERROR" ]; then
    KVPOOL_ENGINE_PYTHON="${KVPOOL_VENV:-$HOME/.cache/kvpool-venv}/bin/python"
  else
    KVPOOL_ENGINE_PYTHON="$venv/bin/python"
  fi
}

_kvpool_engine_ready() {
  # find_spec, not import: importing an engine takes seconds, and this runs on every test run.
  [ -x "$2/bin/python" ] && "$2/bin/python" -c '
import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in (sys.argv[1], "pytest")))' "$1" 2>/dev/null
}

_kvpool_engine_failed() {
  {
    echo "$1"
    if [ -n "${2:-}" ]; then tail -n 30 "$2"; fi
  } >"$KVPOOL_ENGINE_INSTALL_ERROR"
  echo "the engine is not installed ($1); see $KVPOOL_ENGINE_INSTALL_ERROR" >&2
}

_kvpool_engine_install() {
  local pkg="$1" venv="$2" python="" v log
  # vLLM and SGLang need Python >= 3.10.
  for v in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$v" >/dev/null 2>&1 &&
      "$v" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      python="$v"
      break
    fi
  done
  if [ -z "$python" ]; then
    _kvpool_engine_failed "no Python >= 3.10 with venv and ensurepip on PATH"
    return 0
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating the $pkg virtualenv $venv (~10 GB: minutes)" >&2
    if ! "$python" -m venv "$venv"; then
      _kvpool_engine_failed "$python -m venv $venv failed"
      return 0
    fi
  fi
  log="$(mktemp)"
  echo "installing $pkg and pytest into $venv" >&2
  if "$venv/bin/python" -m pip install -q --upgrade pip >"$log" 2>&1 &&
    "$venv/bin/python" -m pip install -q "$pkg" "pytest>=7" >"$log" 2>&1; then
    rm -f "$KVPOOL_ENGINE_INSTALL_ERROR"
  else
    _kvpool_engine_failed "pip install $pkg failed" "$log"
  fi
  rm -f "$log"
}
