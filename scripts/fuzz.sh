#!/usr/bin/env bash
# Coverage-guided fuzzing of kvpool's decoders with libFuzzer, on the stable toolchain
# (docs/reliability.md, "Fuzzing"). No cargo-fuzz and no nightly: the targets in fuzz/ link
# libfuzzer-sys, and rustc's stable codegen flags add the coverage instrumentation that
# cargo-fuzz would.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default: 20 s, every target)
#
# Each target starts from the committed corpus (fuzz/corpus/TARGET: seeds written by
# `KVPOOL_FUZZ_WRITE_SEEDS=1 cargo test` in fuzz/, plus inputs merged in from earlier runs)
# and from what earlier runs on this machine found (kept in the build folder, so the tree
# stays clean); new inputs go there. `scripts/fuzz.sh merge` folds them into the committed
# corpus, minimized. A crash is written to fuzz/artifacts/TARGET/ and fails the run: copy
# the input into fuzz/regressions/TARGET/ so `cargo test` in fuzz/ replays it from then on,
# and fix it. Prints one line per target: executions, corpus size, crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
merge=0
if [ "${1:-}" = merge ]; then
  merge=1
  shift
fi
secs="${1:-20}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(frame_header messages master_config nvme_record_header store_config \
  proxy_namespace pd_params)

# Its own build folder: the instrumentation must not leak into the main build's artifacts.
export CARGO_TARGET_DIR="${KVPOOL_FUZZ_TARGET_DIR:-$HOME/.cache/kvpool-target-fuzz}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros (they must not be
# instrumented: nothing links libFuzzer's runtime into them), as cargo-fuzz does.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --manifest-path fuzz/Cargo.toml --release --features fuzzing --bins --target "$host"
bin_dir="$CARGO_TARGET_DIR/$host/release"

status=0
for t in "${targets[@]}"; do
  committed="fuzz/corpus/$t"
  corpus="$CARGO_TARGET_DIR/fuzz-corpus/$t"
  artifacts="fuzz/artifacts/$t"
  mkdir -p "$committed" "$corpus" "$artifacts"
  log="$CARGO_TARGET_DIR/fuzz-$t.log"
  if ((merge)); then
    "$bin_dir/$t" -merge=1 "$committed" "$corpus" >"$log" 2>&1
    echo "fuzz $t: committed corpus now $(ls "$committed" | wc -l) inputs"
    continue
  fi
  # -rss_limit_mb: a decoder must not allocate without bound; -max_len: bodies far past any
  # real header or small message still fit.
  if "$bin_dir/$t" "$corpus" "$committed" -max_total_time="$secs" -rss_limit_mb=1024 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1; then
    result="ok"
  else
    result="CRASH (see $artifacts/, log $log)"
    status=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz $t: ${secs}s, $runs executions, corpus $(($(ls "$corpus" | wc -l) + $(ls "$committed" | wc -l))) inputs: $result"
done
exit $status
