"""Fixtures: a live pool (`kvpool up`, a real master and storage node on loopback port 0).

The `kvpool` binary comes from `KVPOOL_BIN`, else the cargo target folder scripts/test.sh
builds into. Each fixture waits for the binary's `ready` line with a deadline, never sleeps.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kvpool_bin() -> str:
    env = os.environ.get("KVPOOL_BIN")
    if env:
        return env
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/kvpool-target"))
    for profile in ("debug", "release"):
        p = target / profile / "kvpool"
        if p.exists():
            return str(p)
    found = shutil.which("kvpool")
    if found:
        return found
    raise RuntimeError("no kvpool binary: run scripts/test.sh, or set KVPOOL_BIN")


def read_ready(proc: subprocess.Popen, deadline_s: float = 30.0) -> Dict[str, str]:
    """Reads stdout until the `ready k=v ...` line; fails with the process's stderr."""
    end = time.monotonic() + deadline_s
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("ready "):
                return dict(kv.split("=", 1) for kv in line.split()[1:])
    proc.kill()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    raise RuntimeError(f"kvpool did not print its ready line in {deadline_s}s: {err[-2000:]}")


@dataclass
class Pool:
    master: str
    store: str
    proc: subprocess.Popen
    log: Path
    #: The HTTP endpoint (`/metrics`), when started with `--http`.
    http: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_pool(tmp: Path, *args: str, env: Optional[dict] = None) -> Pool:
    log = tmp / "kvpool-up.log"
    proc = subprocess.Popen(
        [kvpool_bin(), "up", "--listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),
        env={**os.environ, **(env or {})},
    )
    try:
        ready = read_ready(proc)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{log.read_text(errors='replace')[-2000:]}") from None
    return Pool(
        master=ready["master"],
        store=ready.get("store", ""),
        proc=proc,
        log=log,
        http=ready.get("http", ""),
    )


@pytest.fixture(scope="session")
def pool(tmp_path_factory) -> Pool:
    """One pool for the session (256 MiB of DRAM); tests use distinct keys."""
    p = start_pool(tmp_path_factory.mktemp("pool"), "--dram", "256MiB")
    yield p
    p.stop()


@pytest.fixture
def fresh_pool(tmp_path) -> Pool:
    """A pool of the test's own, for tests that kill it or fill it."""
    p = start_pool(tmp_path, "--dram", "64MiB")
    yield p
    p.stop()


@pytest.fixture
def unique(request) -> str:
    """A key prefix unique to the test."""
    return f"{request.node.name}-{os.getpid()}-{time.monotonic_ns()}/"


def wait_until(what: str, cond, timeout: float = 10.0, every: float = 0.02) -> None:
    """Polls `cond()` until it is true; fails naming `what` once `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for: {what}"
        time.sleep(every)


def run_python(code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Runs `code` in a new interpreter (another process sharing the pool)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
