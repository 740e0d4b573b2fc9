"""kvpool.connector against a live pool: block keys (the Rust golden vectors), layouts by
address, save / lookup / load of numpy-backed paged caches byte for byte (vLLM's per-layer
layouts, MLA, a cross-layer cache sharing their objects), holes and misses, refusals,
layer-wise loads, detached saves, failures, threads, two processes, and GPU memory where
there is one."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import kvpool
from kvpool import _native
from kvpool import connector as kc

from conftest import run_python, start_pool

GOLDEN = dict(
    model="meta-llama/Meta-Llama-3-8B", kv_dtype="bf16", layout="vllm-nhd/all", block_size=4
)


# ---------------------------------------------------------------------- block keys


def golden_hasher(**kw) -> kc.BlockHasher:
    g = {**GOLDEN, **kw}
    return kc.BlockHasher(g["model"], g["kv_dtype"], g["layout"], g["block_size"])


def test_keys_match_the_golden_vectors():
    h = golden_hasher()
    assert h.ns_digest.hex() == "51e79b2b68e7113fa191c0c66fecd558"
    keys = h.keys(list(range(1, 11)))
    assert [k.wire() for k in keys] == [
        "kvp1/51e79b2b68e7113f/b0097b15bce0f7db9c18da8a9cdbcee4",
        "kvp1/51e79b2b68e7113f/3f56a781e881f72e5a33106a2cc89bcb",
    ]
    assert (
        h.keys([0x01020304, 0xFFFFFFFF, 0, 128000])[0].hash.hex()
        == "c3495ea1ad908e0bc1e26d5bcd69cb13"
    )
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
    head_dim]` (FlashAttention, K then V), `[num_blocks, 2, ...]` (FlashInfer) or
    `[num_blocks, block_size, head_dim]` (MLA)."""

    def __init__(
        self,
        layers=4,
        blocks=16,
        block_size=4,
        heads=2,
        head_dim=8,
        kind="flash",
        layers_per_group=None,
    ):
        self.kind = kind
        shape = {
            "flash": (2, blocks, block_size, heads, head_dim),
            "flashinfer": (blocks, 2, block_size, heads, head_dim),
            "mla": (blocks, block_size, head_dim),
        }[kind]
        self.tensors = [np.zeros(shape, dtype=np.float16) for _ in range(layers)]
        named = {f"model.layers.{i}.attn": t for i, t in enumerate(self.tensors)}
        self.layout = kc.paged_layout(named, layers_per_group=layers_per_group)

    @property
    def kvs(self) -> range:
        return range(1 if self.kind == "mla" else 2)

    def block(self, layer: int, kv: int, b: int) -> np.ndarray:
        t = self.tensors[layer]
        if self.kind == "mla":
            return t[b]
        return t[kv, b] if self.kind == "flash" else t[b, kv]

    def fill(self, b: int, seed: int) -> None:
        """What a forward pass writes into block `b`: values that depend on `seed`."""
        rng = np.random.default_rng(seed)
        for layer in range(len(self.tensors)):
            for kv in self.kvs:
                blk = self.block(layer, kv, b)
                blk[...] = rng.standard_normal(blk.shape).astype(np.float16)

    def bytes_of(self, b: int, layers=None) -> bytes:
        """Block `b`'s object bytes (§2.1: layers ascending, K then V)."""
        layers = range(len(self.tensors)) if layers is None else layers
        return b"".join(self.block(l, kv, b).tobytes() for l in layers for kv in self.kvs)


def connector(pool, cache, **kw) -> kc.Connector:
    return kc.Connector(cache.layout, pool.master, timeout=10, **kw)


def hasher_for(unique: str, cache, block_size=4) -> kc.BlockHasher:
    return kc.BlockHasher(unique, "f16", "vllm-nhd/" + cache.layout.grouping_tag, block_size)


def test_paged_layout_reads_vllm_tensors():
    flash = PagedCache(layers=2, blocks=8, kind="flash")
    t = flash.tensors[0]
    bb = 4 * 2 * 8 * 2
    assert flash.layout.regions[:2] == [(t.ctypes.data, bb, bb), (t.ctypes.data + 8 * bb, bb, bb)]
    assert (flash.layout.num_layers, flash.layout.regions_per_layer, flash.layout.num_blocks) == (
        2,
        2,
        8,
    )
    inf = PagedCache(layers=2, blocks=8, kind="flashinfer")
    t = inf.tensors[1]
    assert inf.layout.regions[2:] == [(t.ctypes.data, 2 * bb, bb), (t.ctypes.data + bb, 2 * bb, bb)]
    mla = PagedCache(layers=3, blocks=8, kind="mla")
    assert mla.layout.regions_per_layer == 1 and mla.layout.object_len(0) == 3 * 4 * 8 * 2
    assert flash.layout.device is None
    # HND: the tensor is [2, blocks, heads, block_size, dim] in memory, seen as NHD; a block
    # is still one range, copied as laid out.
    hnd = np.zeros((2, 8, 2, 4, 8), dtype=np.float16).transpose(0, 1, 3, 2, 4)
    l = kc.paged_layout([hnd])
    assert l.regions == [(hnd.ctypes.data, bb, bb), (hnd.ctypes.data + 8 * bb, bb, bb)]
    with pytest.raises(kvpool.InvalidArgumentError, match="not contiguous"):
        kc.paged_layout([np.zeros((2, 8, 4, 2, 16), dtype=np.float16)[..., ::2]])
    with pytest.raises(kvpool.InvalidArgumentError, match="read-only"):
        ro = np.zeros((2, 8, 4, 2, 8), dtype=np.float16)
        ro.flags.writeable = False
        kc.paged_layout([ro])
    with pytest.raises(kvpool.InvalidArgumentError, match="blocks"):
        kc.paged_layout([np.zeros((2, 8, 4, 2, 8)), np.zeros((2, 9, 4, 2, 8))])
    with pytest.raises(kvpool.InvalidArgumentError, match="K/V"):
        kc.paged_layout([np.zeros((3, 8, 4, 2, 8))])
    with pytest.raises(kvpool.InvalidArgumentError):
        kc.paged_layout([])
    with pytest.raises(TypeError):
        kc.paged_layout([bytearray(64)])
    buf = np.zeros((8, 3, 2, 64), dtype=np.uint8)
    l = kc.block_first_layout(buf, num_layers=3, num_blocks=8)
    assert l.segments(5, 0) == [(buf.ctypes.data + 5 * 384, 384)]
    with pytest.raises(kvpool.InvalidArgumentError, match="split"):
        kc.layer_first_layout(buf, num_layers=5, num_blocks=8)


@pytest.mark.parametrize("kind", ["flash", "flashinfer", "mla"])
@pytest.mark.parametrize("layers_per_group", [None, 2], ids=["all", "l2"])
def test_save_then_load_into_another_cache_byte_for_byte(pool, unique, kind, layers_per_group):
    src = PagedCache(layers=5, kind=kind, layers_per_group=layers_per_group)
    dst = PagedCache(layers=5, kind=kind, layers_per_group=layers_per_group)
    h = hasher_for(unique, src)
    keys = h.keys(list(range(6 * 4 + 3)))  # 6 full blocks and a partial one
    assert len(keys) == 6
    src_ids = [3, 7, 0, 12, 5, 9]
    for i, b in enumerate(src_ids):
        src.fill(b, seed=i)
    a, b = connector(pool, src), connector(pool, dst)
    assert a.num_groups == (1 if layers_per_group is None else 3)
    assert b.lookup(keys) == 0
    assert a.save(keys, src_ids) == [None] * 6
    assert a.save(keys, np.array(src_ids)) == [None] * 6  # already in the pool counts as saved
    assert b.lookup(keys) == 6
    dst_ids = [15, 1, 2, 8, 4, 11]
    assert b.load(keys, dst_ids) == [True] * 6
    for s, d in zip(src_ids, dst_ids):
        assert dst.bytes_of(d) == src.bytes_of(s)
    # The objects are the object format of docs/connector.md §2.1.
    g = None if layers_per_group is None else 1
    layers = range(5) if g is None else range(2, 4)
    with kvpool.Client(pool.master) as c:
        assert c.get(keys[0].wire(g)) == src.bytes_of(3, layers)


def test_a_cross_layer_cache_shares_objects_with_a_paged_one(pool, unique):
    paged = PagedCache(layers=3, blocks=8)
    # vLLM's cross-layer (block-first) cache: [num_blocks][layers][K, V][block_size, heads, dim].
    cross = np.zeros((8, 3, 2, 4, 2, 8), dtype=np.float16)
    layout = kc.block_first_layout(cross, num_layers=3, num_blocks=8)
    keys = hasher_for(unique, paged).keys(list(range(12)))
    for b in (1, 2, 3):
        paged.fill(b, 40 + b)
    a = connector(pool, paged)
    x = kc.Connector(layout, pool.master, timeout=10)
    assert a.save(keys, [1, 2, 3]) == [None] * 3
    assert x.load(keys, [7, 0, 5]) == [True] * 3
    for s, d in ((1, 7), (2, 0), (3, 5)):
        for layer in range(3):
            for kv in range(2):
                assert (cross[d, layer, kv] == paged.block(layer, kv, s)).all()
    # And back: the cross-layer cache saves, the paged one loads.
    cross[6] = np.arange(cross[6].size, dtype=np.float16).reshape(cross[6].shape)
    more = hasher_for(unique, paged).keys(list(range(16)))[3:]
    assert x.save(more, [6]) == [None]
    assert a.load(more, [0]) == [True]
    assert paged.bytes_of(0) == cross[6].tobytes()


def test_lookup_stops_at_a_hole_and_misses_load_false(pool, unique):
    src, dst = PagedCache(), PagedCache()
    keys = hasher_for(unique, src).keys(list(range(5 * 4)))
    for b in range(5):
        src.fill(b, seed=10 + b)
    a, b = connector(pool, src), connector(pool, dst)
    # Blocks 0, 1, 3, 4 saved; block 2 is a hole.
    assert a.save([keys[i] for i in (0, 1, 3, 4)], [0, 1, 3, 4]) == [None] * 4
    assert b.lookup(keys) == 2
    assert b.lookup(keys[:2]) == 2
    assert b.lookup([]) == 0
    assert b.load(keys, [10, 11, 12, 13, 14]) == [True, True, False, True, True]
    for s, d in ((0, 10), (1, 11), (3, 13), (4, 14)):
        assert dst.bytes_of(d) == src.bytes_of(s)


def test_a_missing_layer_group_is_a_miss(pool, unique):
    src, dst = PagedCache(layers_per_group=2), PagedCache(layers_per_group=2)
    keys = hasher_for(unique, src).keys(list(range(8)))
    src.fill(0, 1)
    src.fill(1, 2)
    a, b = connector(pool, src), connector(pool, dst)
    assert a.save(keys, [0, 1]) == [None, None]
    with kvpool.Client(pool.master) as c:
        assert c.remove(keys[1].wire(1), force=True)
    assert b.lookup(keys) == 1
    assert b.load(keys, [5, 6]) == [True, False]
    assert dst.bytes_of(5) == src.bytes_of(0)


def test_a_layout_without_memory_only_looks_up(pool, unique):
    src = PagedCache(layers_per_group=2)
    keys = hasher_for(unique, src).keys(list(range(12)))
    src.fill(0, 7)
    src.fill(1, 8)
    assert connector(pool, src).save(keys[:2], [0, 1]) == [None, None]
    # vLLM's scheduler: no KV cache in the process, only the model's layer count.
    layout = kc.KvLayout.without_memory(4, layers_per_group=2)
    assert (layout.has_memory, layout.num_groups, layout.grouping_tag) == (False, 2, "l2")
    assert layout.regions == [] and layout.num_blocks == 0
    sched = kc.Connector(layout, pool.master, timeout=10)
    assert sched.lookup(keys) == 2
    for call in (sched.save, sched.load, sched.start_load):
        with pytest.raises(kvpool.InvalidArgumentError, match="no memory"):
            call(keys[:1], [0])
    with pytest.raises(kvpool.InvalidArgumentError, match="no memory"):
        sched.save_detached("r", keys[:1], [0])
    with pytest.raises(ValueError, match="no memory"):
        layout.segments(0, 0)


def test_bad_block_ids_are_refused_before_any_transfer(pool, unique):
    src = PagedCache(blocks=8)
    keys = hasher_for(unique, src).keys(list(range(12)))
    c = connector(pool, src)
    with pytest.raises(kvpool.InvalidArgumentError, match="out of range") as e:
        c.save(keys, [0, 1, 8])
    assert (
        e.value.name == "InvalidArgument" and e.value.code == kvpool.errors.CODES["InvalidArgument"]
    )
    with pytest.raises(kvpool.InvalidArgumentError, match="keys but"):
        c.save(keys, [0, 1])
    assert c.lookup(keys) == 0  # nothing was written
    with pytest.raises(kvpool.InvalidArgumentError, match="twice"):
        c.load(keys, [0, 1, 1])
    with pytest.raises(kvpool.InvalidArgumentError, match="twice"):
        c.start_load(keys, [2, 2, 3])
    with pytest.raises(kvpool.InvalidArgumentError, match="out of range"):
        c.save_detached("r", keys, [0, 1, 99])
    with pytest.raises(kvpool.InvalidArgumentError):
        c.load(keys, [0, 1, -1])
    # The native layer refuses the same way, with ValueError.
    with pytest.raises(ValueError, match="out of range"):
        c._native.load(keys, [0, 1, 8])
    # A save may list a block twice (two keys, same bytes): only a load may not.
    src.fill(4, 4)
    assert c.save(keys[:2], [4, 4]) == [None, None]


def test_layerwise_load_publishes_each_group(pool, unique):
    src, dst = PagedCache(layers=6, layers_per_group=2), PagedCache(layers=6, layers_per_group=2)
    keys = hasher_for(unique, src).keys(list(range(4 * 4)))
    for b in range(4):
        src.fill(b, 20 + b)
    a, b = connector(pool, src), connector(pool, dst)
    assert a.save(keys[:3], [0, 1, 2]) == [None] * 3
    load = b.start_load(keys, [8, 9, 10, 11], window=2)
    assert load.num_groups == 3
    for g in range(3):  # in group order, as an engine's forward pass waits
        assert load.wait_group(g) == [True, True, True, False]
        layers = range(2 * g, 2 * g + 2)
        for s, d in ((0, 8), (1, 9), (2, 10)):
            assert dst.bytes_of(d, layers) == src.bytes_of(s, layers)
    assert load.wait() == [True, True, True, False]
    assert load.wait_group(0) == [True, True, True, False]  # again, any order
    assert load.done()
    with pytest.raises(kvpool.InvalidArgumentError):
        load.wait_group(3)
    # Dropping a load that was never waited for cancels it, and waits for it to stop.
    b.start_load(keys, [12, 13, 14, 15])
    # Threads wait for different groups of one load.
    load = b.start_load(keys[:3], [4, 5, 6], window=1)
    got = {}
    ts = [
        threading.Thread(target=lambda g=g: got.__setitem__(g, load.wait_group(g)))
        for g in (2, 0, 1)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert got == {g: [True] * 3 for g in range(3)}


def test_detached_saves_are_reported_per_request(pool, unique):
    src, dst = PagedCache(), PagedCache()
    keys = hasher_for(unique, src).keys(list(range(6 * 4)))
    for b in range(6):
        src.fill(b, 30 + b)
    want = [src.bytes_of(b) for b in range(6)]
    a = connector(pool, src)
    a.save_detached("req-1", keys[:3], [0, 1, 2])
    a.save_detached("req-2", keys[3:], [3, 4, 5])
    for b in range(6):  # the blocks were copied: the engine may reuse them at once
        src.fill(b, 99)
    assert a.wait_saves(timeout=10)
    assert dict(a.finished_saves()) == {"req-1": [None] * 3, "req-2": [None] * 3}
    assert a.finished_saves() == []
    b = connector(pool, dst)
    assert b.load(keys, list(range(6))) == [True] * 6
    assert [dst.bytes_of(i) for i in range(6)] == want


def test_a_detached_save_of_chosen_layer_groups_saves_only_those(pool, unique):
    """Layer-wise saving: `groups=[g]` puts group g's objects only (a lookup, which wants
    every group, still misses); saving the other groups later completes the blocks, which
    then load byte for byte. Bad group lists and a GPU-only event on host memory are
    refused whole."""
    src, dst = PagedCache(layers=4, layers_per_group=2), PagedCache(layers=4, layers_per_group=2)
    keys = hasher_for(unique, src).keys(list(range(3 * 4)))
    for b in range(3):
        src.fill(b, 50 + b)
    want = [src.bytes_of(b) for b in range(3)]
    a = connector(pool, src)
    with pytest.raises(ValueError, match="layer group 2"):
        a.save_detached("r", keys, [0, 1, 2], groups=[2])
    with pytest.raises(ValueError, match="listed twice"):
        a.save_detached("r", keys, [0, 1, 2], groups=[0, 0])
    with pytest.raises(ValueError, match="after_event"):
        a.save_detached("r", keys, [0, 1, 2], groups=[0], after_event=1234)
    a.save_detached("r", keys, [0, 1, 2], groups=[1])
    assert a.wait_saves(timeout=10)
    assert a.finished_saves() == [("r", [None] * 3)], "one report per call, none for refusals"
    with kvpool.Client(pool.master) as c:
        assert c.exists_batch([k.wire(1) for k in keys]) == [True] * 3
        assert c.exists_batch([k.wire(0) for k in keys]) == [False] * 3
    assert a.lookup(keys) == 0
    a.save_detached("r", keys, [0, 1, 2], groups=[0])
    assert a.wait_saves(timeout=10)
    assert a.finished_saves() == [("r", [None] * 3)]
    assert a.lookup(keys) == 3
    b = connector(pool, dst)
    assert b.load(keys, [0, 1, 2]) == [True] * 3
    assert [dst.bytes_of(i) for i in range(3)] == want


def test_failures_per_block_and_whole_call(tmp_path, unique):
    p = start_pool(tmp_path, "--dram", "32MiB")
    p.stop()
    src = PagedCache()
    keys = hasher_for(unique, src).keys(list(range(8)))
    # Native: failures are (code, name, message) tuples, per block.
    n = _native.Connector(src.layout, _native.NativeClient(p.master, deadline=0.5))
    res = n.save(keys, [0, 1])
    assert all(type(r) is tuple and len(r) == 3 for r in res), res
    code, name, msg = res[0]
    assert dict(_native.error_codes())[code] == name and msg
    assert type(n.lookup(keys)) is tuple
    # Python: per-block errors are returned as the typed exceptions, a failed lookup raises.
    c = kc.Connector(src.layout, p.master, timeout=0.5)
    assert all(isinstance(e, kvpool.UnavailableError) for e in c.save(keys, [0, 1]))
    assert all(isinstance(e, kvpool.UnavailableError) for e in c.load(keys, [0, 1]))
    with pytest.raises(kvpool.UnavailableError):
        c.lookup(keys)
    c.save_detached("r", keys, [0, 1])
    assert c.wait_saves(10)
    [(rid, errs)] = c.finished_saves()
    assert rid == "r" and all(isinstance(e, kvpool.UnavailableError) for e in errs)
    with pytest.raises(kvpool.InvalidArgumentError):
        kc.Connector(src.layout, p.master, timeout=0)
    with pytest.raises(kvpool.InvalidArgumentError):
        kc.Connector(src.layout, p.master, replicas=0)


def test_threads_share_a_connector(pool, unique):
    src, dst = PagedCache(blocks=64), PagedCache(blocks=64)
    h = hasher_for(unique, src)
    a, b = connector(pool, src), connector(pool, dst)
    errors = []

    def worker(t: int) -> None:
        try:
            keys = h.keys([t] * 4 * 8)  # one 8-block prompt per thread
            ids = list(range(t * 8, t * 8 + 8))
            for i in ids:
                src.fill(i, 1000 + i)
            assert a.save(keys, ids) == [None] * 8
            assert b.lookup(keys) == 8
            load = b.start_load(keys, ids)
            assert load.wait() == [True] * 8
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
from kvpool import connector as kc

master, model = sys.argv[1], sys.argv[2]
t = [np.arange(2 * 8 * 4 * 2 * 8, dtype=np.float16).reshape(2, 8, 4, 2, 8) + l for l in range(3)]
c = kc.Connector(kc.paged_layout(t), master)
keys = kc.BlockHasher(model, "f16", "vllm-nhd/all", 4).keys(list(range(12)))
print(c.save(keys, [5, 6, 7]), [k.to_param() for k in keys])
"""


def test_another_process_saves_and_this_one_loads(pool, unique):
    out = run_python(SAVER, pool.master, unique)
    assert out.returncode == 0, out.stderr
    dst = PagedCache(layers=3, blocks=8, block_size=4, heads=2, head_dim=8)
    keys = hasher_for(unique, dst).keys(list(range(12)))
    assert out.stdout.strip() == f"[None, None, None] {[k.to_param() for k in keys]}"
    c = connector(pool, dst)
    assert c.lookup(keys) == 3
    assert c.load(keys, [0, 1, 2]) == [True] * 3
    for layer in range(3):
        want = np.arange(2 * 8 * 4 * 2 * 8, dtype=np.float16).reshape(2, 8, 4, 2, 8) + layer
        assert (dst.tensors[layer][:, 0:3] == want[:, 5:8]).all()


# ---------------------------------------------------------------------- GPU memory


class Cuda:
    """Just enough of the CUDA driver API (ctypes, no torch) to own device memory."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.check(self.lib.cuInit(0))
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), 0))
        # The primary context: the one the CUDA runtime (torch) and kvpool's connector use.
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
        self.check(self.lib.cuCtxSetCurrent(ctx))

    @staticmethod
    def check(r: int) -> None:
        assert r == 0, f"CUDA driver error {r}"

    def alloc(self, n: int) -> int:
        p = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(n)))
        return p.value

    def free(self, p: int) -> None:
        self.check(self.lib.cuMemFree_v2(ctypes.c_uint64(p)))

    def upload(self, dst: int, a: np.ndarray) -> None:
        n = ctypes.c_size_t(a.nbytes)
        self.check(
            self.lib.cuMemcpyHtoD_v2(ctypes.c_uint64(dst), ctypes.c_void_p(a.ctypes.data), n)
        )

    def download(self, src: int, a: np.ndarray) -> None:
        n = ctypes.c_size_t(a.nbytes)
        self.check(
            self.lib.cuMemcpyDtoH_v2(ctypes.c_void_p(a.ctypes.data), ctypes.c_uint64(src), n)
        )


def test_a_gpu_layout_without_a_gpu_path_is_refused(pool):
    reason = kc.cuda_unavailable(0)
    if reason is None:
        pytest.skip("this machine has a GPU memory path")
    buf = np.zeros(4096, dtype=np.uint8)  # a host address standing in for a device pointer
    layout = kc.KvLayout.block_first(buf.ctypes.data, 2, 4, 256, device=0)
    assert layout.device == 0
    with pytest.raises(kvpool.InvalidArgumentError, match="cuda|CUDA"):
        kc.Connector(layout, pool.master)


def test_gpu_memory_saves_and_loads_through_the_pool(pool, unique):
    reason = kc.cuda_unavailable(0)
    if reason is not None:
        pytest.skip(f"no GPU memory path here: {reason}")
    cuda = Cuda()
    layers, blocks = 4, 8
    host = PagedCache(layers=layers, blocks=blocks, layers_per_group=2)
    bb = host.block(0, 0, 0).nbytes
    tensor = 2 * blocks * bb  # one FlashAttention tensor per layer
    src = [cuda.alloc(tensor) for _ in range(layers)]
    dst = [cuda.alloc(tensor) for _ in range(layers)]
    try:
        for b in range(blocks):
            host.fill(b, 500 + b)
        for p, t in zip(src, host.tensors):
            cuda.upload(p, t)

        def gpu_layout(ptrs):
            bases = [x for p in ptrs for x in (p, p + blocks * bb)]
            return kc.KvLayout.paged_vllm(bases, bb, blocks, layers_per_group=2, device=0)

        keys = hasher_for(unique, host).keys(list(range(4 * 4)))
        g_src = kc.Connector(gpu_layout(src), pool.master, timeout=10)
        g_dst = kc.Connector(gpu_layout(dst), pool.master, timeout=10)
        assert g_src.save(keys, [1, 3, 5, 7]) == [None] * 4
        # A host cache loads what the GPU saved.
        back = PagedCache(layers=layers, blocks=blocks, layers_per_group=2)
        assert connector(pool, back).load(keys, [0, 1, 2, 3]) == [True] * 4
        for s, d in ((1, 0), (3, 1), (5, 2), (7, 3)):
            assert back.bytes_of(d) == host.bytes_of(s)
        # Another GPU cache loads it, layer-wise, and blocking.
        load = g_dst.start_load(keys[:2], [6, 7])
        for g in range(load.num_groups):
            assert load.wait_group(g) is None
        assert load.wait() == [True, True]
        assert g_dst.load(keys[2:], [0, 2]) == [True, True]
        out = np.zeros_like(host.tensors[0])
        for layer, p in enumerate(dst):
            cuda.download(p, out)
            for kv in range(2):
                for s, d in ((1, 6), (3, 7), (5, 0), (7, 2)):
                    assert (out[kv, d] == host.block(layer, kv, s)).all()
        with pytest.raises(kvpool.InvalidArgumentError, match="twice"):
            g_dst.load(keys[:2], [1, 1])
    finally:
        for p in src + dst:
            cuda.free(p)
