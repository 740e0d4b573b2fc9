"""kvpool.sglang.KVPoolStorage driven through SGLang's own classes against a live pool.

Run under the SGLang virtualenv (scripts/sglang-env.sh); elsewhere every test but the first
skips, saying why. Nothing here is a stand-in: the backend is loaded by SGLang's
``StorageBackendFactory`` from the same ``dynamic`` config a server takes, and pages live in
SGLang's real host KV pools (``MHATokenToKVPoolHost``, ``MLATokenToKVPoolHost``), built on
CPU from SGLang's real device pools (``MHATokenToKVPool``, ``MLATokenToKVPool`` with
``device="cpu"``, the smallest geometry that keeps every layout's page addressing honest:
several layers, heads and tokens per page).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import kvpool

from conftest import run_python, start_pool

try:
    import sglang  # noqa: F401  (first, so a missing SGLang is what the skip names)
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from kvpool.sglang import KVPoolStorage

    SGLANG_MISSING = None
except Exception as e:  # noqa: BLE001 - whatever stops SGLang importing is the reason
    SGLANG_MISSING = f"{type(e).__name__}: {e}"

PYTHON_DIR = Path(__file__).resolve().parents[1]
DYNAMIC = {"backend_name": "kvpool", "module_path": "kvpool.sglang", "class_name": "KVPoolStorage"}
PAGE = 4  # tokens per page
MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]
MLA_LAYOUTS = ["layer_first", "page_first", "page_first_direct"]


def _why_missing() -> str:
    reason = SGLANG_MISSING
    # scripts/sglang-env.sh leaves pip's reason here when the install failed.
    err = Path(os.environ.get("KVPOOL_SGLANG_INSTALL_ERROR", "/nonexistent"))
    if err.is_file():
        reason += f"; install failed: {err.read_text(errors='replace').splitlines()[0]} ({err})"
    else:
        reason += " (run under the SGLang virtualenv: scripts/sglang-env.sh)"
    return reason


@pytest.fixture
def sg():
    """Skips the test where SGLang cannot be imported."""
    if SGLANG_MISSING is not None:
        pytest.skip(f"sglang is not installed: {_why_missing()}")


# ---------------------------------------------------------------------------- builders


def mha_host(layout: str = "page_first", layers: int = 3, heads: int = 2, head_dim: int = 8):
    device = MHATokenToKVPool(
        size=64, page_size=PAGE, dtype=torch.bfloat16, head_num=heads, head_dim=head_dim,
        layer_num=layers, device="cpu", enable_memory_saver=False, enable_alt_stream=False,
    )
    info = device.get_device_pool_infos()[0].buffer_info
    return MHATokenToKVPoolHost(
        info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=device.size, start_layer=device.start_layer,
        end_layer=device.end_layer,
    )


def mla_host(layout: str = "page_first", layers: int = 3):
    device = MLATokenToKVPool(
        size=64, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8,
        layer_num=layers, device="cpu", enable_memory_saver=False,
    )
    info = device.get_device_pool_infos()[0].buffer_info
    return MLATokenToKVPoolHost(
        info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=device.size, start_layer=device.start_layer,
        end_layer=device.end_layer, target_layer_num=device.layer_num,
        override_kv_cache_dim=device.kv_cache_dim,
    )


def storage_config(model, *, tp_rank=0, tp_size=1, mla=False, metrics=False, **extra):
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=metrics,
        is_page_first_layout=False, model_name=model,
        extra_config={**DYNAMIC, "interface_v1": 1, **extra},
    )


def backend(master, host, model, *, timeout=10, **cfg):
    """What HiCache does on attach: the factory builds it, then the host pool registers."""
    config = storage_config(model, master=master, timeout=timeout, **cfg)
    b = StorageBackendFactory.create_backend("dynamic", config, host)
    b.register_mem_pool_host(host)
    return b


def fill_random(host, seed: int) -> None:
    raw = host.kv_buffer.view(-1).view(torch.uint8)
    g = torch.Generator().manual_seed(seed)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))


def page_bytes(host, indices, i: int) -> bytes:
    """Page i of an allocation, as bytes (compared as bytes: random bits make NaNs)."""
    page = host.get_data_page(int(indices[i * PAGE]), flat=True)
    return page.contiguous().view(torch.uint8).numpy().tobytes()


def hashes(unique: str, n: int, tag: str = "") -> list:
    return [f"{tag}{i:02d}{unique.strip('/').replace('/', '-')}" for i in range(n)]


# ---------------------------------------------------------------------------- tests


def test_module_imports_without_sglang():
    # Hide SGLang (the dev virtualenv has none anyway): the package still imports, and the
    # class says what is missing when used.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["sglang"] = None
        import kvpool, kvpool.sglang
        try:
            kvpool.sglang.KVPoolStorage(None, {})
        except ImportError as e:
            print(e)
        """
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "KVPoolStorage needs SGLang" in r.stdout


def test_factory_loads_the_dynamic_backend(sg, pool, unique):
    host = mha_host()
    b = backend(pool.master, host, unique)
    assert type(b) is KVPoolStorage and b.mem_pool_host is host
    config = storage_config(unique, master=pool.master)
    config.extra_config["class_name"] = "Nope"
    with pytest.raises(AttributeError):
        StorageBackendFactory.create_backend("dynamic", config, host)


@pytest.mark.parametrize("layout", MHA_LAYOUTS)
def test_mha_pages_round_trip_in_place(sg, pool, unique, layout):
    host = mha_host(layout)
    b = backend(pool.master, host, unique)
    keys = hashes(unique, 6)
    src = host.alloc(len(keys) * PAGE)
    fill_random(host, 1)
    want = [page_bytes(host, src, i) for i in range(len(keys))]
    assert b.batch_exists(keys) == 0
    assert b.batch_set_v1(keys, src) == [True] * 6
    assert b.batch_exists(keys) == 6 and b.exists(keys[5])

    # Into other slots of the pool, after wiping it: only the pool can have put them there.
    dst = host.alloc(len(keys) * PAGE)
    host.kv_buffer.zero_()
    assert b.batch_get_v1(keys, dst) == [True] * 6
    assert [page_bytes(host, dst, i) for i in range(6)] == want


def test_exists_counts_the_prefix_and_needs_both_halves(sg, pool, unique):
    host = mha_host()
    b = backend(pool.master, host, unique)
    keys = hashes(unique, 6)
    idx = host.alloc(6 * PAGE)
    fill_random(host, 2)
    written = [k for i, k in enumerate(keys) if i != 4]
    kept = [i for i in range(6) if i != 4]
    written_idx = torch.cat([idx[i * PAGE : (i + 1) * PAGE] for i in kept])
    assert b.batch_set_v1(written, written_idx) == [True] * 5
    assert b.batch_exists(keys) == 4  # the hole at page 4
    assert b.batch_exists(keys[5:]) == 1 and not b.exists(keys[4])

    # Page 1 without its V half is not a page (names as the module docs give them).
    c = kvpool.Client(pool.master)
    model = unique.replace("/", "-")
    assert c.remove(f"sglang/{model}/page_first-bfloat16/{keys[1]}_tp0of1_v")
    assert c.exists(f"sglang/{model}/page_first-bfloat16/{keys[1]}_tp0of1_k")
    assert b.batch_exists(keys) == 1
    assert b.batch_get_v1(keys[:3], idx[: 3 * PAGE]) == [True, False, True]


def test_a_page_already_there_counts_as_set_and_is_not_rewritten(sg, pool, unique):
    host = mha_host()
    b = backend(pool.master, host, unique)
    keys = hashes(unique, 3)
    idx = host.alloc(3 * PAGE)
    fill_random(host, 3)
    first = [page_bytes(host, idx, i) for i in range(3)]
    assert b.batch_set_v1(keys, idx) == [True] * 3
    fill_random(host, 4)
    assert b.batch_set_v1(keys, idx) == [True] * 3
    assert b.batch_get_v1(keys, idx) == [True] * 3
    assert [page_bytes(host, idx, i) for i in range(3)] == first


def test_tp_ranks_keep_their_own_heads(sg, pool, unique):
    hosts = [mha_host(), mha_host()]
    ranks = [backend(pool.master, h, unique, tp_rank=r, tp_size=2) for r, h in enumerate(hosts)]
    keys = hashes(unique, 4)
    idx = [h.alloc(4 * PAGE) for h in hosts]
    for r, h in enumerate(hosts):
        fill_random(h, 10 + r)
    want = [[page_bytes(h, i, p) for p in range(4)] for h, i in zip(hosts, idx)]
    assert ranks[0].batch_set_v1(keys, idx[0]) == [True] * 4
    assert ranks[1].batch_exists(keys) == 0  # rank 0's heads are not rank 1's
    assert ranks[1].batch_set_v1(keys[:2], idx[1][: 2 * PAGE]) == [True] * 2
    assert ranks[1].batch_exists(keys) == 2 and ranks[0].batch_exists(keys) == 4
    for r, h in enumerate(hosts):
        h.kv_buffer.zero_()
        n = 4 if r == 0 else 2
        assert ranks[r].batch_get_v1(keys[:n], idx[r][: n * PAGE]) == [True] * n
        assert [page_bytes(h, idx[r], p) for p in range(n)] == want[r][:n]


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_mla_pages_are_shared_by_all_tp_ranks(sg, pool, unique, layout):
    hosts = [mla_host(layout), mla_host(layout)]
    ranks = [
        backend(pool.master, h, unique, tp_rank=r, tp_size=2, mla=True) for r, h in enumerate(hosts)
    ]
    # SGLang lets one rank write MLA pages; the others skip their backups.
    configs = [storage_config(unique, tp_rank=r, tp_size=2, mla=True) for r in (0, 1)]
    assert [c.is_storage_writer for c in configs] == [True, False]
    keys = hashes(unique, 5)
    src = hosts[0].alloc(5 * PAGE)
    fill_random(hosts[0], 20)
    want = [page_bytes(hosts[0], src, i) for i in range(5)]
    assert ranks[0].batch_set_v1(keys, src) == [True] * 5
    assert ranks[1].batch_exists(keys) == 5
    dst = hosts[1].alloc(5 * PAGE)
    assert ranks[1].batch_get_v1(keys, dst) == [True] * 5
    assert [page_bytes(hosts[1], dst, i) for i in range(5)] == want


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_legacy_calls_store_the_same_objects(sg, pool, unique, layout):
    # What SGLang does without interface_v1: flat data pages by value (_generic_page_set/get).
    host = mha_host(layout)
    b = backend(pool.master, host, unique)
    keys = hashes(unique, 3, "legacy")
    idx = host.alloc(3 * PAGE)
    fill_random(host, 30)
    want = [page_bytes(host, idx, i) for i in range(3)]
    pages = [host.get_data_page(int(idx[i * PAGE]), flat=True) for i in range(3)]
    assert b.batch_set(keys, pages) is True
    assert b.batch_exists(keys) == 3
    targets = [host.get_dummy_flat_data_page() for _ in keys]
    got = b.batch_get(keys, targets)
    assert all(g is t for g, t in zip(got, targets))
    assert [t.view(torch.uint8).numpy().tobytes() for t in targets] == want
    # ... and the zero-copy calls read them.
    host.kv_buffer.zero_()
    assert b.batch_get_v1(keys, idx) == [True] * 3
    assert [page_bytes(host, idx, i) for i in range(3)] == want
    assert b.get("missing" + keys[0], host.get_dummy_flat_data_page()) is None
    assert b.set(keys[0], pages[0]) is True


def test_another_process_reads_the_pages(sg, pool, unique, tmp_path):
    host = mha_host()
    b = backend(pool.master, host, unique)
    keys = hashes(unique, 5)
    idx = host.alloc(5 * PAGE)
    fill_random(host, 40)
    want = b"".join(page_bytes(host, idx, i) for i in range(5))
    assert b.batch_set_v1(keys, idx) == [True] * 5
    code = textwrap.dedent(
        """
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
        import test_sglang as t
        master, model, out = sys.argv[2:5]
        keys = sys.argv[5:]
        host = t.mha_host()
        b = t.backend(master, host, model)
        host.alloc(3 * t.PAGE)  # other slots than the writer used
        idx = host.alloc(len(keys) * t.PAGE)
        assert b.batch_exists(keys) == len(keys)
        assert b.batch_get_v1(keys, idx) == [True] * len(keys)
        with open(out, "wb") as f:
            f.write(b"".join(t.page_bytes(host, idx, i) for i in range(len(keys))))
        """
    )
    out = tmp_path / "pages.bin"
    r = run_python(code, str(PYTHON_DIR), pool.master, unique, str(out), *keys, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == want


def test_failures_are_false_never_exceptions(sg, tmp_path, unique):
    p = start_pool(tmp_path, "--dram", "32MiB")
    host = mha_host()
    b = backend(p.master, host, unique, timeout=1)
    keys = hashes(unique, 2)
    idx = host.alloc(2 * PAGE)
    assert b.batch_set_v1(keys, idx) == [True, True]
    # Misuse: the wrong number of host indices, targets of the wrong size, no values.
    assert b.batch_get_v1(keys, idx[:PAGE]) == [False, False]
    assert b.batch_get(keys, [torch.zeros(3), torch.zeros(3)]) == [None, None]
    assert b.batch_set(keys, [None, None]) is False
    p.stop()
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, idx) == [False, False]
    assert b.batch_set_v1(hashes(unique, 2, "new"), idx) == [False, False]
    assert b.exists(keys[0]) is False
    b.close()
    assert b.batch_get_v1(keys, idx) == [False, False]


def test_an_unreachable_master_fails_at_start(sg, unique):
    with pytest.raises(kvpool.UnavailableError):
        backend("127.0.0.1:1", mha_host(), unique, timeout=1)


def test_stats_and_clear(sg, pool, unique):
    host = mha_host()
    b = backend(pool.master, host, unique, metrics=True)
    other = backend(pool.master, host, unique + "other")
    keys = hashes(unique, 4)
    idx = host.alloc(4 * PAGE)
    fill_random(host, 50)
    assert b.batch_set_v1(keys, idx) == [True] * 4
    assert other.batch_set_v1(keys, idx) == [True] * 4
    assert b.batch_get_v1(keys, idx) == [True] * 4
    stats = b.get_stats()
    assert stats.backup_pgs == [4] and stats.prefetch_pgs == [4]
    assert stats.backup_bandwidth[0] > 0 and stats.prefetch_bandwidth[0] > 0
    assert b.get_stats().backup_pgs == []  # taken
    assert other.get_stats() is None  # metrics off
    # kvpool's own connector counters (docs/operations.md), whatever SGLang's setting.
    t = other.counters.totals()
    assert (t["saved_tokens"], t["loaded_tokens"], t["lookups"]) == (4 * PAGE, 0, 0)
    assert b.clear() is True
    assert b.batch_exists(keys) == 0
    assert other.batch_exists(keys) == 4  # another model's pages stay
    t = other.counters.totals()
    assert (t["lookups"], t["prompt_tokens"], t["matched_tokens"]) == (1, 4 * PAGE, 4 * PAGE)
    t = b.counters.totals()
    assert (t["loaded_tokens"], t["load_failed_tokens"]) == (4 * PAGE, 0)
    assert (t["lookups"], t["prompt_tokens"], t["matched_tokens"]) == (1, 4 * PAGE, 0)
