"""The P/D hand-off's Python bindings (`kvpool.connector.PdProducer` / `PdConsumer`, over the
Rust `pd` module) against a live pool, without vLLM: a hold released by the consumer's done,
an unclaimed hold expiring, a producer-side abort, a dead producer failing a claim at once,
and the bootstrap port rule."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from kvpool import connector as kc
from kvpool.errors import InvalidArgumentError, KvpoolError, UnavailableError

from conftest import wait_until


def caches(pool):
    a = np.zeros((2, 8, 4, 2, 8), np.float16)
    b = np.zeros_like(a)
    a[:, 1:3] = np.random.default_rng(1).standard_normal((2, 2, 4, 2, 8))
    ca = kc.Connector(kc.paged_layout([a]), pool.master, timeout=5)
    cb = kc.Connector(kc.paged_layout([b]), pool.master, timeout=5)
    return a, b, ca, cb


def test_a_claimed_and_loaded_handoff_is_released(pool, unique):
    a, b, ca, cb = caches(pool)
    keys = kc.BlockHasher(unique, "f16", "vllm-nhd/all", 4).keys(list(range(8)))
    assert ca.save(keys, [1, 2]) == [None, None]
    prod = kc.PdProducer(ca, base_port=0, abort_timeout=30)
    cons = kc.PdConsumer(cb, consumer_timeout=5)
    tid = prod.hold("req-1", keys, transfer_id="t-1")
    assert tid == "t-1" and prod.outcome(tid) is None
    assert prod.stats()["held_blocks"] == 2
    assert cons.claim(tid, prod.bootstrap_addr) == 2
    assert cb.load(keys, [5, 6]) == [True, True]
    assert b[:, 5:7].tobytes() == a[:, 1:3].tobytes()
    cons.done(tid, prod.bootstrap_addr)
    assert prod.outcome(tid) == "released"
    assert prod.stats()["held"] == 0
    # A second claim of a released hand-off is refused.
    with pytest.raises(KvpoolError) as e:
        cons.claim(tid, prod.bootstrap_addr)
    assert e.value.name == "TransferUnknown"
    # A hold without an id gets one of its own.
    assert prod.hold("req-2", keys) != tid
    prod.close()


def test_an_unclaimed_handoff_expires_and_an_abort_ends_a_hold(pool, unique):
    a, b, ca, cb = caches(pool)
    keys = kc.BlockHasher(unique, "f16", "vllm-nhd/all", 4).keys(list(range(8)))
    assert ca.save(keys, [1, 2]) == [None, None]
    prod = kc.PdProducer(ca, base_port=0, abort_timeout=1)
    cons = kc.PdConsumer(cb, consumer_timeout=5)
    assert prod.abort_timeout == 1.0
    tid = prod.hold("req-1", keys)
    wait_until("the hold to expire", lambda: prod.outcome(tid) is not None)
    assert prod.outcome(tid) == "expired"
    with pytest.raises(KvpoolError) as e:
        cons.claim(tid, prod.bootstrap_addr)
    assert e.value.name == "TransferExpired"
    tid = prod.hold("req-3", keys)
    assert prod.abort("req-3") == 1
    assert prod.outcome(tid) == "aborted"
    with pytest.raises(KvpoolError) as e:
        cons.claim(tid, prod.bootstrap_addr)
    assert e.value.name == "TransferAborted"
    # The consumer's abort ends a hold too.
    tid = prod.hold("req-4", keys)
    cons.abort(tid, prod.bootstrap_addr, "decoder gave up")
    wait_until("the consumer's abort to end the hold", lambda: prod.outcome(tid) is not None)
    assert prod.outcome(tid) == "aborted"
    prod.close()


def test_a_dead_producer_fails_the_claim_at_once(pool):
    _, _, ca, cb = caches(pool)
    prod = kc.PdProducer(ca, base_port=0)
    addr = prod.bootstrap_addr
    prod.close()
    cons = kc.PdConsumer(cb, consumer_timeout=5)
    t = time.monotonic()
    with pytest.raises(UnavailableError):
        cons.claim("t", addr)
    assert time.monotonic() - t < 3


def test_ports_follow_vllms_rule_and_the_environment(pool, monkeypatch):
    _, _, ca, _ = caches(pool)
    with socket.socket() as s:  # a free base port, with the next one most likely free too
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    monkeypatch.setenv("VLLM_MOONCAKE_BOOTSTRAP_PORT", str(base - 1))
    monkeypatch.setenv("VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT", "7")
    prod = kc.PdProducer(ca, tp_size=2, tp_rank=1)
    assert prod.port == base and prod.bootstrap_addr == f"127.0.0.1:{base}"
    assert prod.abort_timeout == 7.0
    prod.close()
    monkeypatch.setenv("VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT", "soon")
    with pytest.raises(InvalidArgumentError):
        kc.PdProducer(ca, base_port=0)
    with pytest.raises(InvalidArgumentError):
        kc.PdProducer(ca, role="kv_sideways", base_port=0, abort_timeout=1)
