#!/usr/bin/env bash
# Installs what is missing and runs the whole test suite: formatting, lints, unit, property
# and end-to-end tests (real processes on loopback). `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# A build folder outside the clone, so a fresh clone (CI) reuses earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvpool-target}"
export CARGO_TERM_COLOR=never
# Small filesystem, loop device and the skip log; the summary of skips prints on exit, after
# a failure too (docs/reliability.md).
source scripts/test-fixtures.sh
trap 'status=$?; kvpool_skip_summary; kvpool_fixtures_teardown; exit $status' EXIT

echo "== fmt"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
# The GPU paths build everywhere (cudarc loads the driver at run time).
cargo clippy -p kvpool-connector -p kvpool-tests -p kvpool-python --features cuda --all-targets -- -D warnings
# The RDMA transport builds everywhere deps.sh ran (libibverbs-dev; no device needed to build).
cargo clippy -p kvpool-transport -p kvpool-store --features rdma --all-targets -- -D warnings
echo "== build (the e2e tests start the kvpool binary)"
cargo build --workspace --bins
echo "== test"
cargo test --workspace --no-fail-fast
echo "== soak: mixed load under faults (etcd, two masters, three NVMe nodes), KVPOOL_SOAK_SECS (60) s; docs/reliability.md"
cargo test -p kvpool-tests --test soak
echo "== fuzz: every kept input (seed corpus, past crashes) replayed, then a short libFuzzer run per decoder"
cargo test --manifest-path fuzz/Cargo.toml
scripts/fuzz.sh "${KVPOOL_FUZZ_SECONDS:-20}"
echo "== test (feature cuda: the GPU tests skip, saying so, where no CUDA device is found)"
cargo test -p kvpool-connector -p kvpool-tests --features cuda --no-fail-fast --lib --test cuda
echo "== test (feature rdma: the loopback test logs its skip, with the reason, where no RDMA device is found)"
cargo test -p kvpool-transport --features rdma --no-fail-fast
# The node and the engine with RDMA compiled in and no device: unsupported answers, fallback.
cargo test -p kvpool-store --features rdma --no-fail-fast --test rdma
echo "== python (the kvpool package, built with maturin into a virtualenv outside the clone)"
source scripts/python-env.sh
kvpool_py_build
# -rs: every skipped test is listed with its reason in the summary.
(cd python && KVPOOL_BIN="$CARGO_TARGET_DIR/debug/kvpool" "$KVPOOL_VENV/bin/python" -m pytest -q -rs tests \
  --ignore=tests/test_sglang.py --ignore=tests/test_vllm.py)
echo "== python: the SGLang HiCache backend, in SGLang's own virtualenv (its torch differs)"
# When SGLang cannot be installed, KVPOOL_SGLANG_PYTHON is the dev venv's and the tests skip,
# quoting pip's error. -p no:warnings: importing SGLang prints dozens of deprecation warnings.
source scripts/sglang-env.sh
(cd python && KVPOOL_BIN="$CARGO_TARGET_DIR/debug/kvpool" PYTHONPATH=. "$KVPOOL_SGLANG_PYTHON" \
  -m pytest -q -rs -p no:warnings tests/test_sglang.py)
echo "== python: the vLLM connector, in vLLM's own virtualenv (its torch differs)"
# When vLLM cannot be installed, KVPOOL_VLLM_PYTHON is the dev venv's and the tests skip,
# quoting pip's error.
source scripts/vllm-env.sh
(cd python && KVPOOL_BIN="$CARGO_TARGET_DIR/debug/kvpool" PYTHONPATH=. "$KVPOOL_VLLM_PYTHON" \
  -m pytest -q -rs -p no:warnings tests/test_vllm.py)
