# The kvpool image: `docker build -t kvpool:latest .` at the repository root. Used by
# deploy/compose.yaml and deploy/k8s/. Two stages: a Rust toolchain with the build's system
# libraries (RocksDB, clang for bindgen, protoc for the etcd client) builds the `kvpool`
# binary; a Debian slim image with the RocksDB runtime library runs it as a non-root user.
# Debian bookworm on both sides, so the binary links the same librocksdb (7.8) it runs with.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      librocksdb-dev libclang-dev clang protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# .cargo/config.toml names the x86-64 library folder; the multiarch triple works on arm64 too.
RUN ROCKSDB_LIB_DIR="/usr/lib/$(gcc -print-multiarch)" \
      cargo build --release --locked -p kvpool-cli --bin kvpool \
 && install -m 0755 target/release/kvpool /usr/local/bin/kvpool

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends librocksdb7.8 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/kvpool --create-home kvpool
COPY --from=build /usr/local/bin/kvpool /usr/local/bin/kvpool
USER kvpool
WORKDIR /var/lib/kvpool
# RPC (master), data plane (storage node), HTTP (master, storage node).
EXPOSE 50051 50052 9003 9004
# A one-box pool by default; deploy/ runs `kvpool master` and `kvpool store` instead.
CMD ["kvpool", "up", "--listen", "0.0.0.0:50051", "--data-listen", "0.0.0.0:50052", "--http", "0.0.0.0:9003"]
