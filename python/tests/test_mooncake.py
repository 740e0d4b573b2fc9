"""kvpool.mooncake.MooncakeDistributedStore against a live pool: every method of Mooncake's
binding with numpy buffers and byte-for-byte checks, Mooncake's return codes, memory lent by
one process and read by another, threads, and a dead master."""

from __future__ import annotations

import ctypes
import json
import textwrap
import threading

import numpy as np
import pytest

from kvpool import mooncake as mc
from kvpool.mooncake import MooncakeDistributedStore, ReplicateConfig, SoftPinAction

from conftest import run_python, start_pool, wait_until


def rand(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def client_store(
    master: str, segment: int = 0, host: str = "localhost"
) -> MooncakeDistributedStore:
    s = MooncakeDistributedStore()
    # Mooncake's positional form: the first seven arguments.
    assert s.setup(host, "P2PHANDSHAKE", segment, 16 << 20, "tcp", "", master) == 0
    return s


@pytest.fixture
def store(pool):
    s = client_store(pool.master)
    yield s
    s.close()


def test_copying_api(store, unique):
    k = unique
    assert store.put(k + "a", b"x" * 100) == 0
    assert store.get(k + "a") == b"x" * 100
    assert store.get(k + "missing") == b""
    assert store.put(k + "a", b"again") == mc.OBJECT_ALREADY_EXISTS == -705
    assert store.upsert(k + "a", b"replaced") == 0
    assert store.get(k + "a") == b"replaced"
    arr = rand(10_000, 1)
    assert store.put(k + "np", arr) == 0  # any buffer, not only bytes
    assert store.get(k + "np") == arr.tobytes()
    keys = [f"{k}b{i}" for i in range(20)]
    vals = [bytes([i]) * (100 + i) for i in range(20)]
    assert store.put_batch(keys, vals) == 0
    assert store.get_batch(keys + [k + "missing"]) == vals + [b""]
    assert store.put_batch([k + "new", keys[0]], [b"n", b"dup"]) == -705
    assert store.get(k + "new") == b"n"
    assert store.upsert_batch(keys[:2], [b"u0", b"u1"]) == 0
    assert store.get_batch(keys[:2]) == [b"u0", b"u1"]
    assert store.put_parts(k + "parts", b"Hello, ", bytearray(b"World"), memoryview(b"!")) == 0
    assert store.get(k + "parts") == b"Hello, World!"
    assert store.upsert_parts(k + "parts", b"bye", np.frombuffer(b" now", np.uint8)) == 0
    assert store.get(k + "parts") == b"bye now"


def test_get_buffer(store, unique):
    data = rand(1 << 20, 2)
    assert store.put(unique + "buf", data) == 0
    h = store.get_buffer(unique + "buf")
    assert h is not None and h.size() == data.nbytes and len(h) == data.nbytes and h.ptr() != 0
    view = np.frombuffer(h, dtype=np.uint8)  # the buffer protocol, no copy
    assert (view == data).all()
    assert np.asarray(memoryview(h)).ctypes.data == h.ptr()
    assert store.get_buffer(unique + "missing") is None
    hs = store.batch_get_buffer([unique + "buf", unique + "missing"])
    assert bytes(hs[0]) == data.tobytes() and hs[1] is None


def test_zero_copy_api(store, unique):
    k = unique
    src = rand(4 << 20, 3)
    dst = np.zeros_like(src)
    base, dbase = src.ctypes.data, dst.ctypes.data
    assert store.register_buffer(base, src.nbytes) == 0
    assert store.register_buffer(dbase, dst.nbytes) == 0
    assert store.put_from(k + "whole", base, src.nbytes) == 0
    assert store.get_into(k + "whole", dbase, dst.nbytes) == src.nbytes
    assert (dst == src).all()
    # Blocks of one registered region, by offset.
    n, sz = 32, 64 * 1024
    keys = [f"{k}blk{i}" for i in range(n)]
    assert store.batch_put_from(keys, [base + i * sz for i in range(n)], [sz] * n) == [0] * n
    dst[:] = 0
    got = store.batch_get_into(
        keys + [k + "missing"], [dbase + i * sz for i in range(n + 1)], [sz] * (n + 1)
    )
    assert got == [sz] * n + [mc.OBJECT_NOT_FOUND]
    assert (dst[: n * sz] == src[: n * sz]).all()
    assert store.batch_put_from(keys[:1], [base], [sz]) == [-705]
    assert store.upsert_from(k + "whole", base + 100, 1000) == 0
    assert store.get_size(k + "whole") == 1000
    assert store.batch_upsert_from([k + "whole", k + "fresh"], [base, base + 1], [10, 20]) == [0, 0]
    assert store.get(k + "fresh") == src[1:21].tobytes()
    assert store.unregister_buffer(base) == 0
    assert store.unregister_buffer(base) == mc.INVALID_PARAMS  # not registered any more
    assert store.register_buffer(0, 10) == mc.INVALID_PARAMS


def test_multi_buffers(store, unique):
    # vLLM's store connector: one object per block gathered from one buffer per layer.
    layers = [rand(8 * 4096, 10 + i) for i in range(4)]
    keys = [f"{unique}b{b}" for b in range(8)]
    ptrs = [[l.ctypes.data + b * 4096 for l in layers] for b in range(8)]
    sizes = [[4096] * 4 for _ in range(8)]
    assert store.batch_put_from_multi_buffers(keys, ptrs, sizes) == [0] * 8
    assert store.get(keys[3]) == b"".join(l[3 * 4096 : 4 * 4096].tobytes() for l in layers)
    out = [np.zeros_like(l) for l in layers]
    optrs = [[o.ctypes.data + b * 4096 for o in out] for b in range(8)]
    assert store.batch_get_into_multi_buffers(keys, optrs, sizes) == [4 * 4096] * 8
    for a, b in zip(layers, out):
        assert (a == b).all()
    bad = store.batch_get_into_multi_buffers(keys[:2], optrs[:2], [[4096] * 4, [4096] * 3])
    assert bad == [mc.INVALID_PARAMS] * 2
    miss = store.batch_get_into_multi_buffers([unique + "none"], optrs[:1], sizes[:1])
    assert miss == [mc.OBJECT_NOT_FOUND]


def test_get_into_ranges(store, unique):
    a, b = rand(64, 20), rand(64, 21)
    assert store.put(unique + "k1", a) == 0 and store.put(unique + "k2", b) == 0
    buf0 = (ctypes.c_ubyte * 32)()
    buf1 = (ctypes.c_ubyte * 32)()
    p0, p1 = ctypes.addressof(buf0), ctypes.addressof(buf1)
    store.register_buffer(p0, 32)
    store.register_buffer(p1, 32)
    res = store.get_into_ranges(
        [p0, p1],
        [[unique + "k1", unique + "k2"], [unique + "k2", unique + "k1"]],
        [[[0, 20], [8]], [[4], [16]]],
        [[[1, 30], [2]], [[0], [10]]],
        [[[4, 3], [5]], [[6], [4]]],
    )
    assert res == [[[4, 3], [5]], [[6], [4]]]
    assert bytes(buf0[0:4]) == a[1:5].tobytes() and bytes(buf0[20:23]) == a[30:33].tobytes()
    assert bytes(buf0[8:13]) == b[2:7].tobytes()
    assert bytes(buf1[4:10]) == b[0:6].tobytes() and bytes(buf1[16:20]) == a[10:14].tobytes()
    res = store.get_into_ranges(
        [p0], [[unique + "none", unique + "k1"]], [[[0], [0]]], [[[0], [60]]], [[[4], [8]]]
    )
    assert res == [[[mc.OBJECT_NOT_FOUND], [mc.INVALID_PARAMS]]]  # a miss; a range past the end
    res = store.get_into_ranges([p0], [[unique + "k1"]], [[[30]]], [[[0]]], [[[8]]])
    assert res == [[[mc.BUFFER_OVERFLOW]]]  # past the registered destination


def test_metadata_and_removal(store, unique):
    k = unique
    assert store.put(k + "a", b"12345") == 0
    assert store.is_exist(k + "a") == 1 and store.is_exist(k + "b") == 0
    assert store.batch_is_exist([k + "a", k + "b"]) == [1, 0]
    assert store.get_size(k + "a") == 5 and store.get_size(k + "b") == mc.OBJECT_NOT_FOUND
    assert store.remove(k + "b") == mc.OBJECT_NOT_FOUND
    store.get(k + "a")  # a read lease: removal waits for it, or forces
    assert store.remove(k + "a") == mc.OBJECT_HAS_LEASE
    assert store.remove(k + "a", force=True) == 0
    for i in range(5):
        assert store.put(f"{k}r{i}", b"v") == 0
    assert store.batch_remove([f"{k}r0", f"{k}r1", f"{k}none"]) == [0, 0, mc.OBJECT_NOT_FOUND]
    assert store.remove_by_regex("^" + k.replace("/", "\\/") + r"r[23]$") == 2
    assert store.is_exist(f"{k}r4") == 1
    assert store.remove_by_regex("(unclosed") == mc.INVALID_PARAMS


def test_replicate_config(store, unique):
    cfg = ReplicateConfig()
    assert cfg.replica_num == 1 and not cfg.with_hard_pin and cfg.preferred_segment == ""
    cfg.replica_num = 2
    cfg.with_soft_pin = True
    cfg.soft_pin_action = SoftPinAction.ENABLE
    cfg.preferred_segments = ["no-such-host:1"]  # unknown segments fall back to placement
    assert store.put(unique + "a", b"v", cfg) == 0
    hard = ReplicateConfig()
    hard.with_hard_pin = True
    assert store.put(unique + "pinned", b"v", hard) == 0
    assert store.remove(unique + "pinned") == mc.OBJECT_REPLICA_BUSY
    assert store.remove(unique + "pinned", force=True) == 0


def test_bad_sizes_and_buffers(store, unique):
    src = rand(4096)
    assert store.put(unique + "a", src) == 0
    small = np.zeros(100, dtype=np.uint8)
    assert store.get_into(unique + "a", small.ctypes.data, small.nbytes) == mc.INVALID_PARAMS
    assert store.put_from(unique + "null", 0, 100) == mc.INVALID_PARAMS
    assert store.put(unique + "empty", b"") == mc.INVALID_PARAMS
    assert store.put("", b"v") == mc.INVALID_PARAMS
    assert (
        store.batch_put_from([unique + "x", unique + "y"], [src.ctypes.data], [10])
        == [mc.INVALID_PARAMS] * 2
    )
    assert store.put(unique + "nc", np.zeros((4, 4))[:, ::2]) == mc.INVALID_PARAMS
    dst = np.zeros(8192, dtype=np.uint8)
    overlapping = store.batch_get_into(
        [unique + "a", unique + "a"], [dst.ctypes.data, dst.ctypes.data + 10], [4096, 4096]
    )
    assert overlapping == [mc.INVALID_PARAMS] * 2


def test_not_set_up_and_closed(pool, unique):
    s = MooncakeDistributedStore()
    assert s.health_check() == 1
    assert s.put(unique, b"v") == mc.INTERNAL_ERROR
    assert s.get(unique) == b""
    assert s.is_exist(unique) == -1
    s = client_store(pool.master)
    assert s.health_check() == 0
    assert (
        s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", pool.master) == mc.INVALID_PARAMS
    )  # twice
    assert s.close() == 0 and s.close() == 0
    assert s.health_check() == 1 and s.put(unique, b"v") == mc.INTERNAL_ERROR


def test_setup_forms(pool, unique, tmp_path, monkeypatch):
    s = MooncakeDistributedStore()
    assert (
        s.setup(
            {
                "local_hostname": "localhost",
                "metadata_server": "P2PHANDSHAKE",
                "global_segment_size": 0,
                "master_server_address": pool.master,
            }
        )
        == 0
    )
    assert s.put(unique + "d", b"dict") == 0
    s.close()
    cfg = tmp_path / "mooncake.json"
    cfg.write_text(
        json.dumps(
            {
                "local_hostname": "127.0.0.1",
                "metadata_server": "http://x:8080/metadata",
                "global_segment_size": "0gb",
                "local_buffer_size": "512mb",
                "protocol": "tcp",
                "device_name": "",
                "master_server_address": pool.master,
            }
        )
    )
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(cfg))
    s = MooncakeDistributedStore()
    assert s.setup() == 0
    assert s.get(unique + "d") == b"dict"
    s.close()
    monkeypatch.delenv("MOONCAKE_CONFIG_PATH")
    monkeypatch.setenv("MOONCAKE_MASTER", pool.master)
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "0")
    c = mc.MooncakeConfig.load_from_env()
    assert c.master_server_address == pool.master and c.global_segment_size == 0
    assert mc.parse_size("4gb") == 4 << 30 and mc.parse_size("512MiB") == 512 << 20
    assert s.setup_dummy(256 << 20, 64 << 20, pool.master) == 0
    assert s.get(unique + "d") == b"dict"
    s.close()
    assert (
        MooncakeDistributedStore().setup(
            "localhost", "P2PHANDSHAKE", "lots", 0, "tcp", "", pool.master
        )
        == mc.INVALID_PARAMS
    )
    assert (
        MooncakeDistributedStore().setup(
            "localhost", "P2PHANDSHAKE", 0, 0, "carrier-pigeon", "", pool.master
        )
        == mc.INVALID_PARAMS
    )


def test_a_process_lends_memory_and_another_reads_it(pool, unique):
    # This process lends 64 MiB; a second process (sharing nothing but the pool) writes a
    # value preferring our segment, and we read it back; then we leave and it is gone.
    lender = client_store(pool.master, segment=64 << 20, host="127.0.0.1")
    seg = lender.get_hostname()
    assert seg.startswith("127.0.0.1:")
    data = rand(3 << 20, 30)
    code = textwrap.dedent("""
        import sys, numpy as np
        from kvpool.mooncake import MooncakeDistributedStore, ReplicateConfig
        master, key, seg, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        s = MooncakeDistributedStore()
        assert s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", master) == 0
        cfg = ReplicateConfig(); cfg.preferred_segment = seg
        data = np.random.default_rng(30).integers(0, 256, n, dtype=np.uint8)
        rc = s.put_from(key, data.ctypes.data, data.nbytes, cfg)
        print(rc)
        s.close()
        """)
    r = run_python(code, pool.master, unique + "lent", seg, str(data.nbytes))
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr
    out = np.zeros_like(data)
    assert lender.get_into(unique + "lent", out.ctypes.data, out.nbytes) == data.nbytes
    assert (out == data).all()
    reader = client_store(pool.master)
    node = next(n for n in reader._client.status()["nodes"] if n["name"] == seg)
    assert node["segments"][0]["capacity"] == 64 << 20 and node["segments"][0]["objects"] >= 1
    lender.close()  # leaves the pool: what lived only there is a miss at once
    wait_until("the lender's object to be gone", lambda: reader.is_exist(unique + "lent") != 1, 5)
    assert reader.is_exist(unique + "lent") == 0
    assert reader.get(unique + "lent") == b""
    assert not any(n["name"] == seg and n["alive"] for n in reader._client.status()["nodes"])
    reader.close()


def test_two_processes_share_data(store, pool, unique):
    code = textwrap.dedent("""
        import sys, numpy as np
        from kvpool.mooncake import MooncakeDistributedStore
        master, prefix = sys.argv[1], sys.argv[2]
        s = MooncakeDistributedStore()
        assert s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", master) == 0
        got = s.get(prefix + "from-parent")
        rc = s.put(prefix + "from-child", got[::-1])
        print(len(got), rc)
        s.close()
        """)
    payload = rand(100_000, 40).tobytes()
    assert store.put(unique + "from-parent", payload) == 0
    r = run_python(code, pool.master, unique)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(payload)), "0"]
    assert store.get(unique + "from-child") == payload[::-1]


def test_threads_at_once(store, unique):
    failures = []

    def worker(t: int) -> None:
        src = rand(64 * 1024, 100 + t)
        dst = np.zeros_like(src)
        for i in range(20):
            k = f"{unique}{t}/{i}"
            if store.put_from(k, src.ctypes.data, src.nbytes) != 0:
                failures.append(("put", t, i))
            if (
                store.get_into(k, dst.ctypes.data, dst.nbytes) != src.nbytes
                or not (dst == src).all()
            ):
                failures.append(("get", t, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not failures


def test_dead_master_codes(tmp_path, unique, monkeypatch):
    monkeypatch.setenv("KVPOOL_CLIENT_DEADLINE", "1.5")
    p = start_pool(tmp_path, "--dram", "32MiB")
    s = client_store(p.master)
    assert s.put(unique, b"v") == 0 and s.health_check() == 0
    p.stop()
    assert s.health_check() == 2
    assert s.put(unique + "2", b"v") in (mc.RPC_FAIL, mc.RPC_TIMEOUT)
    assert s.get(unique) == b""
    assert s.is_exist(unique) == -1
    assert s.get_size(unique) in (mc.RPC_FAIL, mc.RPC_TIMEOUT)
    buf = np.zeros(10, dtype=np.uint8)
    assert s.get_into(unique, buf.ctypes.data, 10) in (mc.RPC_FAIL, mc.RPC_TIMEOUT)
    s.close()
    # setup itself succeeds without a master (connections are made on first use, as
    # Mooncake's client retries), and health_check says the master is unreachable.
    s = MooncakeDistributedStore()
    assert s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", p.master) == 0
    assert s.health_check() == 2
    s.close()


def test_import_shim(tmp_path):
    code = textwrap.dedent("""
        import sys
        from kvpool.mooncake import install_import_shim
        install_import_shim()
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        import mooncake.store
        import kvpool.mooncake
        assert MooncakeDistributedStore is kvpool.mooncake.MooncakeDistributedStore
        print("ok")
        """)
    r = run_python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_a_lending_process_that_exits_leaves_the_pool(store, pool, unique):
    # No close(): the interpreter's exit makes the embedded node leave, so readers get a
    # clean miss at once instead of errors until the node TTL.
    code = textwrap.dedent("""
        import sys
        from kvpool.mooncake import MooncakeDistributedStore, ReplicateConfig
        s = MooncakeDistributedStore()
        assert s.setup("127.0.0.1", "P2PHANDSHAKE", 16 << 20, 0, "tcp", "", sys.argv[1]) == 0
        cfg = ReplicateConfig(); cfg.preferred_segment = s.get_hostname()
        assert s.put(sys.argv[2], b"lent" * 1000, cfg) == 0
        print(s.get_hostname())
        """)
    r = run_python(code, pool.master, unique + "k")
    assert r.returncode == 0, r.stderr
    seg = r.stdout.strip()
    assert not any(n["name"] == seg and n["alive"] for n in store._client.status()["nodes"])
    assert store.is_exist(unique + "k") == 0
    assert store.get(unique + "k") == b""
