"""kvpool.Client against a live pool: every buffer type, batches, gather/scatter, typed
errors, tenants, tokens, threads, and a dead master."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

import kvpool
from kvpool import errors

from conftest import start_pool


def rand(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.fixture
def client(pool):
    with kvpool.Client(pool.master, timeout=10) as c:
        yield c


def test_every_buffer_type_round_trips_byte_for_byte(client, unique):
    data = rand(300_000, 1)
    values = {
        "bytes": data.tobytes(),
        "bytearray": bytearray(data.tobytes()),
        "memoryview": memoryview(data.tobytes()),
        "numpy": data,
        "numpy-2d-float": np.arange(4096, dtype=np.float32).reshape(64, 64),
    }
    for name, v in values.items():
        client.put(unique + name, v)
    for name, v in values.items():
        want = memoryview(v).cast("B").tobytes()
        assert client.get(unique + name) == want, name
        out = np.zeros(len(want), dtype=np.uint8)
        assert client.get_into(unique + name, out) == len(want)
        assert out.tobytes() == want
        ba = bytearray(len(want) + 10)  # a larger buffer: the length says how much was read
        assert client.get_into(unique + name, ba) == len(want)
        assert bytes(ba[: len(want)]) == want
    assert client.size(unique + "numpy") == data.nbytes


def test_keys_may_be_str_or_bytes(client, unique):
    client.put((unique + "k").encode(), b"v1")
    assert client.get(unique + "k") == b"v1"
    assert unique + "k" in client


def test_parts_gather_and_scatter(client, unique):
    layers = [rand(4096, i) for i in range(8)]
    client.put_parts(unique + "blk", layers)
    assert client.get(unique + "blk") == b"".join(l.tobytes() for l in layers)
    back = [np.zeros(4096, dtype=np.uint8) for _ in range(8)]
    assert client.get_into_parts(unique + "blk", back) == 8 * 4096
    for a, b in zip(layers, back):
        assert (a == b).all()


def test_raw_addresses(client, unique):
    src = rand(1 << 20, 7)
    client.put_from(unique + "raw", src.ctypes.data, src.nbytes)
    dst = np.zeros_like(src)
    assert client.get_into_address(unique + "raw", dst.ctypes.data, dst.nbytes) == src.nbytes
    assert (dst == src).all()
    # Several objects from one registered region, by offset (what engines do).
    region = rand(64 * 1024, 8)
    keys = [f"{unique}r{i}" for i in range(16)]
    base = region.ctypes.data
    client.put_batch_from(keys, [base + i * 4096 for i in range(16)], [4096] * 16)
    out = np.zeros_like(region)
    got = client.get_batch_into_address(
        keys, [out.ctypes.data + i * 4096 for i in range(16)], [4096] * 16
    )
    assert got == [4096] * 16
    assert (out == region).all()


def test_batches_report_per_item(client, unique):
    items = [(f"{unique}{i}", bytes([i]) * (i + 1)) for i in range(100)]
    assert client.put_batch(items) == [None] * 100
    got = client.get_batch([k for k, _ in items] + [unique + "missing"])
    assert got[:100] == [v for _, v in items] and got[100] is None
    assert client.exists_batch([items[0][0], unique + "missing"]) == [True, False]
    # A batch with one duplicate: the others are stored, the duplicate is reported.
    res = client.put_batch([(unique + "new", b"n"), items[3]], raise_on_error=False)
    assert res[0] is None and isinstance(res[1], kvpool.AlreadyExistsError)
    with pytest.raises(kvpool.AlreadyExistsError):
        client.put_batch([items[4]])
    assert client.get(unique + "new") == b"n"
    bufs = [bytearray(200) for _ in range(3)]
    lens = client.get_batch_into([items[0][0], unique + "missing", items[9][0]], bufs)
    assert lens == [1, None, 10] and bytes(bufs[2][:10]) == items[9][1]


def test_overwrite_remove_and_pins(client, unique):
    k = unique + "k"
    client.put(k, b"one")
    with pytest.raises(kvpool.AlreadyExistsError) as e:
        client.put(k, b"two")
    assert e.value.name == "AlreadyExists" and e.value.code == errors.CODES["AlreadyExists"]
    client.put(k, b"two", overwrite=True)
    assert client.get(k) == b"two"
    # The get holds a read lease: a remove waits for it to end, or forces.
    with pytest.raises(kvpool.BusyError):
        client.remove(k)
    assert client.remove(k, force=True) is True
    assert client.remove(k) is False
    client.put(unique + "unread", b"u")
    assert client.remove(unique + "unread") is True
    assert client.get(k) is None
    client.put(unique + "pinned", b"p", hard_pin=True)
    with pytest.raises(kvpool.BusyError):
        client.remove(unique + "pinned")
    assert client.remove(unique + "pinned", force=True) is True


def test_bad_input_is_refused_with_a_clear_error(client, unique):
    with pytest.raises(kvpool.InvalidArgumentError):
        client.put("", b"v")  # an empty key
    with pytest.raises(kvpool.InvalidArgumentError):
        client.put("k" * 5000, b"v")  # longer than 4 KiB
    with pytest.raises(kvpool.InvalidArgumentError):
        client.put(unique + "empty", b"")
    with pytest.raises(BufferError, match="C-contiguous"):
        client.put(unique + "nc", np.zeros((8, 8))[:, ::2])
    with pytest.raises(BufferError, match="writable"):
        client.get_into(unique + "x", b"read-only bytes")
    with pytest.raises(TypeError, match="expected a buffer"):
        client.put(unique + "t", 12345)
    client.put(unique + "big", b"z" * 1000)
    with pytest.raises(kvpool.BufferTooSmallError, match="too small"):
        client.get_into(unique + "big", bytearray(999))
    # Two destinations over the same bytes would clobber each other: refused, nothing read.
    buf = np.zeros(2000, dtype=np.uint8)
    with pytest.raises(kvpool.InvalidArgumentError, match="overlap"):
        client.get_batch_into_address(
            [unique + "big", unique + "big"], [buf.ctypes.data, buf.ctypes.data + 500], [1000, 1000]
        )
    with pytest.raises(kvpool.InvalidArgumentError, match="null address"):
        client.put_from(unique + "null", 0, 10)
    with pytest.raises(kvpool.InvalidArgumentError, match="1 buffers for 2 keys"):
        client.put_batch_from([unique + "a", unique + "b"], [buf.ctypes.data], [10])
    with pytest.raises(TypeError, match="unknown put option"):
        client.put(unique + "o", b"v", replica=2)
    with pytest.raises(kvpool.InvalidArgumentError, match="tenant"):
        kvpool.Client(client.native.master, tenant="a\0b")


def test_replicas_and_preferred_nodes(client, unique):
    node = client.status()["nodes"][0]
    client.put(unique + "r", b"v" * 100, replicas=2, preferred_nodes=[node["id"]])
    assert client.get(unique + "r") == b"v" * 100  # one node: best effort, one replica


def test_tenants_do_not_see_each_other(pool, unique):
    a = kvpool.Client(pool.master, tenant="team-a")
    b = kvpool.Client(pool.master, tenant="team-b")
    a.put(unique + "k", b"from a")
    assert b.get(unique + "k") is None
    b.put(unique + "k", b"from b")
    assert a.get(unique + "k") == b"from a"
    assert a.remove_all(force=True) == 1  # the get above holds a lease: forced
    assert a.get(unique + "k") is None and b.get(unique + "k") == b"from b"


def test_status_and_closed_client(pool):
    c = kvpool.Client(pool.master)
    s = c.status()
    assert s["nodes"] and s["nodes"][0]["segments"][0]["capacity"] == 256 << 20
    assert "kvpool.Client" in repr(c)
    c.close()
    with pytest.raises(kvpool.KvpoolError, match="closed"):
        c.get("k")


def test_threads_share_one_client(client, unique):
    errors_seen = []

    def worker(t: int) -> None:
        try:
            for i in range(30):
                v = rand(8192 + t * 13 + i, t * 1000 + i)
                k = f"{unique}t{t}/{i}"
                client.put(k, v)
                out = np.zeros_like(v)
                assert client.get_into(k, out) == v.nbytes
                assert (out == v).all()
        except Exception as e:  # noqa: BLE001 - reported below
            errors_seen.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors_seen, errors_seen


def test_calls_release_the_gil(client, unique):
    # While one thread blocks in a large transfer, another keeps running Python code.
    big = rand(64 << 20, 3)
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        start = time.monotonic()
        client.put(unique + "big", big)
        out = np.zeros_like(big)
        client.get_into(unique + "big", out)
        end = time.monotonic()
    finally:
        done.set()
        t.join()
    during = [x for x in ticks if start < x < end]
    assert len(during) >= 3, f"{len(during)} ticks in {end - start:.3f}s"
    assert (out == big).all()
    assert client.remove(unique + "big", force=True)


def test_token_is_required_and_accepted(tmp_path, unique):
    p = start_pool(tmp_path, "--dram", "32MiB", env={"KVPOOL_TOKEN": "s3cret-token"})
    try:
        with pytest.raises(kvpool.UnauthorizedError):
            kvpool.Client(p.master, token="wrong", timeout=5).put(unique, b"v")
        c = kvpool.Client(p.master, token="s3cret-token")
        c.put(unique, b"v")
        assert c.get(unique) == b"v"
    finally:
        p.stop()


def test_a_dead_master_fails_within_the_timeout(tmp_path, unique):
    p = start_pool(tmp_path, "--dram", "32MiB")
    c = kvpool.Client(p.master, timeout=1.5)
    c.put(unique, b"v")
    p.stop()
    start = time.monotonic()
    with pytest.raises(kvpool.UnavailableError):
        c.get(unique)
    assert time.monotonic() - start < 10


def test_keys_and_remove_regex(client, unique):
    for i in range(25):
        client.put(f"{unique}k{i:02d}", b"v")
    client.put(unique.encode() + b"\xff", b"raw bytes key")
    keys = list(client.keys(unique, page=7))
    assert keys == sorted(keys) and len(keys) == 26
    assert keys[0] == (unique + "k00").encode() and keys[-1] == unique.encode() + b"\xff"
    assert list(client.keys(unique, limit=3)) == keys[:3]
    assert client.remove_regex("^" + unique.replace("/", "\\/") + "k1[0-9]$") == 10
    assert len(list(client.keys(unique))) == 16
    with pytest.raises(kvpool.InvalidArgumentError, match="unclosed"):
        client.remove_regex("(unclosed")


def test_register_buffer_validates_input_and_is_idempotent():
    # No pool needed: registration is local (an RDMA registration with a device, else a
    # record kept by the same rules).
    with kvpool.Client("127.0.0.1:1", timeout=1) as c:
        buf = np.zeros(8192, dtype=np.uint8)
        ptr = buf.ctypes.data
        c.register_buffer(ptr, 4096)
        c.register_buffer(ptr, 4096)  # the same region again: nothing happens
        c.register_buffer(ptr + 4096, 4096)  # adjacent is fine
        assert c.registered_buffers == [(ptr, 4096), (ptr + 4096, 4096)]
        bad = [
            (ptr + 10, 10, "overlaps"),
            (ptr, 8192, "overlaps"),
            (ptr + 100_000, 0, "empty"),
            (0, 16, "null"),
            (2**64 - 2, 4, "wraps"),
            (-1, 4, "non-negative"),
            (ptr, -1, "non-negative"),
            (2**64, 4, None),
            ("0x10", 4, "non-negative"),
        ]
        for p, n, why in bad:
            with pytest.raises(kvpool.InvalidArgumentError, match=why):
                c.register_buffer(p, n)
        assert c.registered_buffers == [(ptr, 4096), (ptr + 4096, 4096)]
        assert c.unregister_buffer(ptr) is True
        assert c.unregister_buffer(ptr) is False  # twice: harmless
        assert c.unregister_buffer(ptr + 4097) is False  # not a region's start
        assert c.registered_buffers == [(ptr + 4096, 4096)]
        with pytest.raises(kvpool.InvalidArgumentError):
            c.unregister_buffer(-5)


def test_registered_buffers_put_and_get_like_any_other(client, unique):
    src = rand(1 << 20, 5)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    client.register_buffer(src.ctypes.data, src.nbytes)
    client.register_buffer(dst.ctypes.data, dst.nbytes)
    try:
        client.put_from(unique + "r", src.ctypes.data, src.nbytes)
        assert client.get_into_address(unique + "r", dst.ctypes.data, dst.nbytes) == src.nbytes
        assert np.array_equal(src, dst)
    finally:
        assert client.unregister_buffer(src.ctypes.data)
        assert client.unregister_buffer(dst.ctypes.data)


def test_forced_rdma_without_a_device_raises_a_typed_error(pool, unique, monkeypatch):
    # No RDMA device here (or an extension built without RDMA): a client told to use only
    # RDMA cannot reach the node, and says so instead of falling back.
    monkeypatch.setenv("KVPOOL_TRANSPORT", "rdma")
    with kvpool.Client(pool.master, timeout=5) as c:
        with pytest.raises(errors.UnavailableError) as e:
            c.put(unique + "forced", b"bytes")
        assert e.value.name == "TransportUnsupported", e.value
        assert e.value.code == errors.CODES["TransportUnsupported"] == 603
        assert "transport = rdma" in str(e.value)


def test_with_the_location_cache_a_hot_same_host_get_needs_no_server(fresh_pool, unique):
    # The connectors turn the cache on (content-addressed keys). Over shared memory a
    # repeated get is checked on the node's replica board: with the whole pool stopped
    # (SIGSTOP), hot gets still return their bytes (tests/hot_reads.rs counts the lookups).
    big = rand(3 << 20, 7).tobytes()
    with kvpool.Client(fresh_pool.master, timeout=2, location_cache=True) as c:
        c.put(unique + "hot", big)
        for _ in range(2):
            assert c.get(unique + "hot") == big
        fresh_pool.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(5):
                assert c.get(unique + "hot") == big
        finally:
            fresh_pool.proc.send_signal(signal.SIGCONT)
        assert c.put(unique + "after", b"x") is None
