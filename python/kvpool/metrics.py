"""The engine side's metrics: what the connectors did with the pool (prefix tokens looked up,
matched, loaded and saved; hand-offs sent, received, aborted and timed out).

Each connector instance (the vLLM connector's scheduler and worker halves, the SGLang backend)
counts into its own :class:`ConnectorMetrics`. The counts leave the process two ways:

- through the engine's own metrics: the vLLM connector hands vLLM its counts since the last
  call (``get_kv_connector_stats``), vLLM sums them over its workers and exports them on its
  ``/metrics`` (``KVPoolPromMetrics`` in :mod:`kvpool.vllm`), under the names below with vLLM's
  engine labels; the SGLang backend feeds SGLang's ``StorageMetrics`` and counts here too;
- through this module's own endpoint, for any engine (:func:`serve`, or the environment
  variable ``KVPOOL_CONNECTOR_METRICS_ADDR=HOST:PORT`` read when a connector starts): the
  totals of every live connector of the process, as Prometheus text on ``/metrics``.

The names are the same both ways, so one dashboard serves both (``deploy/grafana``);
``docs/operations.md`` lists them. Counting is a dictionary update under a lock: no
dependency, nothing on the data path.
"""

from __future__ import annotations

import http.server
import logging
import os
import threading
import weakref
from typing import Callable, Dict, List, Mapping, Optional, Tuple

logger = logging.getLogger("kvpool.metrics")

#: Every counter a connector keeps: name (without the ``kvpool_connector_`` prefix and the
#: ``_total`` suffix) and its help text. Tokens are the engine's (block or page size times
#: the blocks or pages).
COUNTERS: Dict[str, str] = {
    "lookups": "Prefix lookups the engine asked the pool (one per request scheduled).",
    "lookup_errors": "Prefix lookups that failed (the request was computed in full).",
    "prompt_tokens": "Prompt tokens of the requests looked up.",
    "matched_tokens": "Prompt tokens the pool offered to load (beyond the engine's own cache).",
    "loaded_tokens": "Tokens whose KV was loaded from the pool.",
    "load_failed_tokens": "Tokens whose load failed (the engine recomputed them).",
    "saved_tokens": "Tokens whose KV was saved to the pool.",
    "save_failed_tokens": "Tokens whose save failed (the pool does not have them).",
    "handoffs_sent": "P/D hand-offs a producer handed to a consumer (held for it).",
    "handoffs_received": "P/D hand-offs a consumer loaded and reported done.",
    "handoffs_released": "P/D hand-offs a consumer let go unloaded: its own cache had the prefix.",
    "handoff_aborts": "P/D hand-offs a consumer aborted (claim refused, fewer blocks held than "
    "expected, load failed).",
    "handoff_timeouts": "P/D hand-offs that timed out: a producer's hold expired unclaimed, or a "
    "consumer's claim ran out of time.",
}

PREFIX = "kvpool_connector_"

#: A source of counts kept elsewhere (a P/D producer's own counters): a function returning
#: cumulative values by counter name.
Source = Callable[[], Mapping[str, int]]


def metric_name(counter: str) -> str:
    """The exported name of ``counter``: ``kvpool_connector_<counter>_total``."""
    return f"{PREFIX}{counter}_total"


class ConnectorMetrics:
    """One connector's counters: cumulative totals, and the change since the last
    :meth:`take` (what vLLM's per-interval stats want). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._own: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._taken: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._sources: List[Source] = []
        _live.add(self)

    def add(self, counter: str, n: int = 1) -> None:
        """Counts ``n`` more of ``counter`` (a name of :data:`COUNTERS`)."""
        if counter not in COUNTERS:
            raise KeyError(f"no connector counter {counter!r} (one of {sorted(COUNTERS)})")
        if n:
            with self._lock:
                self._own[counter] += n

    def watch(self, source: Source) -> None:
        """Adds counts another part keeps (cumulative, by counter name) to these totals."""
        with self._lock:
            self._sources.append(source)

    def totals(self) -> Dict[str, int]:
        """Every counter's value since the connector started."""
        with self._lock:
            out = dict(self._own)
            sources = list(self._sources)
        for source in sources:
            try:
                counts = source()
            except Exception as e:  # noqa: BLE001 - a scrape must not fail for one source
                logger.debug("kvpool: a metrics source failed: %s", e)
                continue
            for k, v in counts.items():
                out[k] += int(v)
        return out

    def take(self) -> Dict[str, int]:
        """The counters that moved since the last call, by how much (empty when none did)."""
        now = self.totals()
        with self._lock:
            delta = {k: v - self._taken[k] for k, v in now.items() if v != self._taken[k]}
            self._taken = now
        return delta


_live: "weakref.WeakSet[ConnectorMetrics]" = weakref.WeakSet()


def process_totals() -> Dict[str, int]:
    """The totals of every live connector of this process, summed."""
    out = dict.fromkeys(COUNTERS, 0)
    for m in list(_live):
        for k, v in m.totals().items():
            out[k] += v
    return out


def render() -> str:
    """This process's connector counters as Prometheus text (exposition format 0.0.4)."""
    lines: List[str] = []
    for counter, value in process_totals().items():
        name = metric_name(counter)
        lines.append(f"# HELP {name} {COUNTERS[counter]}")
        lines.append(f"# TYPE {name} counter")
        lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # one line per scrape would flood the engine's log


_server: Optional[http.server.ThreadingHTTPServer] = None
_server_lock = threading.Lock()


def _parse_addr(addr: str) -> Tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {addr!r}: expected HOST:PORT (port 0 picks one)")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(addr: str) -> Tuple[str, int]:
    """Serves this process's connector counters on ``http://ADDR/metrics`` from a daemon
    thread; returns the bound (host, port). One endpoint per process: a second call returns
    the first one's address."""
    global _server
    host, port = _parse_addr(addr)
    with _server_lock:
        if _server is None:
            _server = http.server.ThreadingHTTPServer((host, port), _Handler)
            _server.daemon_threads = True
            threading.Thread(
                target=_server.serve_forever, name="kvpool-metrics", daemon=True
            ).start()
            logger.info("kvpool: connector metrics on http://%s:%d/metrics", *_bound())
        return _bound()


def _bound() -> Tuple[str, int]:
    assert _server is not None
    host, port = _server.server_address[:2]
    return str(host), int(port)


def serve_from_env() -> Optional[Tuple[str, int]]:
    """:func:`serve` on ``KVPOOL_CONNECTOR_METRICS_ADDR`` when it is set. An address another
    process of the engine holds already (one per GPU worker) is logged and skipped: the
    engine runs on without the endpoint; a malformed one is refused, naming the variable."""
    addr = os.environ.get("KVPOOL_CONNECTOR_METRICS_ADDR")
    if not addr:
        return None
    try:
        return serve(addr)
    except ValueError as e:
        raise ValueError(f"KVPOOL_CONNECTOR_METRICS_ADDR: {e}") from None
    except OSError as e:
        logger.warning("kvpool: no connector metrics endpoint on %s: %s", addr, e)
        return None


__all__ = [
    "COUNTERS",
    "ConnectorMetrics",
    "metric_name",
    "process_totals",
    "render",
    "serve",
    "serve_from_env",
]
