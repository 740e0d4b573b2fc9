#!/usr/bin/env bash
# Sourced by test.sh: the vLLM virtualenv (engine-env.sh; ~9.5 GB, its torch its own) and its
# python.
#   KVPOOL_VLLM_VENV  the virtualenv [~/.cache/kvpool-venv-vllm]
# Afterwards $KVPOOL_VLLM_PYTHON runs the vLLM tests (the dev venv's python, where they skip
# quoting $KVPOOL_VLLM_INSTALL_ERROR, when vLLM could not be installed).
source "$(dirname "${BASH_SOURCE[0]}")/engine-env.sh"
export KVPOOL_VLLM_VENV="${KVPOOL_VLLM_VENV:-$HOME/.cache/kvpool-venv-vllm}"
kvpool_engine_env vllm "$KVPOOL_VLLM_VENV"
export KVPOOL_VLLM_PYTHON="$KVPOOL_ENGINE_PYTHON"
export KVPOOL_VLLM_INSTALL_ERROR="$KVPOOL_ENGINE_INSTALL_ERROR"
