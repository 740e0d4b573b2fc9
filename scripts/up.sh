#!/usr/bin/env bash
# One box, one command: installs what is missing, builds kvpool, and starts a pool with the
# embedded defaults (master on 127.0.0.1:50051, a storage node with 256 MiB of DRAM).
# Also builds the Python package (`import kvpool`) into ~/.cache/kvpool-venv.
# Extra arguments go to `kvpool up` (e.g. --dram 4GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvpool-target}"
cargo build --release --bin kvpool --bin kvpool-sim
KVPOOL_PY_PROFILE=release
source scripts/python-env.sh
kvpool_py_build
echo "Python: $KVPOOL_VENV/bin/python -c 'import kvpool; print(kvpool.Client().status())'" >&2
exec "$CARGO_TARGET_DIR/release/kvpool" up "$@"
