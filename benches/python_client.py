#!/usr/bin/env python3
"""The Python zero-copy path against the Rust client: same workload, same pool, one run.

Starts one ``kvpool up --dram 2GiB`` on loopback, then per case (value size x batch) runs,
for R rounds (default 7) whose order alternates (Rust first in even rounds, Python first in
odd ones):

* Rust: ``kvpool-client-bench --master ADDR --size S --count N --batch B`` (a fresh process,
  one ``kvpool_client::Client``, one task; see benches/src/client_bench.rs);
* Python: ``kvpool.mooncake.MooncakeDistributedStore`` set up with
  ``global_segment_size=0`` against the same master, ``register_buffer`` over two numpy
  regions, then ``batch_put_from`` / ``batch_get_into`` in batches of B.

Both do the same thing: N objects of S bytes, object i at offset i*S of one random region
(keys ``{prefix}/{i:010}``, the same names), gets scattered into a second region of the
same layout; regions, key and address lists made and every page touched before the clock,
one warm-up 4 KiB and 16 MiB round trip per client; the put phase and the get phase timed
separately; one object in 16 checked byte for byte after the gets; everything removed
(force) after each round. It reports per case the median GB/s and objects/s of each side
and the Python/Rust ratio (median of the per-round ratios: each round's two runs are
back to back), with the machine's memcpy / loopback TCP / crc32c limits measured before
and after (``kvpool-client-bench --limits``: benches/src/limits.rs, a shorter plan than
``kvpool-bench``'s). Markdown on standard output, progress on standard error.

Run it with the interpreter that has the release wheel installed, from a directory that
is not python/ (there the source tree would shadow the wheel)::

    cd /tmp && $HOME/.cache/kvpool-venv-bench/bin/python /work/main/benches/python_client.py

Binaries: ``$CARGO_TARGET_DIR/release`` (else ``target/release`` of this repository), or
``--bin-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# numpy's OpenBLAS starts a thread per core that polls for work (seen in `perf` as
# blas_thread_server); nothing here calls BLAS, and on 2 cores they would only compete with
# the client. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VERIFY_EVERY = 16
CASES = "4KiB:256,64KiB:16,1MiB:4,16MiB:1"


def parse_size(s: str) -> int:
    s = s.strip()
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "b": 1, "": 1}
    num = s.rstrip("KMGiBkmgib")
    return int(float(num) * units[s[len(num) :].lower()])


def fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_secs() -> float:
    """User + system time of this process, every thread (the Rust side reads the same from
    /proc/self/stat)."""
    t = os.times()
    return t.user + t.system


def load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# ---------------------------------------------------------------------------- the pool


class Pool:
    """``kvpool up`` on free loopback ports; killed on exit."""

    def __init__(self, kvpool: Path, dram: str) -> None:
        self.proc = subprocess.Popen(
            [
                str(kvpool),
                "up",
                "--listen",
                "127.0.0.1:0",
                "--data-listen",
                "127.0.0.1:0",
                "--dram",
                dram,
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "KVPOOL_LOG": "warn"},
        )
        ready = threading.Event()
        self.master = ""

        def drain() -> None:  # keeps reading so the child never blocks on its stdout
            for line in self.proc.stdout:
                if line.startswith("ready ") and not ready.is_set():
                    for kv in line.split():
                        if kv.startswith("master="):
                            self.master = kv[len("master=") :]
                    ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(60) or not self.master:
            self.close()
            raise RuntimeError("kvpool up printed no ready line with master= within 60 s")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------- the two sides


def run_rust(bench: Path, master: str, prefix: str, size: int, count: int, batch: int) -> dict:
    out = subprocess.run(
        [
            str(bench),
            "--master",
            master,
            "--prefix",
            prefix,
            "--size",
            str(size),
            "--count",
            str(count),
            "--batch",
            str(batch),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    phases = {}
    for line in out.splitlines():
        r = json.loads(line)
        phases[r["phase"]] = r
    return phases


class PythonSide:
    """One MooncakeDistributedStore (no memory lent), as an engine's connector uses it."""

    def __init__(self, master: str) -> None:
        from kvpool.mooncake import MooncakeDistributedStore

        # numpy asks for transparent huge pages (MADV_HUGEPAGE) on arrays of 4 MiB and more;
        # the Rust side's Vecs get none (THP is `madvise` here), so without this the two
        # regions would differ in page size, not only in the binding.
        madvise = (getattr(np, "_core", None) or np.core).multiarray
        if hasattr(madvise, "_set_madvise_hugepage"):
            madvise._set_madvise_hugepage(False)

        self.store = MooncakeDistributedStore()
        rc = self.store.setup("localhost", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", master)
        if rc != 0:
            raise RuntimeError(f"setup returned {rc}")
        self.warm_up()

    def warm_up(self) -> None:
        s = self.store
        for size in (4 << 10, 16 << 20):
            key = f"pywarmup/{size}"
            src = np.full(size, 0x42, dtype=np.uint8)
            dst = np.zeros(size, dtype=np.uint8)
            assert s.batch_put_from([key], [src.ctypes.data], [size]) == [0]
            assert s.batch_get_into([key], [dst.ctypes.data], [size]) == [size]
            assert np.array_equal(src, dst)
            assert s.batch_remove([key], force=True) == [0]

    def case(self, prefix: str, size: int, count: int, batch: int) -> "PythonCase":
        return PythonCase(self.store, prefix, size, count, batch)


class PythonCase:
    """The regions and lists of one case, made once; ``round()`` is one timed round."""

    def __init__(self, store, prefix: str, size: int, count: int, batch: int) -> None:
        self.store, self.size, self.count, self.batch = store, size, count, batch
        rng = np.random.default_rng()
        self.src = rng.integers(0, 256, size=count * size, dtype=np.uint8)
        self.dst = np.empty(count * size, dtype=np.uint8)
        self.dst.fill(1)  # every page touched before the clock
        self.keys = [f"{prefix}/{i:010d}" for i in range(count)]
        s0, d0 = self.src.ctypes.data, self.dst.ctypes.data
        self.src_ptrs = [s0 + i * size for i in range(count)]
        self.dst_ptrs = [d0 + i * size for i in range(count)]
        self.sizes = [size] * count
        for ptr in (s0, d0):
            assert store.register_buffer(ptr, count * size) == 0

    def close(self) -> None:
        for ptr in (self.src.ctypes.data, self.dst.ctypes.data):
            self.store.unregister_buffer(ptr)

    def round(self) -> dict:
        st, keys, size, batch, n = self.store, self.keys, self.size, self.batch, self.count
        sp, dp, sz = self.src_ptrs, self.dst_ptrs, self.sizes
        self.dst.fill(0)
        t, cpu = time.perf_counter(), cpu_secs()
        for a in range(0, n, batch):
            b = a + batch
            rc = st.batch_put_from(keys[a:b], sp[a:b], sz[a:b])
            if rc.count(0) != len(rc):
                raise RuntimeError(f"batch_put_from {keys[a]}..: {rc}")
        put = (time.perf_counter() - t, cpu_secs() - cpu)
        t, cpu = time.perf_counter(), cpu_secs()
        for a in range(0, n, batch):
            b = a + batch
            rc = st.batch_get_into(keys[a:b], dp[a:b], sz[a:b])
            if rc.count(size) != len(rc):
                raise RuntimeError(f"batch_get_into {keys[a]}..: {rc}")
        get = (time.perf_counter() - t, cpu_secs() - cpu)
        src = self.src.reshape(n, size)
        dst = self.dst.reshape(n, size)
        for i in range(0, n, VERIFY_EVERY):
            if not np.array_equal(src[i], dst[i]):
                raise RuntimeError(f"get {keys[i]}: wrong bytes")
        rc = st.batch_remove(keys, force=True)
        if rc.count(0) != len(rc):
            raise RuntimeError(f"batch_remove: {rc[:4]}...")
        return {
            ph: {"objects": n, "bytes": n * size, "secs": secs, "cpu_secs": cpu}
            for ph, (secs, cpu) in (("put", put), ("get", get))
        }


# ---------------------------------------------------------------------------- report


def rates(r: dict) -> tuple:
    return r["bytes"] / r["secs"] / 1e9, r["objects"] / r["secs"]


def med_range(xs, fmt: str) -> str:
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def cpu_us(per_object) -> str:
    us = statistics.median(per_object) * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:,.0f}"


def limits(bench: Path) -> dict:
    out = subprocess.run([str(bench), "--limits"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cases", default=CASES, help=f"SIZE:BATCH,... [{CASES}]")
    ap.add_argument(
        "--bytes", default="512MiB", help="bytes each phase moves (count = bytes / size) [512MiB]"
    )
    ap.add_argument("--dram", default="2GiB")
    ap.add_argument(
        "--bin-dir",
        type=Path,
        default=None,
        help="where kvpool and kvpool-client-bench are [$CARGO_TARGET_DIR/release]",
    )
    ap.add_argument("--no-limits", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write every round's figures here")
    args = ap.parse_args()

    import kvpool

    where = Path(kvpool.__file__).resolve()
    log(f"kvpool imported from {where}")
    if (REPO / "python") in where.parents:
        log("warning: this is the source tree, not an installed wheel (run from another folder)")
    bin_dir = args.bin_dir or Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"
    bench, kvpool_bin = bin_dir / "kvpool-client-bench", bin_dir / "kvpool"
    for b in (bench, kvpool_bin):
        if not b.exists():
            log(f"{b} not found: cargo build --release -p kvpool-cli -p kvpool-benches")
            return 2
    per_phase = parse_size(args.bytes)
    cases = []
    for c in args.cases.split(","):
        s, b = c.split(":")
        size = parse_size(s)
        cases.append((size, int(b), max(1, per_phase // size)))

    lim_before = None if args.no_limits else limits(bench)
    if lim_before:
        log(f"limits before: {lim_before}")
    started = time.strftime("%H:%M:%S")
    loads = [load()]
    pool = Pool(kvpool_bin, args.dram)
    rows = []
    raw = []
    try:
        log(f"kvpool up: master {pool.master}")
        py = PythonSide(pool.master)
        for size, batch, count in cases:
            prefix = f"cb{fmt_size(size)}x{batch}"
            pc = py.case(prefix, size, count, batch)
            res = {"rust": [], "python": []}
            case_loads = [load()]
            for r in range(args.rounds):
                order = ("rust", "python") if r % 2 == 0 else ("python", "rust")
                for side in order:
                    if side == "rust":
                        res["rust"].append(run_rust(bench, pool.master, prefix, size, count, batch))
                    else:
                        res["python"].append(pc.round())
                case_loads.append(load())
                line = " ".join(
                    f"{side} {ph} {rates(res[side][-1][ph])[0]:.2f} GB/s"
                    for side in ("rust", "python")
                    for ph in ("put", "get")
                )
                log(f"{fmt_size(size)} x{batch} round {r}: {line} (load {case_loads[-1]:.2f})")
            pc.close()
            del pc
            loads += case_loads
            raw.append(
                {"size": size, "batch": batch, "count": count, "rounds": res, "loads": case_loads}
            )
            for ph in ("put", "get"):
                rg = [rates(x[ph]) for x in res["rust"]]
                pg = [rates(x[ph]) for x in res["python"]]
                ratio = [p[0] / q[0] for p, q in zip(pg, rg)]
                rows.append(
                    {
                        "size": size,
                        "batch": batch,
                        "count": count,
                        "op": ph,
                        "rust_gbps": [x[0] for x in rg],
                        "py_gbps": [x[0] for x in pg],
                        "rust_ops": [x[1] for x in rg],
                        "py_ops": [x[1] for x in pg],
                        "ratio": ratio,
                        "load": (min(case_loads), max(case_loads)),
                        "rust_cpu": [x[ph]["cpu_secs"] / x[ph]["objects"] for x in res["rust"]],
                        "py_cpu": [x[ph]["cpu_secs"] / x[ph]["objects"] for x in res["python"]],
                    }
                )
    finally:
        pool.close()
    finished = time.strftime("%H:%M:%S")
    lim_after = None if args.no_limits else limits(bench)
    if lim_after:
        log(f"limits after: {lim_after}")
    if args.json:
        args.json.write_text(
            json.dumps({"cases": raw, "limits": [lim_before, lim_after]}, indent=1)
        )

    # ------------------------------------------------------------------ markdown
    print(
        f"Run {started}–{finished}, {args.rounds} rounds per case (order alternating), "
        f"{fmt_size(per_phase)} per phase, `kvpool up --dram {args.dram}`; "
        f"1-minute load average {min(loads):.2f}–{max(loads):.2f}."
    )
    if lim_before and lim_after:
        print(f"Machine: {lim_before['machine']}.\n")
        print("| limit, GB/s (benches/src/limits.rs; TCP best of 3) | before | after |")
        print("|---|---:|---:|")
        for k, name in (
            ("memcpy", "memcpy, 64 MiB buffers"),
            ("tcp1", "loopback TCP, 1 stream, 64 MiB buffers"),
            ("tcp4", "loopback TCP, 4 streams, 64 MiB buffers"),
            ("tcp1_hot", "loopback TCP, 1 stream, one 1 MiB buffer (cache-hot)"),
            ("crc32c", "crc32c, one core"),
        ):
            print(f"| {name} | {lim_before[k]:.2f} | {lim_after[k]:.2f} |")
    print()
    print(
        "Median of the rounds (min–max). GB/s = 10^9 bytes/s. Python/Rust: median of the "
        "per-round ratios of GB/s (= of objects/s: both move the same objects). Client CPU: "
        "user + system time of the client process (all its threads) per object, median.\n"
    )
    print(
        "| size | batch | objects | op | Rust GB/s | Python GB/s | Rust obj/s | Python obj/s "
        "| Python/Rust | client CPU µs/object, Rust / Python | load |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {fmt_size(r['size'])} | {r['batch']} | {r['count']} | {r['op']} "
            f"| {med_range(r['rust_gbps'], '.2f')} | {med_range(r['py_gbps'], '.2f')} "
            f"| {statistics.median(r['rust_ops']):,.0f} | {statistics.median(r['py_ops']):,.0f} "
            f"| **{statistics.median(r['ratio']):.0%}** ({min(r['ratio']):.0%}–{max(r['ratio']):.0%}) "
            f"| {cpu_us(r['rust_cpu'])} / {cpu_us(r['py_cpu'])} "
            f"| {r['load'][0]:.1f}–{r['load'][1]:.1f} |"
        )
    print()
    for r in rows:
        target = 0.9 if r["size"] >= 1 << 20 else (0.7 if r["size"] <= 4 << 10 else None)
        if target is None:
            continue
        m = statistics.median(r["ratio"])
        what = "GB/s" if target == 0.9 else "objects/s"
        print(
            f"- {fmt_size(r['size'])} x{r['batch']} {r['op']}: Python at {m:.0%} of Rust's "
            f"{what} (target >= {target:.0%}): {'met' if m >= target else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
