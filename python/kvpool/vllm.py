"""``kvpool.vllm``: vLLM's KV connector over the pool (docs/vllm.md).

Loaded by vLLM with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"KVPoolConnector",
        "kv_connector_module_path":"kvpool.vllm","kv_role":"kv_both",
        "kv_load_failure_policy":"recompute",
        "kv_connector_extra_config":{"master":"10.0.0.1:50051"}}'

One class, instantiated twice by vLLM: in the scheduler process (role SCHEDULER: looks the
request's blocks up in the pool and tells the workers what to load and save) and in each
model runner (role WORKER: moves the blocks between its paged KV cache and the pool through
:mod:`kvpool.connector`, i.e. the Rust connector).

Two jobs in one connector:

- **Prefix reuse** (every role): every full prompt block an engine computes is saved, keyed
  by docs/connector.md §1's chained token keys (so any engine of the same model, dtype,
  layout and rank shares it, whatever its own block hash); a new request loads the longest
  prefix the pool holds (before the forward, layer group by layer group; or, with
  ``async_load``, in the background while vLLM schedules other requests). With
  ``layers_per_group``, a group's blocks are saved as soon as the forward has written the
  group's last layer (``save_kv_layer``), while later layers compute.
- **The P/D hand-off** (``kv_producer`` / ``kv_consumer``, vLLM's MooncakeConnector
  protocol): a request sent to the prefiller with ``kv_transfer_params =
  {"do_remote_decode": true}`` ends (``max_tokens = 1``) with its prompt's blocks saved and
  *held* (the worker renews their read leases, and vLLM keeps the request's blocks until
  the decoder has loaded them); its output's ``kv_transfer_params`` carry
  ``do_remote_prefill``, the producer's bootstrap address and a transfer id, which the
  decoder claims, loads and reports done. Ports, host and timeouts as vLLM's Mooncake
  connector reads them (``VLLM_MOONCAKE_BOOTSTRAP_PORT``,
  ``VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT``, ``VLLM_HOST_IP``; ``KVPOOL_*`` win).

Failed loads (a pool or producer that is gone, an evicted block) are reported through
``get_block_ids_with_load_errors``, so vLLM recomputes those blocks (with
``kv_load_failure_policy: recompute``; vLLM's default, ``fail``, ends such a request with an
error).

``kv_connector_extra_config`` keys (all optional): ``master`` [``KVPOOL_MASTER``, else
127.0.0.1:50051], ``token``, ``tenant``, ``timeout`` (seconds a pool call may take [30]),
``layers_per_group`` (layers per pool object: ``null`` = a block's layers in one object
[default]; ``n`` = layer-wise loading and saving in groups of ``n``), ``model_id`` (the
namespace's model name [the model vLLM serves]), ``replicas`` [1], ``preferred_nodes`` ([]:
the node ids saves try first), ``load_window`` (layer groups in flight during a load [2]),
``bootstrap_port``, ``bootstrap_host``, ``abort_timeout``, ``consumer_timeout`` (override the environment),
``async_handoff`` (a decoder loads hand-offs in a worker thread while vLLM parks the request
in WAITING_FOR_REMOTE_KVS [false: in the step that schedules it]), ``async_load`` (the same
for prefix loads from the pool [false]).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import connector as kc
from .errors import KvpoolError
from .metrics import ConnectorMetrics, serve_from_env
from .vllm_metrics import KVPoolConnectorStats, KVPoolPromMetrics

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of vLLM's logger: its handler, format and level (VLLM_LOGGING_LEVEL) apply.
logger = logging.getLogger("vllm.kvpool")

#: How long a decoder retries a claim the producer does not know yet: the producer's worker
#: holds the blocks one engine step after its scheduler answered the parameters.
CLAIM_UNKNOWN_RETRY_S = 5.0

_DTYPES = {
    "torch.bfloat16": "bf16",
    "torch.float16": "f16",
    "torch.float32": "f32",
    "torch.float8_e4m3fn": "fp8_e4m3",
    "torch.float8_e5m2": "fp8_e5m2",
    "bfloat16": "bf16",
    "float16": "f16",
    "half": "f16",
    "float32": "f32",
    "float": "f32",
}


# ---------------------------------------------------------------------- metadata


@dataclass
class ReqMeta:
    """One request's work in one step, scheduler → worker."""

    req_id: str
    #: Namespace tag (LoRA, cache salt) of the request's keys; part of the hasher's model.
    ns_tag: str
    #: Token ids of blocks ``chain_from .. chain_from + len // block_size``: the worker extends
    #: the request's key chain with them (each block's tokens are sent once).
    chain_from: int = 0
    chain_tokens: List[int] = field(default_factory=list)
    #: Blocks to load before the forward: ``(first block index, block ids)``.
    load_from: int = 0
    load_ids: List[int] = field(default_factory=list)
    #: P/D: claim ``(transfer_id, bootstrap_addr)`` before the load, done after.
    recv: Optional[Tuple[str, str]] = None
    #: Blocks to save after the forward: ``(first block index, block ids)``.
    save_from: int = 0
    save_ids: List[int] = field(default_factory=list)
    #: The load (a P/D hand-off's) runs in the background; the request waits in vLLM's
    #: WAITING_FOR_REMOTE_KVS until the worker reports it received.
    load_async: bool = False


@dataclass
class KVPoolConnectorMetadata(KVConnectorMetadata):
    reqs: List[ReqMeta] = field(default_factory=list)
    #: P/D producer: ``(req_id, transfer_id, num_blocks)`` to hold once their saves ended.
    sends: List[Tuple[str, str, int]] = field(default_factory=list)
    #: P/D consumer: hand-offs not needed after all (``(transfer_id, bootstrap_addr)``).
    releases: List[Tuple[str, str]] = field(default_factory=list)
    #: Requests preempted this step: their blocks are free for reuse at once.
    preempted: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------- shared settings


def _dtype_name(vllm_config: "VllmConfig") -> str:
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if cache_dtype and cache_dtype != "auto":
        return cache_dtype
    d = str(vllm_config.model_config.dtype)
    return _DTYPES.get(d, d.replace("torch.", ""))


def _layout_name(vllm_config: "VllmConfig") -> str:
    return str(getattr(vllm_config.cache_config, "kv_cache_layout", None) or "LBNHC").lower()


def _producer_counts(producer: "kc.PdProducer"):
    """The producer's own hand-off counters, under the connector's names."""

    last: Dict[str, int] = {}

    def counts() -> Dict[str, int]:
        try:
            st = producer.stats()
        except KvpoolError:  # closed: its counts stay what they were
            return last
        last.update(handoffs_sent=st["handed_off"], handoff_timeouts=st["expired"])
        return last

    return counts


def _bootstrap_host(extra: Dict[str, Any]) -> str:
    return str(
        extra.get("bootstrap_host")
        or os.environ.get("KVPOOL_BOOTSTRAP_HOST")
        or os.environ.get("VLLM_HOST_IP")
        or "127.0.0.1"
    )


def _bootstrap_base(extra: Dict[str, Any]) -> int:
    v = extra.get("bootstrap_port")
    if v is None:
        v = (
            os.environ.get("KVPOOL_BOOTSTRAP_PORT")
            or os.environ.get("VLLM_MOONCAKE_BOOTSTRAP_PORT")
            or 8998
        )
    return int(v)


def _tag(request: "Request") -> Optional[str]:
    """The request's namespace tag, or None when its KV is not keyable by tokens alone
    (multimodal inputs, prompt embeddings)."""
    if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
        return None
    tag = ""
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        tag += f"#lora={getattr(lora, 'lora_name', lora)}"
    salt = getattr(request, "cache_salt", None)
    if salt:
        tag += f"#salt={salt}"
    return tag


class _Settings:
    """What both roles derive from the vLLM config, identically (the namespace must match)."""

    def __init__(self, vllm_config: "VllmConfig", num_layers: int) -> None:
        kt = vllm_config.kv_transfer_config
        self.extra: Dict[str, Any] = dict(getattr(kt, "kv_connector_extra_config", None) or {})
        self.role: str = str(getattr(kt, "kv_role", None) or "kv_both")
        self.engine_id: str = str(getattr(kt, "engine_id", None) or uuid.uuid4())
        self.block_size: int = int(vllm_config.cache_config.block_size)
        self.model: str = str(self.extra.get("model_id") or vllm_config.model_config.model)
        self.dtype = _dtype_name(vllm_config)
        self.layout_name = _layout_name(vllm_config)
        pc = vllm_config.parallel_config
        self.tp_size = int(getattr(pc, "tensor_parallel_size", 1) or 1)
        self.pp_size = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
        self.dp_rank = int(getattr(pc, "data_parallel_rank", 0) or 0)
        lpg = self.extra.get("layers_per_group")
        self.layers_per_group: Optional[int] = None if lpg in (None, "all") else int(lpg)
        self.num_layers = num_layers
        self.grouping_tag = kc.KvLayout.without_memory(
            num_layers, self.layers_per_group
        ).grouping_tag
        self.master: Optional[str] = self.extra.get("master")
        self.timeout: Optional[float] = self.extra.get("timeout")
        self.async_handoff = bool(self.extra.get("async_handoff", False))
        self.async_load = bool(self.extra.get("async_load", False))
        self.produces = self.role in ("kv_producer", "kv_both")
        self.consumes = self.role in ("kv_consumer", "kv_both")

    @property
    def layout_tag(self) -> str:
        return f"vllm-{self.layout_name}/{self.grouping_tag}"

    def namespace(self) -> Dict[str, Any]:
        """The block-key namespace, as `kvpool proxy --prefix-namespace` takes it."""
        return {
            "model": self.model,
            "kv_dtype": self.dtype,
            "layout": self.layout_tag,
            "block_size": self.block_size,
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
        }

    def hasher(self, tag: str, tp_rank: int, pp_rank: int = 0) -> kc.BlockHasher:
        return kc.BlockHasher(
            self.model + tag,
            self.dtype,
            self.layout_tag,
            self.block_size,
            tp_rank=tp_rank,
            tp_size=self.tp_size,
            pp_rank=pp_rank,
            pp_size=self.pp_size,
        )

    def connector(self, layout: kc.KvLayout) -> kc.Connector:
        return kc.Connector(
            layout,
            self.master,
            token=self.extra.get("token"),
            tenant=self.extra.get("tenant"),
            timeout=self.timeout,
            replicas=int(self.extra.get("replicas", 1)),
            preferred_nodes=[int(n) for n in self.extra.get("preferred_nodes", ())],
        )


# ---------------------------------------------------------------------- scheduler side


@dataclass
class _SchedReq:
    request: "Request"
    tag: str
    #: Blocks whose tokens the workers have (their key chain's length).
    chain_sent: int = 0
    #: Blocks known to be in the pool or already scheduled for saving.
    saved_upto: int = 0
    #: A load decided by get_num_new_matched_tokens / update_state_after_alloc.
    load: Optional[Tuple[int, int]] = None
    pending_load: Optional[Tuple[int, int]] = None
    #: P/D consumer: the hand-off's (transfer_id, bootstrap_addr), until loaded or released.
    recv: Optional[Tuple[str, str]] = None
    recv_blocks: int = 0
    recv_consumed: bool = False
    saved_any: bool = False
    #: An asynchronous hand-off load was started: the workers report the request when its
    #: load ended (finished_recving), and again, when it finishes, as done sending.
    had_async: bool = False
    #: Its lookup was counted in the connector's metrics.
    counted: bool = False


class _Scheduler:
    def __init__(self, s: _Settings) -> None:
        self.s = s
        self.conn = s.connector(kc.KvLayout.without_memory(s.num_layers, s.layers_per_group))
        logger.info("kvpool: block-key namespace %s", json.dumps(s.namespace()))
        self.reqs: Dict[str, _SchedReq] = {}
        #: Requests request_finished answered True for, until the workers report them.
        self.holding: Set[str] = set()
        self.sends: List[Tuple[str, str, int]] = []
        self.releases: List[Tuple[str, str]] = []
        #: Asynchronous loads decided since the last step's metadata.
        self.async_reqs: List[ReqMeta] = []
        self._hashers: Dict[str, List[kc.BlockHasher]] = {}
        self.metrics = ConnectorMetrics()

    def hashers(self, tag: str) -> List[kc.BlockHasher]:
        hs = self._hashers.get(tag)
        if hs is None:
            hs = [
                self.s.hasher(tag, t, p)
                for p in range(self.s.pp_size)
                for t in range(self.s.tp_size)
            ]
            self._hashers[tag] = hs
        return hs

    def state(self, request: "Request") -> Optional[_SchedReq]:
        st = self.reqs.get(request.request_id)
        if st is None or st.request is not request:
            tag = _tag(request)
            if tag is None:
                return None
            st = _SchedReq(request=request, tag=tag)
            params = request.kv_transfer_params or {}
            if self.s.consumes and params.get("do_remote_prefill") and params.get("transfer_id"):
                host = params.get("remote_host") or "127.0.0.1"
                port = int(params.get("remote_port") or 0)
                # Each decoder rank claims at the producer rank of its own TP rank; the
                # address carries the producer's base, the worker adds its rank.
                st.recv = (str(params["transfer_id"]), f"{host}:{port}")
                st.recv_blocks = int(params.get("num_blocks") or 0)
            self.reqs[request.request_id] = st
        return st

    def lookup(self, tag: str, tokens: List[int], start: int = 0) -> int:
        """How many leading full blocks of ``tokens`` every rank can get: the first
        ``start`` (vLLM's own cache has them) and those the pool holds right after them."""
        n = len(tokens) // self.s.block_size
        if n <= start:
            return n
        hit = n
        for h in self.hashers(tag):
            keys = h.keys(tokens[: hit * self.s.block_size])
            hit = min(hit, start + self.conn.lookup(keys[start:]))
            if hit == start:
                break
        return hit

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> Tuple[Optional[int], bool]:
        st = self.state(request)
        if st is None:
            return 0, False
        bs = self.s.block_size
        prompt = list(request.prompt_token_ids or ())
        last = len(prompt) - 1  # vLLM computes at least the last prompt token
        if st.recv is not None and not st.recv_consumed:
            hit = min(st.recv_blocks, len(prompt) // bs)
        else:
            try:
                hit = self.lookup(st.tag, prompt, num_computed_tokens // bs)
            except KvpoolError as e:
                logger.warning(
                    "kvpool lookup failed, computing request %s: %s", request.request_id, e
                )
                self.metrics.add("lookup_errors")
                hit = 0
        tokens = min(hit * bs, last)
        ext = max(0, tokens - num_computed_tokens)
        st.pending_load = (
            (num_computed_tokens // bs, -(-(num_computed_tokens + ext) // bs)) if ext else None
        )
        return ext, bool(ext and self._loads_async(st))

    def _loads_async(self, st: _SchedReq) -> bool:
        """Whether the request's load runs in the background while vLLM schedules others
        (the request waits for it in WAITING_FOR_REMOTE_KVS): a hand-off with
        ``async_handoff``, a prefix from the pool with ``async_load``."""
        if st.recv is not None and not st.recv_consumed:
            return self.s.async_handoff
        return self.s.async_load

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        if not st.counted:
            # Counted once per request, when vLLM takes the match: it asks
            # get_num_new_matched_tokens again each step a request waits for blocks, and
            # calls this again when an asynchronous load has landed.
            st.counted = True
            self.metrics.add("lookups")
            self.metrics.add("prompt_tokens", len(request.prompt_token_ids or ()))
            self.metrics.add("matched_tokens", num_external_tokens)
        if num_external_tokens > 0 and st.pending_load is not None:
            # The scheduler may take fewer tokens than offered (block-aligned trims): load
            # the blocks of the tokens it counts as computed.
            lo = st.pending_load[0]
            st.load = (
                lo,
                min(
                    st.pending_load[1],
                    -(-(lo * self.s.block_size + num_external_tokens) // self.s.block_size),
                ),
            )
            if self._loads_async(st):
                # The request is not scheduled while it waits: its load goes out in the next
                # step's metadata on its own, with the blocks allocated for it now.
                ids = list(blocks.get_block_ids()[0])
                rm = ReqMeta(req_id=request.request_id, ns_tag=st.tag, load_async=True)
                self._load_meta(st, rm, ids)
                self.async_reqs.append(rm)
                st.had_async = True
        elif st.recv is not None and not st.recv_consumed:
            # Nothing to load after all (the local cache had it all): the producer may let go.
            self.releases.append(st.recv)
            st.recv_consumed = True
        st.pending_load = None

    def build_connector_meta(self, so: "SchedulerOutput", block_ids_of) -> KVPoolConnectorMetadata:
        meta = KVPoolConnectorMetadata(
            sends=self.sends, releases=self.releases, preempted=list(so.preempted_req_ids or ())
        )
        meta.reqs.extend(self.async_reqs)
        self.sends, self.releases, self.async_reqs = [], [], []
        bs = self.s.block_size
        pre: Dict[str, int] = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        for rid, n in zip(cached.req_ids, cached.num_computed_tokens):
            pre[rid] = n
        for rid, scheduled in so.num_scheduled_tokens.items():
            st = self.reqs.get(rid)
            if st is None:
                continue
            req = st.request
            prompt = req.prompt_token_ids or []
            computed_before = pre.get(rid, req.num_computed_tokens)
            after = computed_before + scheduled
            rm = ReqMeta(req_id=rid, ns_tag=st.tag)
            ids = block_ids_of(rid)
            need = 0
            params = req.kv_transfer_params or {}
            hand_off = self.s.produces and params.get("do_remote_decode")
            if st.load is not None:
                hi = st.load[1]
                self._load_meta(st, rm, ids)
                computed_before = max(computed_before, hi * bs)
            elif st.recv is not None and not st.recv_consumed:
                self.releases.append(st.recv)
                st.recv_consumed = True
            if computed_before < st.saved_upto * bs and not hand_off:
                # Recomputing blocks (a failed load, a preemption): save them again.
                st.saved_upto = computed_before // bs
            # Prefix reuse saves what this engine computes; a hand-off saves every full
            # prompt block (a local prefix hit included), so the decoder finds them all.
            first = (
                0 if hand_off and not st.saved_any else max(st.saved_upto, computed_before // bs)
            )
            full = min(after, len(prompt)) // bs
            if full > first:
                rm.save_from, rm.save_ids = first, list(ids[first:full])
                st.saved_upto = full
                st.saved_any = True
                need = max(need, full)
            self._chain(st, rm, need)
            if rm.load_ids or rm.save_ids or rm.chain_tokens or rm.recv:
                meta.reqs.append(rm)
        return meta

    def _load_meta(self, st: _SchedReq, rm: ReqMeta, ids: List[int]) -> None:
        """Moves the request's decided load into ``rm`` (with its hand-off's claim)."""
        assert st.load is not None
        lo, hi = st.load
        rm.load_from, rm.load_ids = lo, list(ids[lo:hi])
        if st.recv is not None and not st.recv_consumed:
            rm.recv = st.recv
            st.recv_consumed = True
        st.saved_upto = max(st.saved_upto, hi)
        st.load = None
        self._chain(st, rm, hi)

    def _chain(self, st: _SchedReq, rm: ReqMeta, need: int) -> None:
        """Sends the workers the tokens of blocks up to ``need`` they have not seen."""
        if need > st.chain_sent:
            bs = self.s.block_size
            prompt = st.request.prompt_token_ids or []
            if not rm.chain_tokens:
                rm.chain_from = st.chain_sent
            rm.chain_tokens += prompt[st.chain_sent * bs : need * bs]
            st.chain_sent = need

    def request_finished(
        self, request: "Request", block_ids: List[int]
    ) -> Tuple[bool, Optional[Dict[str, Any]]]:
        st = self.reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        if st.recv is not None and not st.recv_consumed:
            self.releases.append(st.recv)
        params = request.kv_transfer_params or {}
        if self.s.produces and params.get("do_remote_decode"):
            from vllm.v1.request import RequestStatus

            if request.status == RequestStatus.FINISHED_LENGTH_CAPPED:
                n = len(request.prompt_token_ids or ()) // self.s.block_size
                n = min(n, st.saved_upto)
                out: Dict[str, Any] = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_engine_id": self.s.engine_id,
                    "remote_host": _bootstrap_host(self.s.extra),
                    "remote_port": _bootstrap_base(self.s.extra) + self.s.dp_rank * self.s.tp_size,
                    "remote_tp_size": self.s.tp_size,
                    "num_blocks": n,
                    "block_size": self.s.block_size,
                }
                if n > 0:
                    tid = f"{self.s.engine_id}-{request.request_id}-{uuid.uuid4().hex[:8]}"
                    out["transfer_id"] = tid
                    self.sends.append((request.request_id, tid, n))
                    self.holding.add(request.request_id)
                    return True, out
                return st.saved_any and self._hold(request.request_id), out
        if st.saved_any or st.had_async:
            return self._hold(request.request_id), None
        return False, None

    def _hold(self, rid: str) -> bool:
        self.holding.add(rid)
        return True

    def update_connector_output(self, out: "KVConnectorOutput") -> None:
        for rid in out.finished_sending or ():
            self.holding.discard(rid)


# ---------------------------------------------------------------------- worker side


class _Worker:
    def __init__(self, s: _Settings, tp_rank: int, pp_rank: int) -> None:
        self.s = s
        self.tp_rank = tp_rank
        self.pp_rank = pp_rank
        self.conn: Optional[kc.Connector] = None
        self.layer_group: Dict[str, int] = {}
        #: The last layer of each layer group, by name: its `save_kv_layer` starts the group's
        #: save (layer-wise saving, with `layers_per_group`).
        self.group_ends: Dict[str, int] = {}
        #: The layer groups this step's blocks were already saved in, by the layer hooks.
        self.saved_groups: Set[int] = set()
        self.hashers: Dict[str, kc.BlockHasher] = {}
        self.chains: Dict[str, List[kc.BlockKey]] = {}
        self.load: Optional[kc.LayerwiseLoad] = None
        self.load_ids: List[int] = []
        self.load_recvs: List[Tuple[Tuple[str, str], List[int]]] = []
        self.load_errors: Set[int] = set()
        self.inflight: Dict[str, int] = {}
        self.had_saves: Set[str] = set()
        self.finished: Set[str] = set()
        self.sends: Dict[str, Tuple[str, int]] = {}
        self.held: Dict[str, str] = {}
        #: A hand-off's keys, kept past the request's end for its hold.
        self._held_keys: Dict[str, List[kc.BlockKey]] = {}
        self.producer: Optional[kc.PdProducer] = None
        self.consumer: Optional[kc.PdConsumer] = None
        self.window = int(s.extra.get("load_window", 2))
        self._event: Any = None
        #: Asynchronous hand-off loads: in flight (request ids), and those that ended, with
        #: their failed block ids, not yet reported.
        self.async_inflight: Set[str] = set()
        self.async_ended: List[Tuple[str, List[int]]] = []
        self.had_async: Set[str] = set()
        self._async_lock = threading.Lock()
        self.metrics = ConnectorMetrics()
        #: Per request, the share of its blocks' layer groups each detached save in flight
        #: covers (in start order), for counting saved tokens.
        self._save_shares: Dict[str, List[float]] = {}

    # -- setup

    def register(self, kv_caches: Dict[str, "torch.Tensor"]) -> None:
        names = list(kv_caches)
        lpg = self.s.layers_per_group
        layout = kc.paged_layout(kv_caches, layers_per_group=lpg)
        self.layer_group = {n: (i // lpg if lpg else 0) for i, n in enumerate(names)}
        if lpg:
            last = {g: n for n, g in self.layer_group.items()}  # names are in layer order
            self.group_ends = {n: g for g, n in last.items()}
        if layout.num_layers != self.s.num_layers:
            logger.warning(
                "kvpool: %d KV cache tensors but %d layers in the scheduler's config",
                layout.num_layers,
                self.s.num_layers,
            )
        self.conn = self.s.connector(layout)
        ex = self.s.extra
        pd_kw = dict(dp_rank=self.s.dp_rank, tp_size=self.s.tp_size, tp_rank=self.tp_rank)
        if self.s.produces:
            try:
                self.producer = kc.PdProducer(
                    self.conn,
                    role=self.s.role,
                    host=ex.get("bootstrap_host"),
                    base_port=(
                        None if ex.get("bootstrap_port") is None else int(ex["bootstrap_port"])
                    ),
                    abort_timeout=(
                        None if ex.get("abort_timeout") is None else float(ex["abort_timeout"])
                    ),
                    **pd_kw,
                )
            except (KvpoolError, OSError) as e:
                if self.s.role == "kv_producer":
                    raise
                logger.warning("kvpool: no P/D bootstrap port (%s); prefix reuse only", e)
            if self.producer is not None:
                self.metrics.watch(_producer_counts(self.producer))
        if self.s.consumes:
            ct = ex.get("consumer_timeout")
            self.consumer = kc.PdConsumer(
                self.conn, consumer_timeout=None if ct is None else float(ct), **pd_kw
            )

    def hasher(self, tag: str) -> kc.BlockHasher:
        h = self.hashers.get(tag)
        if h is None:
            h = self.s.hasher(tag, self.tp_rank, self.pp_rank)
            self.hashers[tag] = h
        return h

    def keys(self, rm: ReqMeta) -> List[kc.BlockKey]:
        chain = self.chains.setdefault(rm.req_id, [])
        if rm.chain_tokens:
            if rm.chain_from != len(chain):
                # A request restarted under the same id: the chain is rebuilt from its start.
                del chain[rm.chain_from :]
            parent = chain[-1] if chain else None
            chain.extend(self.hasher(rm.ns_tag).keys(rm.chain_tokens, parent))
        return chain

    # -- one step

    def start_load(self, meta: KVPoolConnectorMetadata) -> None:
        for tid, addr in meta.releases:
            if self.consumer is not None:
                self.consumer.abort(
                    tid, self._rank_addr(addr), "not needed: the decoder had the prefix"
                )
                self.metrics.add("handoffs_released")
        keys: List[kc.BlockKey] = []
        ids: List[int] = []
        self.load_recvs = []
        for rm in meta.reqs:
            chain = self.keys(rm)
            if not rm.load_ids:
                continue
            k = chain[rm.load_from : rm.load_from + len(rm.load_ids)]
            if rm.load_async:
                self._start_async(rm, k)
                continue
            if rm.recv is not None and not self._claim(rm.recv, len(k)):
                self._count_load(len(rm.load_ids), len(rm.load_ids))
                self.load_errors.update(rm.load_ids)
                continue
            if rm.recv is not None:
                self.load_recvs.append((rm.recv, list(rm.load_ids)))
            keys += k
            ids += rm.load_ids
        if keys:
            assert self.conn is not None
            try:
                self.load = self.conn.start_load(keys, ids, window=self.window)
            except KvpoolError as e:  # refused as a whole: every block is recomputed
                logger.warning("kvpool: load of %d blocks refused: %s", len(ids), e)
                self._count_load(len(ids), len(ids))
                self.load_errors.update(ids)
                for (tid, addr), _ in self.load_recvs:
                    self._abort(tid, self._rank_addr(addr), "load refused")
                self.load_recvs = []
                return
            self.load_ids = ids
            if self.s.layers_per_group is None:
                # One object per block: nothing to overlap with the forward, and the load is
                # complete before it starts, so the attention layers' hooks (skipped inside
                # full CUDA graphs) are not needed for correctness.
                self.load.wait_group(0)

    def _start_async(self, rm: ReqMeta, keys: List[kc.BlockKey]) -> None:
        """A load in the background (a hand-off: claim, load, done or abort; a prefix: the
        load alone); the request is reported received by get_finished, its failed blocks as
        load errors then."""
        rid, ids, recv = rm.req_id, list(rm.load_ids), rm.recv
        assert self.conn is not None
        conn = self.conn
        with self._async_lock:
            self.async_inflight.add(rid)
        self.had_async.add(rid)

        def run() -> None:
            failed = list(ids)
            try:
                if recv is None:
                    results = conn.load(keys, ids)
                    failed = [i for i, r in zip(ids, results) if r is not True]
                elif self._claim(recv, len(keys)):
                    results = conn.load(keys, ids)
                    failed = [i for i, r in zip(ids, results) if r is not True]
                    addr = self._rank_addr(recv[1])
                    if failed:
                        self._abort(recv[0], addr, "load failed")
                    else:
                        self._done(recv[0], addr)
            except Exception as e:  # noqa: BLE001 - reported as failed blocks, never lost
                logger.warning("kvpool: hand-off load of %s failed: %s", rid, e)
            self._count_load(len(ids), len(failed))
            with self._async_lock:
                self.async_inflight.discard(rid)
                self.async_ended.append((rid, failed))

        threading.Thread(target=run, name=f"kvpool-handoff-{rid}", daemon=True).start()

    def _consumer(self) -> kc.PdConsumer:
        assert self.consumer is not None
        return self.consumer

    def _rank_addr(self, addr: str) -> str:
        host, _, port = addr.rpartition(":")
        return f"{host}:{int(port) + self.tp_rank}"

    def _claim(self, recv: Tuple[str, str], blocks: int) -> bool:
        assert self.consumer is not None
        tid, addr = recv[0], self._rank_addr(recv[1])
        end = time.monotonic() + min(CLAIM_UNKNOWN_RETRY_S, self.consumer.timeout)
        while True:
            try:
                held = self.consumer.claim(tid, addr)
                break
            except KvpoolError as e:
                if e.name == "TransferUnknown" and time.monotonic() < end:
                    time.sleep(0.02)
                    continue
                logger.warning("kvpool: hand-off %s from %s failed (%s); recomputing", tid, addr, e)
                timed_out = e.name in ("Timeout", "TransferExpired")
                self.metrics.add("handoff_timeouts" if timed_out else "handoff_aborts")
                return False
        if held < blocks:
            logger.warning(
                "kvpool: producer holds %d blocks of hand-off %s, %d expected", held, tid, blocks
            )
            self._abort(tid, addr, "fewer blocks held than expected")
            return False
        return True

    def _abort(self, tid: str, addr: str, reason: str) -> None:
        self._consumer().abort(tid, addr, reason)
        self.metrics.add("handoff_aborts")

    def _done(self, tid: str, addr: str) -> None:
        try:
            self._consumer().done(tid, addr)
        except KvpoolError as e:  # the blocks are loaded: only the producer's hold is late
            logger.warning("kvpool: done for hand-off %s: %s", tid, e)
        self.metrics.add("handoffs_received")

    def _count_load(self, blocks: int, failed: int) -> None:
        bs = self.s.block_size
        self.metrics.add("loaded_tokens", (blocks - failed) * bs)
        self.metrics.add("load_failed_tokens", failed * bs)

    def wait_layer(self, layer_name: str) -> None:
        if self.load is not None:
            g = self.layer_group.get(layer_name)
            if g is not None:
                self.load.wait_group(g)

    def finish_load(self) -> None:
        load, ids, recvs = self.load, self.load_ids, self.load_recvs
        self.load, self.load_ids, self.load_recvs = None, [], []
        if load is None:
            return
        failed = {i for i, r in zip(ids, load.wait()) if r is not True}
        self._count_load(len(ids), len(failed))
        self.load_errors |= failed
        for (tid, addr), rids in recvs:
            addr = self._rank_addr(addr)
            if failed.intersection(rids):
                self._abort(tid, addr, "load failed")
                continue
            self._done(tid, addr)

    def _after_forward_event(self) -> Optional[int]:
        """For a GPU cache: a CUDA event on the engine's current stream, after the forward's
        writes so far; the connector's copy stream waits for it on the device (no host
        synchronization). The blocks then stay unchanged until the save is reported: vLLM
        holds them (the request is reported by get_finished only after its saves ended)."""
        if self.conn is None or self.conn.layout.device is None:
            return None
        import torch

        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.conn.layout.device))
        self._event = ev  # alive until the next one: the handle must outlive the call
        return int(ev.cuda_event)

    def _save_groups(self, meta: KVPoolConnectorMetadata, groups: Optional[List[int]]) -> None:
        """Starts the detached saves of this step's blocks in layer groups `groups` (all for
        `None`), one per request."""
        reqs = [rm for rm in meta.reqs if rm.save_ids]
        if not reqs:
            return
        assert self.conn is not None
        event = self._after_forward_event()
        share = 1.0 if groups is None else len(groups) / self.conn.num_groups
        for rm in reqs:
            self._save_shares.setdefault(rm.req_id, []).append(share)
            chain = self.chains.get(rm.req_id, [])
            k = chain[rm.save_from : rm.save_from + len(rm.save_ids)]
            self.conn.save_detached(rm.req_id, k, rm.save_ids, groups=groups, after_event=event)
            self.inflight[rm.req_id] = self.inflight.get(rm.req_id, 0) + 1
            self.had_saves.add(rm.req_id)

    def save_layer(self, layer_name: str, meta: KVPoolConnectorMetadata) -> None:
        """Layer-wise saving: once the forward has written the last layer of a group, that
        group's objects are saved while later layers compute."""
        g = self.group_ends.get(layer_name)
        if g is None or g in self.saved_groups:
            return
        self.saved_groups.add(g)
        self._save_groups(meta, [g])

    def save(self, meta: KVPoolConnectorMetadata) -> None:
        """After the forward: the hand-offs' bookkeeping, and the saves of the groups the
        layer hooks did not start (all of them without `layers_per_group`, or when vLLM ran
        the layers without their hooks, as inside full CUDA graphs)."""
        for rid, tid, n in meta.sends:
            self.sends[rid] = (tid, n)
        done, self.saved_groups = self.saved_groups, set()
        if not done:
            self._save_groups(meta, None)
            return
        assert self.conn is not None
        rest = [g for g in range(self.conn.num_groups) if g not in done]
        if rest:
            self._save_groups(meta, rest)

    def get_finished(
        self, finished_req_ids: Set[str]
    ) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        if self.conn is not None:
            for rid, results in self.conn.finished_saves():
                self.inflight[rid] -= 1
                if self.inflight[rid] == 0:
                    del self.inflight[rid]
                bad = [r for r in results if r is not None]
                self._count_save(rid, len(results), len(bad))
                if bad:
                    logger.warning("kvpool: %d blocks of %s not saved: %s", len(bad), rid, bad[0])
        with self._async_lock:
            ended, self.async_ended = self.async_ended, []
            loading = set(self.async_inflight)
        recving: Set[str] = set()
        for rid, failed in ended:
            recving.add(rid)
            self.load_errors.update(failed)
        for rid in finished_req_ids:
            self.chains.pop(rid, None)
            if rid in self.had_saves or rid in self.sends or rid in self.had_async:
                self.finished.add(rid)
        done: Set[str] = set()
        for rid in list(self.finished):
            if self.inflight.get(rid) or rid in loading:
                continue
            send = self.sends.get(rid)
            if send is not None and rid not in self.held:
                tid, n = send
                keys = self._held_keys.pop(rid, None)
                if self.producer is not None and keys:
                    try:
                        self.producer.hold(rid, keys[:n], tid)
                        self.held[rid] = tid
                        continue
                    except KvpoolError as e:  # closed: the decoder will recompute
                        logger.warning("kvpool: cannot hold hand-off %s: %s", tid, e)
            if rid in self.held and self.producer is not None:
                try:
                    if self.producer.outcome(self.held[rid]) is None:
                        continue
                except KvpoolError:  # the producer was closed: the hold is gone
                    pass
            done.add(rid)
            self.finished.discard(rid)
            self.had_saves.discard(rid)
            self.sends.pop(rid, None)
            self.held.pop(rid, None)
            self.had_async.discard(rid)
        return (done or None), (recving or None)

    def _count_save(self, rid: str, blocks: int, failed: int) -> None:
        """Counts one ended detached save's tokens, weighted by the share of layer groups it
        covered (a block is saved once all its groups are). Saves of one request that cover
        different shares may end out of order: the count is then off by the difference
        until the request's last save ends."""
        shares = self._save_shares.get(rid)
        share = shares.pop(0) if shares else 1.0
        if not shares:
            self._save_shares.pop(rid, None)
        bs = self.s.block_size
        self.metrics.add("saved_tokens", round((blocks - failed) * bs * share))
        self.metrics.add("save_failed_tokens", round(failed * bs * share))

    def handle_preemptions(self, meta: KVPoolConnectorMetadata) -> None:
        # A host cache's detached saves copied their blocks out when they started; a GPU
        # cache's read the device while they run, and a preempted request's blocks are
        # reused at once, so its saves must end first.
        if self.conn is None or self.conn.layout.device is None:
            return
        if any(self.inflight.get(rid) for rid in meta.preempted):
            self.conn.wait_saves()

    def take_load_errors(self) -> Set[int]:
        e, self.load_errors = self.load_errors, set()
        return e

    def shutdown(self) -> None:
        if self.conn is not None:
            self.conn.wait_saves(timeout=30)
        if self.producer is not None:
            self.producer.close()


class KVPoolConnector(KVConnectorBase_V1):
    """vLLM's KV connector over a kvpool pool (see the module docs)."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig" = None,
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        num_layers = 0
        if kv_cache_config is not None and kv_cache_config.kv_cache_groups:
            num_layers = sum(len(g.layer_names) for g in kv_cache_config.kv_cache_groups)
        if not num_layers:
            pc = vllm_config.parallel_config
            num_layers = vllm_config.model_config.get_num_layers(pc)
        self._s = _Settings(vllm_config, num_layers)
        self._sched: Optional[_Scheduler] = None
        self._worker: Optional[_Worker] = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = _Scheduler(self._s)
        else:
            tp_rank = pp_rank = 0
            try:
                from vllm.distributed.parallel_state import (
                    get_pp_group,
                    get_tensor_model_parallel_rank,
                )

                tp_rank = get_tensor_model_parallel_rank()
                pp_rank = get_pp_group().rank_in_group
            except Exception:  # not initialised: a single worker (tests, tools)
                tp_rank = int(self._s.extra.get("tp_rank", 0))
            self._worker = _Worker(self._s, tp_rank, pp_rank)
        serve_from_env()

    # ---- worker side

    def register_kv_caches(self, kv_caches: Dict[str, "torch.Tensor"]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any
    ) -> None:
        # With `layers_per_group`, a group's blocks are saved once its last layer is written
        # (the copies are detached); otherwise once the forward is over (wait_for_save).
        assert self._worker is not None
        if self._worker.group_ends and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, KVPoolConnectorMetadata)
            self._worker.save_layer(layer_name, meta)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, KVPoolConnectorMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        w = self._worker
        w.finish_load()
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        # A hand-off's keys are kept past the request's end, for its hold.
        for rid, _tid, _n in meta.sends:
            w._held_keys[rid] = list(w.chains.get(rid, []))
        w.save(meta)

    def get_finished(
        self, finished_req_ids: Set[str]
    ) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        assert self._worker is not None
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> Set[int]:
        assert self._worker is not None
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ---- scheduler side

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> Tuple[Optional[int], bool]:
        assert self._sched is not None
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        assert self._sched is not None
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._sched is not None
        mgr = self._kv_cache_manager

        def block_ids_of(rid: str) -> List[int]:
            return list(mgr.get_block_ids(rid)[0]) if mgr is not None else []

        return self._sched.build_connector_meta(scheduler_output, block_ids_of)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._sched is not None
        self._sched.update_connector_output(connector_output)

    def request_finished(
        self, request: "Request", block_ids: List[int]
    ) -> Tuple[bool, Optional[Dict[str, Any]]]:
        assert self._sched is not None
        return self._sched.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        # Held requests are reported by the workers' get_finished, which only runs while
        # the engine steps.
        return bool(self._sched is not None and self._sched.holding)

    # ---- metrics (docs/operations.md)

    def get_kv_connector_stats(self) -> Optional["KVConnectorStats"]:
        """This half's counts since the last call; vLLM adds the scheduler's and every
        worker's up, logs them and feeds ``build_prom_metrics``' counters."""
        half = self._sched if self._sched is not None else self._worker
        delta = half.metrics.take() if half is not None else {}
        return KVPoolConnectorStats(data=delta) if delta else None

    @classmethod
    def build_kv_connector_stats(
        cls, data: Optional[Dict[str, Any]] = None
    ) -> Optional["KVConnectorStats"]:
        return KVPoolConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: "VllmConfig",
        metric_types: Dict[type, type],
        labelnames: List[str],
        per_engine_labelvalues: Dict[int, List[object]],
    ) -> KVPoolPromMetrics:
        return KVPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> Optional[str]:
        return None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: Dict[str, Any]) -> bool:
        # Layer-wise loading relies on wait_for_layer_load running inside the forward, which
        # full CUDA graphs skip; a whole-block load is waited for in start_load_kv.
        return (extra_config or {}).get("layers_per_group") not in (None, "all")


__all__ = ["KVPoolConnector", "KVPoolConnectorMetadata", "ReqMeta"]
