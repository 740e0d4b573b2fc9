#!/usr/bin/env bash
# Sourced by test.sh: the SGLang virtualenv (engine-env.sh; ~11 GB) and its python.
#   KVPOOL_SGLANG_VENV  the virtualenv [~/.cache/kvpool-venv-sglang]
# Afterwards $KVPOOL_SGLANG_PYTHON runs the SGLang tests (the dev venv's python, where they skip
# quoting $KVPOOL_SGLANG_INSTALL_ERROR, when SGLang could not be installed).
source "$(dirname "${BASH_SOURCE[0]}")/engine-env.sh"
export KVPOOL_SGLANG_VENV="${KVPOOL_SGLANG_VENV:-$HOME/.cache/kvpool-venv-sglang}"
kvpool_engine_env sglang "$KVPOOL_SGLANG_VENV"
export KVPOOL_SGLANG_PYTHON="$KVPOOL_ENGINE_PYTHON"
export KVPOOL_SGLANG_INSTALL_ERROR="$KVPOOL_ENGINE_INSTALL_ERROR"
