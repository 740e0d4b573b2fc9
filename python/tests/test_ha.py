"""HA master discovery from Python: a kvpool.Client given "etcd://HOST:PORT/CLUSTER" finds the
leading master through a real etcd and follows a new leader after the old one is killed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import kvpool

from conftest import kvpool_bin, read_ready, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def etcd_bin() -> str:
    found = (
        os.environ.get("KVPOOL_ETCD_BIN")
        or shutil.which("etcd")
        or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    )
    if not found:
        pytest.skip("no etcd binary (Debian's etcd-server; scripts/deps.sh installs it)")
    return found


@pytest.fixture
def etcd(tmp_path):
    cp, pp = free_port(), free_port()
    url, peer = f"http://127.0.0.1:{cp}", f"http://127.0.0.1:{pp}"
    proc = subprocess.Popen(
        [
            etcd_bin(),
            "--name",
            "t",
            "--data-dir",
            str(tmp_path / "etcd"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"t={peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "etcd.log", "wb"),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if b'"true"' in urllib.request.urlopen(url + "/health", timeout=1).read():
                break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(
                "etcd did not become healthy: " + (tmp_path / "etcd.log").read_text()[-2000:]
            )
        time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait()


def spawn(*args: str):
    p = subprocess.Popen([kvpool_bin(), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return p, read_ready(p)


def test_client_follows_the_leader_through_etcd(etcd, unique):
    masters = [spawn("master", "--listen", "127.0.0.1:0", "--etcd", etcd) for _ in range(2)]
    store, _ = spawn("store", "--etcd", etcd, "--listen", "127.0.0.1:0", "--dram", "32MiB")
    procs = [p for p, _ in masters] + [store]
    try:
        c = kvpool.Client(f"etcd://{etcd.removeprefix('http://')}/default", timeout=60)
        # The node prints `ready` when it listens; it joins once it has found the leader.
        wait_until("the storage node to register", lambda: c.status()["nodes"], timeout=30)
        c.put(unique + "k", b"survives failover")
        assert c.get(unique + "k") == b"survives failover"

        def leads(addr: str) -> bool:
            try:
                kvpool.Client(addr, timeout=0.5).status()
                return True
            except kvpool.UnavailableError:
                return False

        leader = next(p for p, ready in masters if leads(ready["master"]))
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        # The standby wins once the old lease is over and the same client object finds it by
        # itself; the object is back once the node re-registers with its inventory (until
        # then the new leader answers a miss, which a cache recomputes).
        wait_until(
            "the object to come back after failover",
            lambda: c.get(unique + "k") == b"survives failover",
            timeout=30,
        )
        c.put(unique + "after", b"new leader")
        assert c.get(unique + "after") == b"new leader"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
