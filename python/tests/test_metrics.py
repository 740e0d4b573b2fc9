"""The connectors' counters (kvpool.metrics): counting, per-interval deltas, the /metrics
endpoint over real HTTP, and the Grafana dashboard's connector panels against the names the
endpoint really serves."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from kvpool import metrics

from conftest import ROOT


def scrape(host: str, port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def values(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = int(value)
    return out


def test_counts_totals_and_interval_deltas():
    m = metrics.ConnectorMetrics()
    assert m.take() == {}, "nothing moved yet"
    m.add("lookups")
    m.add("prompt_tokens", 64)
    m.add("matched_tokens", 0)  # a zero count is no change
    assert m.take() == {"lookups": 1, "prompt_tokens": 64}
    assert m.take() == {}, "a delta is handed out once"
    m.add("prompt_tokens", 16)
    held = {"handoffs_sent": 3}
    m.watch(lambda: held)  # a part that keeps its own cumulative counts
    assert m.take() == {"prompt_tokens": 16, "handoffs_sent": 3}
    held["handoffs_sent"] = 5
    assert m.take() == {"handoffs_sent": 2}
    t = m.totals()
    assert (t["lookups"], t["prompt_tokens"], t["handoffs_sent"]) == (1, 80, 5)
    assert set(t) == set(metrics.COUNTERS)


def test_an_unknown_counter_is_refused_naming_the_known_ones():
    m = metrics.ConnectorMetrics()
    with pytest.raises(KeyError, match="no connector counter 'lookup'.*lookups"):
        m.add("lookup")


def test_a_failing_source_does_not_break_the_totals():
    m = metrics.ConnectorMetrics()
    m.add("saved_tokens", 32)

    def broken():
        raise RuntimeError("closed")

    m.watch(broken)
    assert m.totals()["saved_tokens"] == 32


def test_the_endpoint_serves_every_live_connectors_totals():
    a, b = metrics.ConnectorMetrics(), metrics.ConnectorMetrics()
    host, port = metrics.serve("127.0.0.1:0")
    assert port > 0
    assert metrics.serve("127.0.0.1:0") == (host, port), "one endpoint per process"
    before = values(scrape(host, port))
    a.add("loaded_tokens", 48)
    b.add("loaded_tokens", 16)
    b.add("handoff_aborts")
    text = scrape(host, port)
    after = values(text)
    assert (
        after["kvpool_connector_loaded_tokens_total"]
        - before["kvpool_connector_loaded_tokens_total"]
        == 64
    )
    assert (
        after["kvpool_connector_handoff_aborts_total"]
        - before["kvpool_connector_handoff_aborts_total"]
        == 1
    )
    for counter, help_text in metrics.COUNTERS.items():
        name = metrics.metric_name(counter)
        assert f"# TYPE {name} counter" in text
        assert f"# HELP {name} {help_text}" in text
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(host, port, "/other")
    assert e.value.code == 404


def test_a_malformed_endpoint_address_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("KVPOOL_CONNECTOR_METRICS_ADDR", "localhost")
    with pytest.raises(ValueError, match="KVPOOL_CONNECTOR_METRICS_ADDR.*'localhost'.*HOST:PORT"):
        metrics.serve_from_env()
    monkeypatch.delenv("KVPOOL_CONNECTOR_METRICS_ADDR")
    assert metrics.serve_from_env() is None


def test_the_dashboards_connector_panels_query_served_names():
    """tests/deploy.rs checks every other dashboard query against the servers; this checks
    the connector's (the Rust test leaves them to this one)."""
    dashboard = json.loads((ROOT / "deploy/grafana/kvpool.json").read_text())
    exprs = re.findall(r'"expr":\s*"([^"]*)"', json.dumps(dashboard))
    queried = {n for e in exprs for n in re.findall(r"kvpool_connector_\w+", e)}
    assert len(queried) >= 8, f"the connector panels query only {sorted(queried)}"
    host, port = metrics.serve("127.0.0.1:0")
    served = set(values(scrape(host, port)))
    assert queried <= served, f"queried but not served: {sorted(queried - served)}"
