# Sourced by scripts/test.sh: creates what the privileged tests need where this machine
# allows it, and makes every skipped test show in the final summary (docs/reliability.md).
#
# - KVPOOL_TEST_SMALL_FS: a 16 MiB tmpfs (O_DIRECT works on tmpfs since Linux 6.6), for the
#   NVMe tier's real-ENOSPC test.
# - KVPOOL_TEST_BLOCK_DEVICE: a 64 MiB loop device with direct I/O, for the NVMe tier on a raw
#   block device.
# - KVPOOL_SKIP_LOG: where tests append `TEST<TAB>REASON` when they skip
#   (kvpool_tests::skipped); kvpool_skip_summary prints a count per reason.
#
# Where a fixture cannot be made (not root, no loop devices, a container without mount
# rights) the variable stays unset, the reason is recorded in the skip log, and the tests
# that need it report themselves skipped. Everything made here is undone on exit.

KVPOOL_FIXTURES_DIR="$(mktemp -d "${TMPDIR:-/tmp}/kvpool-fixtures.XXXXXX")"
export KVPOOL_SKIP_LOG="$KVPOOL_FIXTURES_DIR/skipped.tsv"
: >"$KVPOOL_SKIP_LOG"
_kvpool_mounts=()
_kvpool_loops=()

# Records a fixture that could not be made, in the same log the tests write.
_kvpool_fixture_skip() {
  printf 'fixture %s\t%s\n' "$1" "$2" >>"$KVPOOL_SKIP_LOG"
  echo "fixture $1 not set up: $2" >&2
}

_kvpool_small_fs() {
  local mnt="$KVPOOL_FIXTURES_DIR/small-fs" err
  mkdir -p "$mnt"
  if [ "$(id -u)" -ne 0 ]; then
    _kvpool_fixture_skip KVPOOL_TEST_SMALL_FS "not root: cannot mount a small filesystem"
    return
  fi
  if ! err=$(mount -t tmpfs -o size=16m kvpool-test "$mnt" 2>&1); then
    _kvpool_fixture_skip KVPOOL_TEST_SMALL_FS "mount -t tmpfs failed: $err"
    return
  fi
  _kvpool_mounts+=("$mnt")
  if ! err=$(python3 -c "import os,sys; os.close(os.open(sys.argv[1], os.O_CREAT|os.O_RDWR|os.O_DIRECT))" "$mnt/probe" 2>&1); then
    _kvpool_fixture_skip KVPOOL_TEST_SMALL_FS "tmpfs without O_DIRECT (Linux < 6.6?): $err"
    return
  fi
  rm -f "$mnt/probe"
  export KVPOOL_TEST_SMALL_FS="$mnt"
}

_kvpool_block_device() {
  local img="$KVPOOL_FIXTURES_DIR/block.img" dev
  if [ "$(id -u)" -ne 0 ]; then
    _kvpool_fixture_skip KVPOOL_TEST_BLOCK_DEVICE "not root: cannot attach a loop device"
    return
  fi
  if ! command -v losetup >/dev/null; then
    _kvpool_fixture_skip KVPOOL_TEST_BLOCK_DEVICE "losetup is not installed"
    return
  fi
  truncate -s 64M "$img"
  if ! dev=$(losetup -f --show --direct-io=on "$img" 2>&1); then
    _kvpool_fixture_skip KVPOOL_TEST_BLOCK_DEVICE "losetup failed: $dev"
    return
  fi
  _kvpool_loops+=("$dev")
  export KVPOOL_TEST_BLOCK_DEVICE="$dev"
}

# Prints the skips, a count per reason; called on exit, so it shows after a failure too.
kvpool_skip_summary() {
  echo "== skipped (not passed: each did not run here, with why)"
  if [ ! -s "$KVPOOL_SKIP_LOG" ]; then
    echo "   none"
    return
  fi
  echo "   $(wc -l <"$KVPOOL_SKIP_LOG") skip(s):"
  cut -f2 "$KVPOOL_SKIP_LOG" | sort | uniq -c | sort -rn | sed 's/^/  /'
  echo "   by test:"
  sort "$KVPOOL_SKIP_LOG" | sed 's/\t/: /; s/^/     /'
}

kvpool_fixtures_teardown() {
  local m d
  for m in "${_kvpool_mounts[@]}"; do umount "$m" 2>/dev/null || true; done
  for d in "${_kvpool_loops[@]}"; do losetup -d "$d" 2>/dev/null || true; done
  rm -rf "$KVPOOL_FIXTURES_DIR"
}

_kvpool_small_fs
_kvpool_block_device
