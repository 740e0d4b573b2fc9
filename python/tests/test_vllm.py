"""`kvpool.vllm.KVPoolConnector` driven by vLLM itself: vLLM's own `Scheduler` (built on CPU
from a tiny LlamaForCausalLM config.json written here: no download) with the connector
loaded by name from `kvpool.vllm`, and the worker-side calls, in the model runner's order,
on real torch CPU tensors in FlashAttention's layout (`[2, num_blocks, block_size, heads,
head_dim]` per layer). The "forward" writes each computed token's K and V (a function of the
token and its position), so a load can be checked byte for byte against the engine that
saved the blocks.

Runs in the vLLM virtualenv (scripts/vllm-env.sh) with PYTHONPATH=python; skips, quoting the
reason, where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def _install_error() -> str:
    path = os.environ.get("KVPOOL_VLLM_INSTALL_ERROR")
    if path and Path(path).exists():
        return Path(path).read_text(errors="replace").strip()[-1500:]
    return ""


try:
    import torch
    from vllm import SamplingParams
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ParallelConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager
except Exception as e:  # noqa: BLE001 - any import failure means "no usable vLLM here"
    pytest.skip(
        f"vLLM is not importable here ({type(e).__name__}: {e}). {_install_error()}",
        allow_module_level=True,
    )

import kvpool.vllm as kv_vllm  # noqa: E402
from kvpool import connector as kc  # noqa: E402
from conftest import wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BS = 16
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
HEADS, HEAD_DIM = 2, 16
NUM_BLOCKS = 64

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HEADS * 2 * HEAD_DIM,
    "intermediate_size": 128,
    "num_attention_heads": HEADS * 2,
    "num_key_value_heads": HEADS,
    "head_dim": HEAD_DIM,
    "num_hidden_layers": len(LAYERS),
    "vocab_size": 1000,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float16",
}

init_none_hash(sha256)
BLOCK_HASHER = get_request_block_hasher(BS, sha256)


def write_model(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODEL_CONFIG))
    return str(folder)


def kv_value(token: int, pos: int, layer: int, kv: int, rank: int = 0) -> "torch.Tensor":
    """What the "forward" writes for one token: `[heads, head_dim]` of f16 (TP rank `rank`
    holds other heads: other values)."""
    base = float((token * 31 + pos * 7 + layer * 3 + kv + rank * 500) % 997)
    return (
        (torch.arange(HEADS * HEAD_DIM, dtype=torch.float32) / 64 + base)
        .to(torch.float16)
        .view(HEADS, HEAD_DIM)
    )


class Engine:
    """vLLM's Scheduler with the connector, and one worker's connector over CPU tensors per
    TP rank (`tp` > 1: vLLM's `tensor_parallel_size`, each rank's cache written with values
    of its own)."""

    def __init__(
        self,
        model_dir: str,
        master: str,
        *,
        role: str = "kv_both",
        policy: str = "recompute",
        device: str = "cpu",
        max_batched: int = 1024,
        num_blocks: int = NUM_BLOCKS,
        tp: int = 1,
        **extra,
    ) -> None:
        extra = {"master": master, "timeout": 5, "bootstrap_port": 0, **extra}
        mc = ModelConfig(
            model=model_dir, skip_tokenizer_init=True, max_model_len=1024, dtype="float16"
        )
        sc = SchedulerConfig(
            max_num_seqs=16,
            max_num_batched_tokens=max_batched,
            max_model_len=1024,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        )
        cc = CacheConfig(block_size=BS, enable_prefix_caching=True)
        cc.num_gpu_blocks = num_blocks
        kt = KVTransferConfig(
            kv_connector="KVPoolConnector",
            kv_connector_module_path="kvpool.vllm",
            kv_role=role,
            kv_connector_extra_config=extra,
            kv_load_failure_policy=policy,
        )
        self.config = VllmConfig(
            model_config=mc,
            scheduler_config=sc,
            cache_config=cc,
            kv_transfer_config=kt,
            device_config=DeviceConfig("cpu"),
            parallel_config=ParallelConfig(tensor_parallel_size=tp),
        )
        self.kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[
                KVCacheGroupSpec(
                    LAYERS,
                    FullAttentionSpec(
                        block_size=BS, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float16
                    ),
                )
            ],
        )
        self.scheduler = Scheduler(
            vllm_config=self.config,
            kv_cache_config=self.kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=BS,
            log_stats=True,
        )
        assert type(self.scheduler.connector).__name__ == "KVPoolConnector"
        self.device = device
        #: Per TP rank: its worker connector and its KV cache.
        self.ranks = []
        for rank in range(tp):
            # The worker's connector as vLLM's model runner makes it: through the factory.
            w = KVConnectorFactory.create_connector(
                self.config, KVConnectorRole.WORKER, self.kv_cache_config
            )
            assert isinstance(w, kv_vllm.KVPoolConnector)
            w._worker.tp_rank = rank  # vLLM's TP group is not initialised here
            kv = {
                n: torch.zeros(
                    2, num_blocks, BS, HEADS, HEAD_DIM, dtype=torch.float16, device=device
                )
                for n in LAYERS
            }
            w.register_kv_caches(kv)
            self.ranks.append([w, kv])
        self.pending_sends: Dict[tuple, int] = {}
        self.finished_params: Dict[str, Optional[dict]] = {}
        self.load_errors: List[set] = []
        #: Each request's block ids as of its last scheduled step (they outlive the request).
        self.ids: Dict[str, List[int]] = {}
        #: Called as `(layer, worker, scheduler_output)` after each layer's `save_kv_layer`.
        self.after_layer = None
        #: The connector's stats of each step that had some, as vLLM's scheduler hands them
        #: to its loggers (the workers' summed, then the scheduler's added).
        self.connector_stats: List[dict] = []

    @property
    def connector(self) -> "kv_vllm.KVPoolConnector":
        return self.scheduler.connector

    @property
    def worker(self) -> "kv_vllm.KVPoolConnector":
        return self.ranks[0][0]

    @worker.setter
    def worker(self, w) -> None:
        self.ranks[0][0] = w

    @property
    def kv(self):
        return self.ranks[0][1]

    def add(
        self, rid: str, prompt: List[int], *, max_tokens: int = 1, params: Optional[dict] = None
    ) -> Request:
        sp = SamplingParams(
            max_tokens=max_tokens, extra_args={"kv_transfer_params": params} if params else None
        )
        req = Request(rid, prompt, sp, None, block_hasher=BLOCK_HASHER)
        self.scheduler.add_request(req)
        return req

    def block_ids(self, rid: str) -> List[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(rid)[0])

    def step(self):
        """One engine step: schedule, the worker's connector calls around a "forward" that
        writes the scheduled tokens' KV, and the outputs back to the scheduler."""
        so = self.scheduler.schedule()
        pre = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
        pre.update(
            zip(so.scheduled_cached_reqs.req_ids, so.scheduled_cached_reqs.num_computed_tokens)
        )
        sending, recving, errors = set(), set(), set()
        stats = None
        for rank, (w, kvs) in enumerate(self.ranks):
            # The worker gets a copy, as vLLM's multiprocess executor sends it (pickled).
            meta = pickle.loads(pickle.dumps(so.kv_connector_metadata))
            w.handle_preemptions(meta)
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
            for layer, name in enumerate(LAYERS):
                w.wait_for_layer_load(name)
                for rid, n in so.num_scheduled_tokens.items():
                    req = self.scheduler.requests[rid]
                    ids = self.ids[rid] = self.block_ids(rid)
                    for pos in range(pre[rid], pre[rid] + n):
                        tok = req.all_token_ids[pos]
                        for kv in (0, 1):
                            kvs[name][kv, ids[pos // BS], pos % BS] = kv_value(
                                tok, pos, layer, kv, rank
                            ).to(self.device)
                w.save_kv_layer(name, kvs[name], None)
                if self.after_layer is not None:
                    self.after_layer(layer, w, so)
            w.wait_for_save()
            res = w.get_transfer_results(so.finished_req_ids)
            errors |= w.get_block_ids_with_load_errors()
            # The model runner's, then vLLM's output aggregator's sum over the ranks.
            got_stats = w.get_kv_connector_stats()
            if got_stats is not None:
                stats = got_stats if stats is None else stats.aggregate(got_stats)
            w.clear_connector_metadata()
            # vLLM's output aggregator: a request is done sending once every rank said so.
            for kind, done, got in (
                ("send", res.finished_sending, sending),
                ("recv", res.finished_recving, recving),
            ):
                for rid in done:
                    key = (kind, rid)
                    self.pending_sends[key] = self.pending_sends.get(key, 0) + 1
                    if self.pending_sends[key] == len(self.ranks):
                        del self.pending_sends[key]
                        got.add(rid)
        self.load_errors.append(errors)
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.scheduler.requests[rid]
            done = pre[rid] + so.num_scheduled_tokens[rid] >= req.num_tokens
            sampled.append([7] if done else [])
        out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(
                finished_sending=sending or None,
                finished_recving=recving or None,
                invalid_block_ids=errors,
                kv_connector_stats=stats,
            ),
        )
        eco = self.scheduler.update_from_output(so, out)
        for outs in eco.values():
            if outs.scheduler_stats is not None and outs.scheduler_stats.kv_connector_stats:
                self.connector_stats.append(outs.scheduler_stats.kv_connector_stats)
            for o in outs.outputs:
                if o.finished:
                    self.finished_params[o.request_id] = o.kv_transfer_params
        return so, pre

    def run(self, timeout: float = 30.0, until=None) -> None:
        """Steps until nothing is scheduled or held (or `until()`), as vLLM's engine loop
        does (an idle step waits a little: the detached saves finish meanwhile)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if until is not None and until():
                return
            if until is None and not (
                self.scheduler.has_requests() or self.connector.has_pending_push_work()
            ):
                return
            so, _ = self.step()
            if not so.num_scheduled_tokens:
                time.sleep(0.01)
        raise AssertionError("the engine did not settle")

    def block_bytes(self, block: int, rank: int = 0) -> bytes:
        kvs = self.ranks[rank][1]
        return b"".join(kvs[n][kv, block].cpu().numpy().tobytes() for n in LAYERS for kv in (0, 1))

    def expected_bytes(self, tokens: List[int], b: int) -> bytes:
        out = []
        for layer in range(len(LAYERS)):
            for kv in (0, 1):
                out.append(
                    torch.stack(
                        [kv_value(tokens[p], p, layer, kv) for p in range(b * BS, (b + 1) * BS)]
                    )
                    .numpy()
                    .tobytes()
                )
        return b"".join(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_model(tmp_path_factory.mktemp("model"))


def prompt(seed: int, n: int) -> List[int]:
    return [(seed * 7919 + i * 104729) % 997 + 1 for i in range(n)]


def cuda_skip() -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return kc.cuda_unavailable(0)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(cuda_skip() is not None, reason=f"GPU memory: {cuda_skip()}"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers_per_group", [None, 1])
def test_a_shared_prefix_is_matched_and_loaded_byte_for_byte(
    pool, model_dir, unique, layers_per_group, device
):
    """Engine a computes a prompt and saves its blocks; engine b (its own scheduler, worker
    and KV cache) gets a prompt with the same 4-block prefix: vLLM's scheduler is told 64
    tokens are matched, schedules only the rest, and b's blocks hold a's bytes. With
    `device="cuda"` (skipped without a GPU) the caches are CUDA tensors, moved by address
    through the connector's cuda path."""
    layerwise = layers_per_group is not None
    assert (
        kv_vllm.KVPoolConnector.requires_piecewise_for_cudagraph(
            {"layers_per_group": layers_per_group}
        )
        == layerwise
    ), "layer-wise loading needs the attention layers' hooks"
    prefix = prompt(1, 4 * BS)
    kw = dict(model_id=unique, layers_per_group=layers_per_group, device=device)
    a = Engine(model_dir, pool.master, **kw)
    a.add("r1", prefix + prompt(2, 8))
    so, pre = a.step()
    assert pre["r1"] == 0 and so.num_scheduled_tokens["r1"] == 4 * BS + 8  # nothing in the pool yet
    a.run()
    assert a.finished_params == {"r1": None}
    assert not a.connector.has_pending_push_work()
    # The namespace `kvpool proxy --prefix-namespace` takes (docs/vllm.md).
    assert a.connector._s.namespace() == {
        "model": unique,
        "kv_dtype": "f16",
        "layout": "vllm-lbnhc/" + ("all" if layers_per_group is None else "l1"),
        "block_size": BS,
        "tp_size": 1,
        "pp_size": 1,
    }

    # Another engine (its own scheduler, worker and KV cache) gets the prefix from the pool.
    b = Engine(model_dir, pool.master, **kw)
    b.add("r2", prefix + prompt(3, 8))
    so, pre = b.step()
    assert pre["r2"] == 4 * BS, "the 4 prefix blocks are matched"
    assert so.num_scheduled_tokens["r2"] == 8
    meta = so.kv_connector_metadata
    assert [len(r.load_ids) for r in meta.reqs] == [4]
    ids_a, ids_b = a.ids["r1"], b.ids["r2"]
    for i in range(4):
        # What a computed and saved, and what the forward would have written.
        assert b.block_bytes(ids_b[i]) == a.block_bytes(ids_a[i]) == b.expected_bytes(prefix, i)
    assert b.load_errors[-1] == set()
    b.run()
    assert b.finished_params == {"r2": None}

    # The same engine again: vLLM's own prefix cache has the blocks; the connector adds none.
    b.add("r3", prefix + prompt(4, 8))
    so, pre = b.step()
    assert pre["r3"] == 4 * BS
    assert all(not r.load_ids for r in so.kv_connector_metadata.reqs)
    b.run()


def test_layer_groups_are_saved_as_the_forward_writes_them(pool, model_dir, unique):
    """With `layers_per_group`, a group's blocks are saved from its last layer's
    `save_kv_layer`, while later layers still compute: layer 0's objects reach the pool
    before layer 1 is written and before `wait_for_save`; no group is saved twice; another
    engine loads the blocks byte for byte."""
    from kvpool import Client

    tokens = prompt(31, 3 * BS + 5)
    a = Engine(model_dir, pool.master, model_id=unique, layers_per_group=1)
    a.add("r1", tokens)
    seen = []
    with Client(pool.master) as c:

        def after_layer(layer, w, so):
            rms = [r for r in so.kv_connector_metadata.reqs if r.save_ids]
            if layer != 0 or not rms:
                return
            keys = w._worker.chains["r1"][:3]
            g0 = [k.wire(0) for k in keys]
            g1 = [k.wire(1) for k in keys]
            # Group 1's layer is not written yet: its objects cannot be in the pool.
            assert c.exists_batch(g1) == [False] * 3
            wait_until("group 0 saved before layer 1", lambda: c.exists_batch(g0) == [True] * 3)
            seen.append(w._worker.inflight.get("r1"))

        a.after_layer = after_layer
        a.run()
        assert seen == [1], "one detached save (group 0) was in flight during layer 1"
    b = Engine(model_dir, pool.master, model_id=unique, layers_per_group=1)
    b.add("r2", tokens[: 3 * BS] + [5, 6])
    so, pre = b.step()
    assert pre["r2"] == 3 * BS
    for i in range(3):
        assert b.block_bytes(b.ids["r2"][i]) == b.expected_bytes(tokens, i)
    assert b.load_errors[-1] == set()
    b.run()


def test_chunked_prefills_save_and_load_every_block(pool, model_dir, unique):
    """A prompt computed 32 tokens a step (chunked prefill): each step saves the blocks it
    completed, the workers' key chain continuing from the last step's; another engine, also
    chunked, matches all of them."""
    tokens = prompt(21, 5 * BS + 3)
    a = Engine(model_dir, pool.master, model_id=unique, max_batched=32)
    a.add("r1", tokens)
    saves = []
    while "r1" not in a.finished_params:
        so, _ = a.step()
        saves += [
            (r.save_from, len(r.save_ids)) for r in so.kv_connector_metadata.reqs if r.save_ids
        ]
    assert saves == [(0, 2), (2, 2), (4, 1)]
    a.run()
    b = Engine(model_dir, pool.master, model_id=unique, max_batched=32)
    b.add("r2", tokens[: 5 * BS] + [1, 2])
    so, pre = b.step()
    assert pre["r2"] == 5 * BS
    for i in range(5):
        assert b.block_bytes(b.ids["r2"][i]) == a.block_bytes(a.ids["r1"][i])
    b.run()


def test_preempted_requests_resume_and_finish(pool, model_dir, unique):
    """A cache too small for two growing requests: vLLM preempts one (its blocks are freed at
    once); it resumes through the connector's scheduler side again (here vLLM's own prefix
    cache still has its prompt blocks, so the connector loads nothing) and both finish, with
    no load error and nothing left held."""
    e = Engine(model_dir, pool.master, model_id=unique, num_blocks=10, max_batched=64)
    e.add("r1", prompt(31, 3 * BS + 2), max_tokens=40)
    e.add("r2", prompt(32, 3 * BS + 2), max_tokens=40)
    preempted, resumed = set(), {}
    end = time.monotonic() + 60
    while len(e.finished_params) < 2 and time.monotonic() < end:
        so, pre = e.step()
        preempted |= set(so.preempted_req_ids or ())
        for r in so.scheduled_new_reqs:
            if r.req_id in preempted:
                resumed[r.req_id] = pre[r.req_id]
        for r in so.scheduled_cached_reqs.resumed_req_ids:
            if r in preempted:
                resumed.setdefault(r, pre[r])
    assert set(e.finished_params) == {"r1", "r2"}
    assert preempted, "the cache was meant to be too small"
    assert resumed and all(n >= 3 * BS for n in resumed.values()), resumed
    assert not any(e.load_errors)
    e.run()


def test_tensor_parallel_ranks_save_and_load_their_own_blocks(pool, model_dir, unique):
    """TP = 2: each rank keys its blocks with its own rank (its heads differ), the scheduler
    matches a prefix only as far as every rank holds it, and each rank loads its own bytes."""
    prefix = prompt(41, 3 * BS)
    a = Engine(model_dir, pool.master, model_id=unique, tp=2)
    a.add("r1", prefix + [1, 2])
    a.run()
    b = Engine(model_dir, pool.master, model_id=unique, tp=2)
    b.add("r2", prefix + [3, 4])
    so, pre = b.step()
    assert pre["r2"] == 3 * BS
    for rank in (0, 1):
        for i in range(3):
            assert b.block_bytes(b.ids["r2"][i], rank) == a.block_bytes(a.ids["r1"][i], rank)
    assert b.block_bytes(b.ids["r2"][0], 0) != b.block_bytes(b.ids["r2"][0], 1)
    b.run()
    # A prefix only rank 0 holds is no match: remove rank 1's last block from the pool.
    h1 = b.ranks[1][0]._worker.hasher("")
    key = h1.keys(prefix + [5])[2]
    from kvpool import Client

    with Client(pool.master) as c:
        assert c.remove(key.wire(), force=True)
    c2 = Engine(model_dir, pool.master, model_id=unique, tp=2)
    c2.add("r3", prefix + [5, 6])
    so, pre = c2.step()
    assert pre["r3"] == 2 * BS
    c2.run()


def test_a_prefix_saved_by_another_process_loads_byte_for_byte(pool, model_dir, unique, tmp_path):
    prefix = prompt(5, 3 * BS)
    out = tmp_path / "saved.json"
    code = f"""
import sys, json
sys.path.insert(0, {str(ROOT / 'python')!r}); sys.path.insert(0, {str(ROOT / 'python/tests')!r})
from test_vllm import Engine, BS
e = Engine({model_dir!r}, {pool.master!r}, model_id={unique!r})
e.add("p1", {prefix!r} + [5, 6, 7])
e.run()
json.dump([e.block_bytes(b).hex() for b in e.ids["p1"][:3]], open({str(out)!r}, "w"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads(out.read_text())
    b = Engine(model_dir, pool.master, model_id=unique)
    b.add("q1", prefix + [9, 9, 9, 9])
    so, pre = b.step()
    assert pre["q1"] == 3 * BS
    ids = b.ids["q1"]
    for i in range(3):
        assert b.block_bytes(ids[i]).hex() == saved[i]
    b.run()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_failed_load_is_reported_and_vllm_recomputes(pool, fresh_pool, model_dir, unique, policy):
    """The scheduler's pool has the prefix, the worker's pool is gone: the load fails and the
    blocks are reported. With `kv_load_failure_policy: recompute`, vLLM's scheduler truncates
    the request at its first failed block and recomputes it; with vLLM's default, `fail`, the
    request ends with an error (never with wrong KV)."""
    prefix = prompt(8, 2 * BS)
    a = Engine(model_dir, pool.master, model_id=unique)
    a.add("r1", prefix + [1, 2, 3])
    a.run()
    b = Engine(model_dir, pool.master, model_id=unique, policy=policy)
    # The worker talks to another pool, which then stops.
    b.worker = kv_vllm.KVPoolConnector(
        Engine(model_dir, fresh_pool.master, model_id=unique).config,
        KVConnectorRole.WORKER,
        b.kv_cache_config,
    )
    b.worker.register_kv_caches(b.kv)
    fresh_pool.stop()
    req = b.add("r2", prefix + [4, 5, 6])
    so, pre = b.step()
    assert pre["r2"] == 2 * BS
    ids = b.ids["r2"]
    assert b.load_errors[-1] == set(ids[:2])
    if policy == "fail":
        assert req.status == RequestStatus.FINISHED_ERROR
        return
    assert req.num_computed_tokens == 0, "vLLM truncated the request at its first failed block"
    assert req.status == RequestStatus.RUNNING
    so, pre = b.step()
    assert (
        pre["r2"] == 0 and so.num_scheduled_tokens["r2"] == 2 * BS + 3
    ), "recomputed from the start"
    assert all(not r.load_ids for r in so.kv_connector_metadata.reqs)
    b.run(until=lambda: "r2" in b.finished_params)


# ---------------------------------------------------------------------- the P/D hand-off


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def producer_of(engine: Engine):
    return engine.worker._worker.producer


def prefill(p: Engine, rid: str, tokens: List[int]) -> dict:
    """The proxy's first leg: the prefiller runs the prompt with max_tokens = 1 and
    `do_remote_decode`, and answers the hand-off's kv_transfer_params."""
    p.add(rid, tokens, max_tokens=1, params={"do_remote_decode": True, "do_remote_prefill": False})
    p.run(until=lambda: rid in p.finished_params)
    params = p.finished_params[rid]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    return params


def test_a_pd_pair_in_two_processes_hands_a_request_over(pool, model_dir, unique, tmp_path):
    base = free_port()
    p = Engine(model_dir, pool.master, role="kv_producer", model_id=unique, bootstrap_port=base)
    tokens = prompt(11, 3 * BS + 5)
    params = prefill(p, "p1", tokens)
    assert params["num_blocks"] == 3 and params["remote_port"] == base and params["transfer_id"]
    # vLLM keeps the request's blocks (request_finished answered True) while the pool holds
    # them for the decoder.
    p.run(until=lambda: producer_of(p).stats()["held"] == 1)
    assert p.connector.has_pending_push_work()
    for _ in range(3):
        p.step()
    assert p.connector.has_pending_push_work(), "held until the decoder loads"

    out = tmp_path / "decoder.json"
    code = f"""
import sys, json
sys.path.insert(0, {str(ROOT / 'python')!r}); sys.path.insert(0, {str(ROOT / 'python/tests')!r})
from test_vllm import Engine, BS
d = Engine({model_dir!r}, {pool.master!r}, role="kv_consumer", model_id={unique!r})
d.add("d1", {tokens!r}, max_tokens=3, params=json.loads({json.dumps(params)!r}))
so, pre = d.step()
res = {{"computed": pre["d1"], "scheduled": so.num_scheduled_tokens["d1"], "errors": sorted(d.load_errors[-1]),
       "blocks": [d.block_bytes(b).hex() for b in d.ids["d1"][:3]]}}
d.run(until=lambda: "d1" in d.finished_params)
json.dump(res, open({str(out)!r}, "w"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == []
    assert res["computed"] == 3 * BS and res["scheduled"] == 5, "the decoder loaded the 3 blocks"
    assert res["blocks"] == [p.block_bytes(b).hex() for b in p.ids["p1"][:3]]
    # The decoder said done: the producer's hold ends and vLLM frees the request's blocks.
    p.run(timeout=10)
    assert not p.connector.has_pending_push_work()
    assert producer_of(p).stats()["released"] == 1


def test_an_unclaimed_handoff_is_released_after_the_abort_timeout(
    pool, model_dir, unique, monkeypatch
):
    base = free_port()
    monkeypatch.setenv("VLLM_MOONCAKE_BOOTSTRAP_PORT", str(base))
    monkeypatch.setenv("VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT", "1")
    p = Engine(model_dir, pool.master, role="kv_producer", model_id=unique, bootstrap_port=None)
    params = prefill(p, "p1", prompt(12, 2 * BS + 1))
    assert params["remote_port"] == base
    assert producer_of(p).port == base and producer_of(p).abort_timeout == 1.0
    t = time.monotonic()
    p.run(timeout=15)  # no decoder ever claims it
    assert time.monotonic() - t >= 0.9
    assert producer_of(p).stats()["expired"] == 1
    assert not p.connector.has_pending_push_work()
    t = p.worker._worker.metrics.totals()
    assert (t["handoffs_sent"], t["handoff_timeouts"]) == (1, 1)


def test_a_decoder_whose_producer_died_reports_load_errors_and_recomputes(pool, model_dir, unique):
    p = Engine(
        model_dir, pool.master, role="kv_producer", model_id=unique, bootstrap_port=free_port()
    )
    tokens = prompt(13, 2 * BS + 3)
    params = prefill(p, "p1", tokens)
    p.run(until=lambda: producer_of(p).stats()["held"] == 1)
    producer_of(p).close()  # the prefiller is gone (its bootstrap port refuses)
    d = Engine(model_dir, pool.master, role="kv_consumer", model_id=unique)
    req = d.add("d1", tokens, max_tokens=2, params=params)
    t = time.monotonic()
    so, pre = d.step()
    assert time.monotonic() - t < 5
    assert pre["d1"] == 2 * BS
    assert d.load_errors[-1] == set(d.ids["d1"][:2])
    assert req.num_computed_tokens == 0 and req.status == RequestStatus.RUNNING
    so, pre = d.step()
    assert so.num_scheduled_tokens["d1"] == len(tokens), "recomputed"
    d.run(until=lambda: "d1" in d.finished_params)
    # The prefiller's engine goes on: the request whose hand-off died is freed.
    p.run(timeout=10)
    assert not p.connector.has_pending_push_work()


def test_a_decoder_that_needs_no_handoff_releases_it_at_once(pool, model_dir, unique):
    """The decoder's own prefix cache already holds the prompt's blocks: it loads nothing and
    tells the producer, whose hold ends then, not at the abort timeout."""
    p = Engine(
        model_dir, pool.master, role="kv_producer", model_id=unique, bootstrap_port=free_port()
    )
    tokens = prompt(14, 2 * BS + 3)
    params = prefill(p, "p1", tokens)
    p.run(until=lambda: producer_of(p).stats()["held"] == 1)
    d = Engine(model_dir, pool.master, role="kv_consumer", model_id=unique + "-other-namespace")
    d.add("warm", tokens, max_tokens=1)
    d.run()
    d.add("d1", tokens, max_tokens=1, params=params)
    so, pre = d.step()
    assert pre["d1"] == 2 * BS and all(not r.load_ids for r in so.kv_connector_metadata.reqs)
    assert so.kv_connector_metadata.releases
    p.run(timeout=10)
    assert producer_of(p).stats()["aborted"] == 1
    assert not p.connector.has_pending_push_work()
    d.run(until=lambda: "d1" in d.finished_params)
    t = d.worker._worker.metrics.totals()
    assert (t["handoffs_released"], t["handoffs_received"], t["handoff_aborts"]) == (1, 0, 0)


def first_scheduled(e: Engine, rid: str, timeout: float = 20.0):
    """Steps until `rid` is scheduled; its (scheduler output, tokens computed before)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        so, pre = e.step()
        if rid in so.num_scheduled_tokens:
            return so, pre[rid]
        time.sleep(0.01)
    raise AssertionError(f"{rid} was never scheduled")


def test_an_async_handoff_waits_for_remote_kvs_then_decodes(pool, model_dir, unique):
    """`async_handoff: true`: the decoder's scheduler parks the request in vLLM's
    WAITING_FOR_REMOTE_KVS while a worker thread claims and loads it; the worker reports it
    received (get_finished's second set) and vLLM then schedules only the tail."""
    p = Engine(
        model_dir, pool.master, role="kv_producer", model_id=unique, bootstrap_port=free_port()
    )
    tokens = prompt(15, 3 * BS + 5)
    params = prefill(p, "p1", tokens)
    p.run(until=lambda: producer_of(p).stats()["held"] == 1)
    d = Engine(model_dir, pool.master, role="kv_consumer", model_id=unique, async_handoff=True)
    req = d.add("d1", tokens, max_tokens=2, params=params)
    so, pre = d.step()
    assert "d1" not in so.num_scheduled_tokens
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert [(r.load_async, len(r.load_ids)) for r in so.kv_connector_metadata.reqs] == [(True, 3)]
    so, computed = first_scheduled(d, "d1")
    assert computed == 3 * BS and so.num_scheduled_tokens["d1"] == 5
    assert not any(d.load_errors)
    for i in range(3):
        assert d.block_bytes(d.ids["d1"][i]) == p.block_bytes(p.ids["p1"][i])
    d.run(until=lambda: "d1" in d.finished_params)
    d.run()
    p.run(timeout=10)
    assert producer_of(p).stats()["released"] == 1
    t = d.worker._worker.metrics.totals()
    assert (t["handoffs_received"], t["loaded_tokens"], t["load_failed_tokens"]) == (1, 3 * BS, 0)
    assert p.worker._worker.metrics.totals()["handoffs_sent"] == 1


def test_an_async_prefix_load_parks_the_request_then_schedules_the_tail(pool, model_dir, unique):
    """`async_load: true`: a prefix found in the pool is loaded by a worker thread while vLLM
    parks the request in WAITING_FOR_REMOTE_KVS (other requests keep being scheduled); the
    worker reports it received and vLLM schedules only the tail, the blocks holding the
    saved bytes. A prefix removed from the pool between the lookup and the load comes back
    as load errors and vLLM recomputes it."""
    from kvpool import Client

    tokens = prompt(41, 3 * BS + 4)
    a = Engine(model_dir, pool.master, model_id=unique)
    a.add("r1", tokens)
    a.run()
    b = Engine(model_dir, pool.master, model_id=unique, async_load=True)
    req = b.add("r2", tokens[: 3 * BS] + [9, 9])
    other = b.add("o1", prompt(42, 5))
    so, pre = b.step()
    assert "r2" not in so.num_scheduled_tokens and "o1" in so.num_scheduled_tokens
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert [
        (r.load_async, len(r.load_ids)) for r in so.kv_connector_metadata.reqs if r.load_ids
    ] == [(True, 3)]
    so, computed = first_scheduled(b, "r2")
    assert computed == 3 * BS and so.num_scheduled_tokens["r2"] == 2
    assert not any(b.load_errors)
    for i in range(3):
        assert b.block_bytes(b.ids["r2"][i]) == a.block_bytes(a.ids["r1"][i])
    b.run()
    assert other.is_finished()

    # The prefix leaves the pool after the scheduler's lookup: the load fails, vLLM recomputes.
    c = Engine(model_dir, pool.master, model_id=unique, async_load=True)
    req = c.add("r3", tokens[: 3 * BS] + [8, 8])
    orig = c.connector._sched.get_num_new_matched_tokens

    def lookup_then_remove(request, computed):
        out = orig(request, computed)
        with Client(pool.master) as cl:
            sched = c.connector._sched
            keys = sched.hashers(sched.reqs["r3"].tag)[0].keys(tokens[: 3 * BS])
            assert cl.remove_batch([k.wire() for k in keys], force=True) == [True] * 3
        return out

    c.connector._sched.get_num_new_matched_tokens = lookup_then_remove
    so, pre = c.step()
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    c.connector._sched.get_num_new_matched_tokens = orig
    so, computed = first_scheduled(c, "r3")
    assert computed == 0 and so.num_scheduled_tokens["r3"] == 3 * BS + 2, "recomputed"
    assert set().union(*c.load_errors) == set(c.ids["r3"][:3])
    c.run()


def test_an_async_handoff_from_a_dead_producer_reports_load_errors(pool, model_dir, unique):
    """The claim fails in the worker's thread: the request is reported received with its
    blocks as load errors, and vLLM reschedules it from the start."""
    p = Engine(
        model_dir, pool.master, role="kv_producer", model_id=unique, bootstrap_port=free_port()
    )
    tokens = prompt(16, 2 * BS + 3)
    params = prefill(p, "p1", tokens)
    p.run(until=lambda: producer_of(p).stats()["held"] == 1)
    producer_of(p).close()
    # The decoder keys another namespace, so its retry finds nothing in the pool and computes
    # the prompt (with the producer's, the retry would load the saved blocks as a prefix hit).
    d = Engine(
        model_dir, pool.master, role="kv_consumer", model_id=unique + "-d", async_handoff=True
    )
    req = d.add("d1", tokens, max_tokens=2, params=params)
    so, _ = d.step()
    ids = so.kv_connector_metadata.reqs[0].load_ids
    assert len(ids) == 2 and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    so, computed = first_scheduled(d, "d1")
    assert set(ids) <= set().union(*d.load_errors), "the failed blocks were reported"
    assert computed == 0 and so.num_scheduled_tokens["d1"] == len(tokens), "recomputed"
    d.run(until=lambda: "d1" in d.finished_params)
    d.run()


def test_kv_both_engines_play_either_side_of_a_handoff(pool, model_dir, unique):
    """`kv_both` on both sides: the engine that gets `do_remote_decode` produces, the one that
    gets `do_remote_prefill` consumes; afterwards the hand-off's blocks are an ordinary shared
    prefix for a third request."""
    p = Engine(model_dir, pool.master, role="kv_both", model_id=unique, bootstrap_port=free_port())
    tokens = prompt(17, 2 * BS + 4)
    params = prefill(p, "p1", tokens)
    p.run(until=lambda: producer_of(p).stats()["held"] == 1)
    d = Engine(model_dir, pool.master, role="kv_both", model_id=unique)
    d.add("d1", tokens, max_tokens=2, params=params)
    so, pre = d.step()
    assert pre["d1"] == 2 * BS and not d.load_errors[-1]
    d.run(until=lambda: "d1" in d.finished_params)
    p.run(timeout=10)
    assert producer_of(p).stats()["released"] == 1
    e = Engine(model_dir, pool.master, role="kv_both", model_id=unique)
    e.add("e1", tokens[: 2 * BS] + [9, 9])
    so, pre = e.step()
    assert pre["e1"] == 2 * BS
    e.run()


def test_the_pool_serves_the_tail_of_a_prefix_whose_head_vllm_has(pool, model_dir, unique):
    """The pool lost a prefix's first block, but the engine's own prefix cache has it: the
    lookup starts after vLLM's local hit, so the remaining 3 blocks still come from the pool."""
    from kvpool import Client

    prefix = prompt(18, 4 * BS)
    a = Engine(model_dir, pool.master, model_id=unique)
    a.add("r1", prefix + [1, 2])
    a.run()
    first = a.worker._worker.hasher("").keys(prefix[:BS])[0]
    b = Engine(model_dir, pool.master, model_id=unique)
    b.add("warm", prefix[:BS] + [3])  # b computes block 0 itself (and saves it)
    b.run()
    with Client(pool.master) as c:  # the pool loses block 0
        assert c.remove(first.wire(), force=True)
    b.add("r2", prefix + [4, 5])
    so, pre = b.step()
    assert pre["r2"] == 4 * BS
    assert [(r.load_from, len(r.load_ids)) for r in so.kv_connector_metadata.reqs] == [(1, 3)]
    for i in range(1, 4):
        assert b.block_bytes(b.ids["r2"][i]) == a.block_bytes(a.ids["r1"][i])
    b.run()


def test_the_connectors_counts_reach_vllms_log_and_prometheus(pool, model_dir, unique):
    """What the connector did reaches vLLM's loggers as vLLM gathers it: each worker's counts
    since the last step (tokens saved and loaded) in the model runner's output, summed over
    the ranks, plus the scheduler's (lookups, prompt and matched tokens) in the scheduler's
    stats; then through vLLM's own KVConnectorLogging (the log line) and KVConnectorProm
    (counters in prometheus_client's registry, which vLLM serves on /metrics)."""
    from prometheus_client import REGISTRY
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorLogging,
        KVConnectorProm,
    )

    def summed(e: Engine) -> dict:
        out: dict = {}
        for d in e.connector_stats:
            for k, v in d.items():
                out[k] = out.get(k, 0) + v
        return out

    prefix = prompt(31, 4 * BS)
    a = Engine(model_dir, pool.master, model_id=unique, tp=2)
    a.add("r1", prefix + prompt(32, 8))
    a.run()
    # Two ranks, each saving its 4 full blocks; nothing matched.
    assert summed(a) == {"lookups": 1, "prompt_tokens": 4 * BS + 8, "saved_tokens": 2 * 4 * BS}

    b = Engine(model_dir, pool.master, model_id=unique, tp=2)
    b.add("r2", prefix + prompt(33, 8))
    b.run()
    total = summed(b)
    assert total == {
        "lookups": 1,
        "prompt_tokens": 4 * BS + 8,
        "matched_tokens": 4 * BS,
        "loaded_tokens": 2 * 4 * BS,
    }, "loaded by both ranks, nothing new to save"

    # vLLM's logger rebuilds each step's stats through the connector class, as its engine
    # core's logger does.
    log = KVConnectorLogging(b.config.kv_transfer_config)
    for d in b.connector_stats:
        log.observe(d)
    lines: List[str] = []
    log.log(lambda fmt, *args: lines.append(fmt % args))
    assert len(lines) == 1 and f"loaded_tokens={2 * 4 * BS}" in lines[0], lines
    assert f"matched_token_ratio={round(4 * BS / (4 * BS + 8), 4)}" in lines[0], lines

    labels = {"model_name": unique, "engine": "0"}
    prom = KVConnectorProm(b.config, list(labels), {0: list(labels.values())})
    for d in b.connector_stats:
        prom.observe(d, 0)
    for counter, want in total.items():
        got = REGISTRY.get_sample_value(f"kvpool_connector_{counter}_total", labels)
        assert got == want, (counter, got, want)
