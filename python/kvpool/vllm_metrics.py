"""The vLLM connector's metrics in vLLM's own terms: ``KVConnectorStats`` (the counts since
the last call, which vLLM gathers from the scheduler and every worker, sums, logs and hands to
its Prometheus metrics) and ``KVConnectorPromMetrics`` (counters on vLLM's ``/metrics``, under
:mod:`kvpool.metrics`' names, with vLLM's engine labels). docs/operations.md lists the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from .metrics import COUNTERS, metric_name


@dataclass
class KVPoolConnectorStats(KVConnectorStats):
    """Counts by :data:`kvpool.metrics.COUNTERS` name; aggregated by adding them up."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data: Dict[str, int] = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + int(v)
        return self

    def reduce(self) -> Dict[str, int | float]:
        """The interval's counts, and the share of looked-up prompt tokens the pool matched
        (the figure an operator asks first)."""
        out: Dict[str, int | float] = {k: v for k, v in sorted(self.data.items()) if v}
        prompt = self.data.get("prompt_tokens", 0)
        if prompt:
            out["matched_token_ratio"] = round(self.data.get("matched_tokens", 0) / prompt, 4)
        return out


class KVPoolPromMetrics(KVConnectorPromMetrics):
    """One vLLM counter per connector counter, per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: Dict[type, type],
        labelnames: List[str],
        per_engine_labelvalues: Dict[int, List[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            c: self._counter_cls(name=metric_name(c), documentation=doc, labelnames=labelnames)
            for c, doc in COUNTERS.items()
        }
        self._by_engine: Dict[int, Dict[str, Any]] = {}

    def observe(self, transfer_stats_data: Optional[Dict[str, Any]], engine_idx: int = 0) -> None:
        if not transfer_stats_data:
            return
        series = self._by_engine.get(engine_idx)
        if series is None:
            values = self.per_engine_labelvalues[engine_idx]
            series = {c: m.labels(*values) for c, m in self._counters.items()}
            self._by_engine[engine_idx] = series
        for k, v in transfer_stats_data.items():
            if k in series and v:
                series[k].inc(int(v))


__all__ = ["KVPoolConnectorStats", "KVPoolPromMetrics"]
