#!/usr/bin/env bash
# Time to first token with and without a shared 4096-token prefix, at Llama-3-8B's KV shape
# (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks: 2 MiB per block), against a
# release `kvpool up` with 4 GiB of DRAM on this machine.
#
#   [LAYOUT=paged|block-first] [KV_GROUPS=all|N] [REPEAT=3] [DRAM=4GiB] \
#       sim/ttft.sh [US_PER_TOKEN ...]     (default: 83.3 0)
#
# For each modelled prefill cost (µs per token; 83.3 = 12k tokens/s, see docs/connector.md,
# "The engine simulator"), a fresh pool and simulator serve, REPEAT times (default 3), each with a
# prefix it has never seen:
#   cold: prefix + 16 tokens        -> nothing in the pool, all 257 blocks computed
#   warm: same prefix + 16 others   -> 256 blocks loaded from the pool, 1 computed
# and the script prints each request's modelled and wall TTFT (ms) and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "sim/ttft.sh needs $tool (apt-get install $tool)" >&2; exit 2; }
done
BIN=${BIN:-target/release}
REPEAT=${REPEAT:-3}
LAYOUT=${LAYOUT:-paged}
KV_GROUPS=${KV_GROUPS:-all}
if (( REPEAT > 6 )); then
    echo "REPEAT=$REPEAT: at most 6 prefixes of 514 MiB fit the 4 GiB pool" >&2
    exit 2
fi
if [[ ! -x $BIN/kvpool || ! -x $BIN/kvpool-sim ]]; then
    cargo build --release -p kvpool-cli -p kvpool-sim
fi
rates=("$@")
[[ ${#rates[@]} -gt 0 ]] || rates=(83.3 0)

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Waits (up to 60 s) for a `ready k=v ...` line in $1 and prints the value of key $2.
ready() {
    for _ in $(seq 600); do
        v=$(sed -n "s/^ready .*$2=\([^ ]*\).*/\1/p" "$1")
        [[ -n $v ]] && { echo "$v"; return; }
        sleep 0.1
    done
    echo "no ready line in $1" >&2
    exit 1
}

# N token ids starting at $1 (distinct per prefix so no run sees another's blocks).
tokens() { seq -s, "$1" "$(($1 + $2 - 1))"; }

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

ask() { # url prompt-csv -> "model_ms wall_ms loaded computed mismatched"
    curl -sf "$1/v1/completions" -H 'content-type: application/json' \
        -d "{\"prompt\": [$2], \"max_tokens\": 1}" |
        jq -r '.kvpool | "\(.ttft_model_us / 1000) \(.ttft_us / 1000) \(.loaded_blocks) \(.computed_blocks) \(.mismatched_blocks)"'
}

echo "kvpool up --dram 4GiB; kvpool-sim Llama-3-8B shape, --layout $LAYOUT --groups $KV_GROUPS," \
    "4096-token prefix + 16 tokens"
run=0
for us in "${rates[@]}"; do
    run=$((run + 1))
    # A fresh pool per figure: REPEAT cold prompts of 257 blocks (514 MiB) each must fit its
    # 4 GiB, or eviction turns warm requests cold.
    "$BIN/kvpool" up --listen 127.0.0.1:0 --data-listen 127.0.0.1:0 --dram "${DRAM:-4GiB}" \
        >"$work/up$run.out" 2>"$work/up$run.err" &
    up_pid=$!
    pids+=("$up_pid")
    master=$(ready "$work/up$run.out" master)
    "$BIN/kvpool-sim" --master "$master" --listen 127.0.0.1:0 --blocks 300 \
        --layout "$LAYOUT" --groups "$KV_GROUPS" --prefill-us-per-token "$us" >"$work/sim$run.out" 2>"$work/sim$run.err" &
    sim_pid=$!
    pids+=("$sim_pid")
    url="http://$(ready "$work/sim$run.out" http)"
    : >"$work/cold" && : >"$work/warm"
    for i in $(seq "$REPEAT"); do
        base=$(((run * 100 + i) * 100000))
        prefix=$(tokens "$base" 4096)
        read -r cm cw cl cc cx < <(ask "$url" "$prefix,$(tokens 1 16)")
        read -r wm ww wl wc wx < <(ask "$url" "$prefix,$(tokens 50000 16)")
        printf 'us/token %-6s cold: model %8.1f ms wall %8.1f ms (loaded %s computed %s) | warm: model %8.1f ms wall %8.1f ms (loaded %s computed %s mismatched %s)\n' \
            "$us" "$cm" "$cw" "$cl" "$cc" "$wm" "$ww" "$wl" "$wc" "$wx"
        echo "$cm $cw" >>"$work/cold"
        echo "$wm $ww" >>"$work/warm"
    done
    printf 'us/token %-6s median cold model %.1f ms (wall %.1f), warm model %.1f ms (wall %.1f)\n' "$us" \
        "$(cut -d' ' -f1 "$work/cold" | median)" "$(cut -d' ' -f2 "$work/cold" | median)" \
        "$(cut -d' ' -f1 "$work/warm" | median)" "$(cut -d' ' -f2 "$work/warm" | median)"
    curl -sf "$url/stats" | jq -c '{saved_blocks, save_errors, pool_errors, mismatched_blocks}'
    kill "$sim_pid" "$up_pid"
    wait "$sim_pid" "$up_pid" 2>/dev/null || true
done
