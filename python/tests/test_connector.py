"""The connector from Python against a live pool: block keys (the Rust golden vectors),
layouts by address, save / lookup / load of numpy-backed paged caches byte for byte, layer-wise
loads, detached saves, refusals, threads and two processes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvpool import _native

from conftest import run_python

GOLDEN = dict(model="meta-llama/Meta-Llama-3-8B", kv_dtype="bf16", layout="vllm-nhd/all", block_size=4)


# ---------------------------------------------------------------------- block keys


def golden_hasher(**kw) -> _native.BlockHasher:
    g = {**GOLDEN, **kw}
    return _native.BlockHasher(g["model"], g["kv_dtype"], g["layout"], g["block_size"])


def test_keys_match_the_golden_vectors():
    h = golden_hasher()
    assert h.ns_digest.hex() == "51e79b2b68e7113fa191c0c66fecd558"
    keys = h.keys(list(range(1, 11)))
    assert [k.wire() for k in keys] == [
        "kvp1/51e79b2b68e7113f/b0097b15bce0f7db9c18da8a9cdbcee4",
        "kvp1/51e79b2b68e7113f/3f56a781e881f72e5a33106a2cc89bcb",
    ]
    assert h.keys([0x01020304, 0xFFFFFFFF, 0, 128000])[0].hash.hex() == "c3495ea1ad908e0bc1e26d5bcd69cb13"
    ext = h.from_external([0x0123456789ABCDEF])
    assert ext[0].wire(3) == "kvp1/51e79b2b68e7113f/x0123456789abcdef/g3"
    assert ext[0].external and not keys[0].external


def test_keys_chain_param_form_and_pickling():
    import pickle

    h = golden_hasher()
    tokens = list(range(100, 124))
    first = h.keys(tokens[:8])
    assert first + h.keys(tokens[8:], parent=first[-1]) == h.keys(tokens)
    k = h.keys(tokens)[2]
    assert _native.BlockKey.from_param(k.to_param()) == k
    assert _native.BlockKey(k.to_param()) == k
    assert pickle.loads(pickle.dumps(k)) == k
    assert len({k, _native.BlockKey(k.to_param())}) == 1
    assert k.ns_digest == h.ns_digest
    sha = h.from_external([b"\xab" * 32])[0]
    assert sha.wire() == "kvp1/51e79b2b68e7113f/x" + "ab" * 32
    assert pickle.loads(pickle.dumps(sha)) == sha
    with pytest.raises(ValueError):
        _native.BlockKey.from_param("nocolon")
    with pytest.raises(ValueError):
        h.keys(tokens, parent=sha)
    with pytest.raises(ValueError):
        golden_hasher(model="other").keys(tokens, parent=k)
    with pytest.raises(OverflowError):
        h.from_external([-1])
    with pytest.raises(OverflowError):
        h.keys([-1])
    with pytest.raises(ValueError):
        golden_hasher(block_size=0)


# ---------------------------------------------------------------------- layouts


def test_layouts_refuse_aliasing_and_null_regions():
    buf = np.zeros(1 << 16, dtype=np.uint8)
    base = buf.ctypes.data
    # K and V interleaved per block (FlashInfer's [num_blocks, 2, ...]): disjoint, accepted.
    ok = _native.KvLayout([(base, 512, 256), (base + 256, 512, 256)], 2, 64)
    assert ok.segments(3, 0) == [(base + 3 * 512, 512)]
    assert ok.object_len(0) == 512 and ok.grouping_tag == "all"
    # V's blocks overlap K's.
    with pytest.raises(ValueError, match="overlap"):
        _native.KvLayout([(base, 256, 256), (base + 1024, 256, 256)], 2, 16)
    # Same stride, shifted by whole blocks: caught range by range.
    with pytest.raises(ValueError, match="overlap"):
        _native.KvLayout([(base, 512, 256), (base + 1024, 512, 256)], 2, 16)
    with pytest.raises(ValueError, match="null"):
        _native.KvLayout([(0, 256, 256)], 1, 4)
    with pytest.raises(ValueError):
        _native.KvLayout([(base, 128, 256)], 1, 4)  # stride below block size
    with pytest.raises(ValueError):
        _native.KvLayout.paged_vllm([base, base + 4096, base + 8192], 256, 16)  # odd K/V count
    l = _native.KvLayout.block_first(base, 4, 8, 256, layers_per_group=2)
    assert (l.num_layers, l.num_blocks, l.num_groups, l.grouping_tag) == (4, 8, 2, "l2")
    assert l.segments(1, 1) == [(base + 1 * 2048 + 1024, 1024)]
    assert l.group_layers(1) == (2, 4)
    with pytest.raises(ValueError):
        l.segments(8, 0)
    with pytest.raises(ValueError):
        l.object_len(2)


# ---------------------------------------------------------------------- numpy-backed caches


class PagedCache:
    """vLLM's per-layer paged cache in numpy: per layer `[2, num_blocks, block_size, heads,
    head_dim]` (K then V), or `[num_blocks, block_size, head_dim]` for MLA."""

    def __init__(self, layers=4, blocks=16, block_size=4, heads=2, head_dim=8, mla=False, layers_per_group=None):
        self.mla = mla
        shape = (blocks, block_size, head_dim) if mla else (2, blocks, block_size, heads, head_dim)
        self.tensors = [np.zeros(shape, dtype=np.float16) for _ in range(layers)]
        block_bytes = self.block(0, 0, 0).nbytes
        bases = []
        for t in self.tensors:
            bases.append(t.ctypes.data)
            if not mla:
                bases.append(t.ctypes.data + blocks * block_bytes)
        self.layout = _native.KvLayout.paged_vllm(
            bases, block_bytes, blocks, k_and_v=not mla, layers_per_group=layers_per_group, keepalive=self.tensors
        )

    def block(self, layer: int, kv: int, b: int) -> np.ndarray:
        return self.tensors[layer][b] if self.mla else self.tensors[layer][kv, b]

    def fill(self, b: int, seed: int) -> None:
        """What a forward pass writes into block `b`: bytes that depend on `seed`."""
        rng = np.random.default_rng(seed)
        for layer in range(len(self.tensors)):
            for kv in range(1 if self.mla else 2):
                blk = self.block(layer, kv, b)
                blk[...] = rng.standard_normal(blk.shape).astype(np.float16)

    def bytes_of(self, b: int, layers=None) -> bytes:
        layers = range(len(self.tensors)) if layers is None else layers
        return b"".join(self.block(l, kv, b).tobytes() for l in layers for kv in range(1 if self.mla else 2))


def connector(pool, cache: PagedCache, **kw) -> _native.Connector:
    return _native.Connector(cache.layout, pool.master, deadline=10.0, **kw)


def hasher_for(unique: str, cache: PagedCache, block_size=4) -> _native.BlockHasher:
    return _native.BlockHasher(unique, "f16", "vllm-nhd/" + cache.layout.grouping_tag, block_size)


@pytest.mark.parametrize("mla", [False, True], ids=["kv", "mla"])
@pytest.mark.parametrize("layers_per_group", [None, 2], ids=["all", "l2"])
def test_save_then_load_into_another_cache_byte_for_byte(pool, unique, mla, layers_per_group):
    src = PagedCache(layers=5, mla=mla, layers_per_group=layers_per_group)
    dst = PagedCache(layers=5, mla=mla, layers_per_group=layers_per_group)
    h = hasher_for(unique, src)
    keys = h.keys(list(range(6 * 4 + 3)))  # 6 full blocks and a partial one
    assert len(keys) == 6
    src_ids = [3, 7, 0, 12, 5, 9]
    for i, b in enumerate(src_ids):
        src.fill(b, seed=i)
    a, b = connector(pool, src), connector(pool, dst)
    assert a.num_groups == (1 if layers_per_group is None else 3)
    assert b.lookup(keys) == 0
    assert a.save(keys, src_ids) == [True] * 6
    assert a.save(keys, src_ids) == [True] * 6  # already in the pool counts as saved
    assert b.lookup(keys) == 6
    dst_ids = [15, 1, 2, 8, 4, 11]
    assert b.load(keys, dst_ids) == [True] * 6
    for s, d in zip(src_ids, dst_ids):
        assert dst.bytes_of(d) == src.bytes_of(s)
    # The objects are the layout's object format: layers ascending, K then V.
    c = _native.NativeClient(pool.master)
    g = 0 if layers_per_group is None else 1
    layers = range(5) if layers_per_group is None else range(2, 4)
    assert c.get_values([keys[0].wire(None if layers_per_group is None else g)])[0] == src.bytes_of(3, layers)


def test_lookup_stops_at_a_hole_and_misses_load_false(pool, unique):
    src, dst = PagedCache(), PagedCache()
    h = hasher_for(unique, src)
    keys = h.keys(list(range(5 * 4)))
    for b in range(5):
        src.fill(b, seed=10 + b)
    a, b = connector(pool, src), connector(pool, dst)
    # Blocks 0, 1, 3, 4 saved; block 2 is a hole.
    assert a.save([keys[i] for i in (0, 1, 3, 4)], [0, 1, 3, 4]) == [True] * 4
    assert b.lookup(keys) == 2
    assert b.lookup(keys[:2]) == 2
    assert b.lookup([]) == 0
    res = b.load(keys, [10, 11, 12, 13, 14])
    assert res == [True, True, False, True, True]
    for s, d in ((0, 10), (1, 11), (3, 13), (4, 14)):
        assert dst.bytes_of(d) == src.bytes_of(s)


def test_a_missing_layer_group_is_a_miss(pool, unique):
    src, dst = PagedCache(layers_per_group=2), PagedCache(layers_per_group=2)
    h = hasher_for(unique, src)
    keys = h.keys(list(range(8)))
    src.fill(0, 1)
    src.fill(1, 2)
    a, b = connector(pool, src), connector(pool, dst)
    assert a.save(keys, [0, 1]) == [True, True]
    _native.NativeClient(pool.master).remove([keys[1].wire(1)], True)
    assert b.lookup(keys) == 1
    assert b.load(keys, [5, 6]) == [True, False]
    assert dst.bytes_of(5) == src.bytes_of(0)


def test_bad_block_ids_are_refused_before_any_transfer(pool, unique):
    src = PagedCache(blocks=8)
    h = hasher_for(unique, src)
    keys = h.keys(list(range(12)))
    c = connector(pool, src)
    with pytest.raises(ValueError, match="out of range"):
        c.save(keys, [0, 1, 8])
    with pytest.raises(ValueError, match="keys but"):
        c.save(keys, [0, 1])
    assert c.lookup(keys) == 0  # nothing was written
    with pytest.raises(ValueError, match="twice"):
        c.load(keys, [0, 1, 1])
    with pytest.raises(ValueError, match="twice"):
        c.start_load(keys, [2, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        c.save_detached("r", keys, [0, 1, 99])
    with pytest.raises(OverflowError):
        c.load(keys, [0, 1, -1])
    # A save may list a block twice (two keys, same bytes): only loads may not.
    src.fill(4, 4)
    assert c.save(keys[:2], [4, 4]) == [True, True]


def test_layerwise_load_publishes_each_group(pool, unique):
    src, dst = PagedCache(layers=6, layers_per_group=2), PagedCache(layers=6, layers_per_group=2)
    h = hasher_for(unique, src)
    keys = h.keys(list(range(4 * 4)))
    for b in range(4):
        src.fill(b, 20 + b)
    a, b = connector(pool, src), connector(pool, dst)
    assert a.save(keys[:3], [0, 1, 2]) == [True] * 3
    load = b.start_load(keys, [8, 9, 10, 11], window=2)
    assert load.num_groups == 3
    for g in range(3):
        assert load.wait_group(g) == [True, True, True, False]
        layers = range(2 * g, 2 * g + 2)
        for s, d in ((0, 8), (1, 9), (2, 10)):
            assert dst.bytes_of(d, layers) == src.bytes_of(s, layers)
    assert load.wait() == [True, True, True, False]
    assert load.wait_group(0) == [True, True, True, False]  # again, any order
    assert load.done()
    with pytest.raises(ValueError):
        load.wait_group(3)
    # Dropping a load that was never waited for cancels it safely.
    b.start_load(keys, [12, 13, 14, 15])


def test_detached_saves_are_reported_per_request(pool, unique):
    src, dst = PagedCache(), PagedCache()
    h = hasher_for(unique, src)
    keys = h.keys(list(range(6 * 4)))
    for b in range(6):
        src.fill(b, 30 + b)
    want = [src.bytes_of(b) for b in range(6)]
    a = connector(pool, src)
    a.save_detached("req-1", keys[:3], [0, 1, 2])
    a.save_detached("req-2", keys[3:], [3, 4, 5])
    for b in range(6):  # the blocks were copied: the engine may reuse them at once
        src.fill(b, 99)
    assert a.wait_saves(timeout=10)
    done = dict(a.finished_saves())
    assert done == {"req-1": [True] * 3, "req-2": [True] * 3}
    assert a.finished_saves() == []
    b = connector(pool, dst)
    assert b.load(keys, list(range(6))) == [True] * 6
    assert [dst.bytes_of(i) for i in range(6)] == want


def test_failures_are_tuples_and_lookup_failures_too(tmp_path, unique):
    from conftest import start_pool

    p = start_pool(tmp_path, "--dram", "32MiB")
    p.stop()
    src = PagedCache()
    c = _native.Connector(src.layout, p.master, deadline=0.5)
    keys = hasher_for(unique, src).keys(list(range(8)))
    res = c.save(keys, [0, 1])
    assert all(type(r) is tuple and len(r) == 3 for r in res), res
    code, name, msg = res[0]
    assert dict(_native.error_codes())[code] == name and msg
    assert type(c.lookup(keys)) is tuple
    assert type(c.load(keys, [0, 1])[0]) is tuple


def test_threads_share_a_connector(pool, unique):
    src = PagedCache(blocks=64)
    dst = PagedCache(blocks=64)
    h = hasher_for(unique, src)
    a, b = connector(pool, src), connector(pool, dst)
    errors = []

    def worker(t: int) -> None:
        try:
            keys = h.keys([t] * 4 * 8)  # one 8-block prompt per thread
            ids = list(range(t * 8, t * 8 + 8))
            for i in ids:
                src.fill(i, 1000 + i)
            assert a.save(keys, ids) == [True] * 8
            assert b.lookup(keys) == 8
            assert b.load(keys, ids) == [True] * 8
            for i in ids:
                assert dst.bytes_of(i) == src.bytes_of(i)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


SAVER = """
import sys
import numpy as np
from kvpool import _native

master, model = sys.argv[1], sys.argv[2]
t = [np.zeros((2, 8, 4, 2, 8), dtype=np.float16) for _ in range(3)]
bb = t[0][0, 0].nbytes
bases = [x for a in t for x in (a.ctypes.data, a.ctypes.data + 8 * bb)]
layout = _native.KvLayout.paged_vllm(bases, bb, 8, keepalive=t)
for layer, a in enumerate(t):
    a[...] = np.arange(a.size, dtype=np.float16).reshape(a.shape) + layer
c = _native.Connector(layout, master)
keys = _native.BlockHasher(model, "f16", "vllm-nhd/all", 4).keys(list(range(12)))
print(c.save(keys, [5, 6, 7]))
"""


def test_another_process_saves_and_this_one_loads(pool, unique):
    out = run_python(SAVER, pool.master, unique)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, True, True]"
    dst = PagedCache(layers=3, blocks=8, block_size=4, heads=2, head_dim=8)
    keys = hasher_for(unique, dst).keys(list(range(12)))
    c = connector(pool, dst)
    assert c.lookup(keys) == 3
    assert c.load(keys, [0, 1, 2]) == [True] * 3
    for layer in range(3):
        want = np.arange(2 * 8 * 4 * 2 * 8, dtype=np.float16).reshape(2, 8, 4, 2, 8) + layer
        assert (dst.tensors[layer][:, 0:3] == want[:, 5:8]).all()


def test_gpu_memory_needs_the_cuda_feature_and_a_device():
    reason = _native.cuda_unavailable(0)
    if reason is not None:
        pytest.skip(f"no GPU path here: {reason}")
