"""The Python client over each data transport (docs/transports.md): the same puts and gets,
byte for byte, with `KVPOOL_TRANSPORT=tcp` and `=shm`, each proved by the storage node's own
byte counters (`kvpool_store_transfer_bytes_total` by transport) to have gone the way it
says; and a client killed while it has the node's segments mapped costs the pool nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from conftest import ROOT, start_pool

MIB = 1 << 20

# One process of the client: puts `count` values of `size` bytes under `prefix` (a pattern of
# the key and offset), gets them back into fresh buffers and compares byte for byte, then
# prints "ok <bytes>".
CLIENT = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import kvpool

master, prefix, count, size = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def value(i):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size, dtype=np.uint8)
with kvpool.Client(master) as c:
    for i in range(count):
        c.put(f"{prefix}{i}", value(i))
    for i in range(count):
        out = np.zeros(size, np.uint8)
        assert c.get_into(f"{prefix}{i}", out) == size
        assert np.array_equal(out, value(i)), f"value {i} differs"
print("ok", count * size, flush=True)
"""


@pytest.fixture(scope="module")
def http_pool(tmp_path_factory):
    p = start_pool(
        tmp_path_factory.mktemp("transports"), "--dram", "128MiB", "--http", "127.0.0.1:0"
    )
    yield p
    p.stop()


def node_bytes(pool) -> dict:
    """The node's `kvpool_store_transfer_bytes_total` series: {(direction, transport): n}."""
    with urllib.request.urlopen(f"http://{pool.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    pat = r'^kvpool_store_transfer_bytes_total\{direction="(\w+)",transport="(\w+)"\} (\d+)$'
    for m in re.finditer(pat, text, re.M):
        out[(m[1], m[2])] = int(m[3])
    assert out, f"no transfer byte counters in\n{text[:2000]}"
    return out


def run_client(pool, transport: str, prefix: str, count: int, size: int):
    env = {**os.environ, "KVPOOL_TRANSPORT": transport}
    args = [sys.executable, "-c", CLIENT, str(ROOT / "python"), pool.master, prefix]
    return subprocess.run(
        args + [str(count), str(size)], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_puts_and_gets_go_over_the_chosen_transport(http_pool, unique, transport):
    count, size = 8, MIB
    payload = count * size
    before = node_bytes(http_pool)
    r = run_client(http_pool, transport, unique, count, size)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    after = node_bytes(http_pool)
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if transport == "tcp":
        assert grew[("in", "tcp")] >= payload and grew[("out", "tcp")] >= payload, grew
        assert grew.get(("in", "shm"), 0) == 0, grew
    else:
        # Puts are counted when the client commits what it copied into the shared segment;
        # gets copy out of the mapped segment and never reach the node's sockets.
        assert grew[("in", "shm")] >= payload, grew
        assert grew[("in", "tcp")] < payload // 16, grew
        assert grew[("out", "tcp")] < payload // 16, grew


def test_a_bad_transport_name_is_refused_naming_it(http_pool, unique):
    r = run_client(http_pool, "carrier-pigeon", unique, 1, 4096)
    assert r.returncode != 0
    assert "carrier-pigeon" in r.stderr, r.stderr[-2000:]


def test_a_client_killed_with_segments_mapped_costs_the_pool_nothing(http_pool, unique):
    """A shared-memory client SIGKILLed in the middle of a loop of puts and gets (segments
    mapped, transfers in flight): another client then reads every earlier value byte for
    byte, and new puts and gets over shared memory still work."""
    env = {**os.environ, "KVPOOL_TRANSPORT": "shm"}
    # A first client stores the values; a second loops on puts and gets until killed.
    r = run_client(http_pool, "shm", unique, 4, MIB)
    assert r.returncode == 0, r.stderr[-3000:]
    looping = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import kvpool
master, prefix = sys.argv[2], sys.argv[3]
with kvpool.Client(master) as c:
    out = np.zeros(1 << 20, np.uint8)
    n = 0
    while True:
        c.put(f"{prefix}churn{n % 8}", out, overwrite=True)
        c.get_into(f"{prefix}{n % 4}", out)
        n += 1
        if n == 20:
            print("looping", flush=True)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", looping, str(ROOT / "python"), http_pool.master, unique],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "looping", proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # The earlier values are intact, and shared memory still works for a new client.
    r = run_client(http_pool, "shm", unique + "after/", 4, MIB)
    assert r.returncode == 0, r.stderr[-3000:]
    check = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import kvpool
master, prefix = sys.argv[2], sys.argv[3]
with kvpool.Client(master) as c:
    for i in range(4):
        want = np.random.default_rng(i).integers(0, 256, 1 << 20, dtype=np.uint8)
        out = np.zeros(1 << 20, np.uint8)
        assert c.get_into(f"{prefix}{i}", out) == 1 << 20
        assert np.array_equal(out, want), f"value {i} differs after the kill"
print("ok")
"""
    r = subprocess.run(
        [sys.executable, "-c", check, str(ROOT / "python"), http_pool.master, unique],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
