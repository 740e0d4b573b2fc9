#!/usr/bin/env bash
# Installs what building and testing kvpool needs and is missing: a Rust toolchain and the
# Debian packages the crates and tests use. Safe to run again; it only installs what's absent.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# librocksdb-dev: the NVMe tier's index links the system RocksDB; libclang-dev and clang run
# its bindgen. etcd-server: the HA tests start a real etcd; protobuf-compiler and
# libprotobuf-dev: the etcd-client crate runs protoc at build time. libibverbs-dev, cmake,
# libnl-3-dev, libnl-route-3-dev, python3 (and clang): the transport's `rdma` feature, whose
# ibverbs-sys configures a vendored rdma-core with cmake, runs bindgen on its headers and
# links the system libibverbs (the default build needs none of them).
for p in build-essential pkg-config librocksdb-dev libclang-dev clang etcd-server protobuf-compiler libprotobuf-dev \
  libibverbs-dev cmake libnl-3-dev libnl-route-3-dev python3; do
  pkg_installed "$p" || need_pkgs+=("$p")
done
# Tests and benchmarks that compare with a peer use these when present.
for p in ${KVPOOL_EXTRA_PKGS:-}; do
  pkg_installed "$p" || need_pkgs+=("$p")
done

if ((${#need_pkgs[@]})) && have apt-get; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing: ${need_pkgs[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

if ! have cargo; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "installing the Rust toolchain (rustup)" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
