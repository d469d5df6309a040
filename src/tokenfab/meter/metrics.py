"""Prometheus metrics of the factory floor, labelled by tier and model (one registry per server).

No metric carries a tenant: /metrics is scraped without a key, and who bought what is the ledger's,
behind each tenant's own key (GET /v1/usage, `tokenfab usage`). Over a fleet, the `tokenfab_backend_*`
metrics carry the backend's name (as many label values as the fleet has members): requests and
TTFT as the gateway saw them, and, read at each scrape, whether it is up and its load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class FactoryMetrics:
    def __init__(self, energy_source: str, energy_measured: bool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        lab = ["tier", "model"]
        self.requests = Counter("tokenfab_requests", "Requests finished, by status", [*lab, "status"], registry=r)
        self.tokens = Counter("tokenfab_tokens", "Tokens by kind (prompt, cached, completion)", [*lab, "kind"],
                              registry=r)
        self.ttft = Histogram("tokenfab_ttft_seconds", "Time to first token (server side)", lab,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tokenfab_tpot_seconds", "Time per output token after the first", lab,
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tokenfab_e2e_seconds", "Request latency", lab, buckets=LATENCY_BUCKETS, registry=r)
        self.joules = Counter("tokenfab_energy_joules", "Energy attributed to requests", lab, registry=r)
        self.revenue = Counter("tokenfab_revenue_usd", "Price charged at tier rates", lab, registry=r)
        self.cost = Counter("tokenfab_cost_usd", "Energy x price x PUE + amortised capex", lab, registry=r)
        self.rejections = Counter("tokenfab_rejections", "Requests refused before running", ["tier", "reason"],
                                  registry=r)
        self.in_flight = Gauge("tokenfab_in_flight", "Admitted requests not yet finished", ["tier"], registry=r)
        self.queued = Gauge("tokenfab_queued", "Admitted requests waiting for their first token", ["tier"],
                            registry=r)
        self.backend_requests = Counter("tokenfab_backend_requests", "Requests finished, by the backend that served "
                                        "them", ["backend", "status"], registry=r)
        self.backend_ttft = Histogram("tokenfab_backend_ttft_seconds", "Time to first token, by backend", ["backend"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        src = Gauge("tokenfab_energy_source", "Where joules come from (1 = this source)", ["source", "measured"],
                    registry=r)
        src.labels(energy_source, str(energy_measured).lower()).set(1)

    def watch_fleet(self, members: Callable[[], Iterable[tuple[str, bool, Any]]]) -> None:
        """Read each member's health and load at scrape time: `members()` gives (name, healthy, LoadSnapshot)."""
        self.registry.register(_FleetCollector(members))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FleetCollector:
    def __init__(self, members: Callable[[], Iterable[tuple[str, bool, Any]]]) -> None:
        self.members = members

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily("tokenfab_backend_up", "1 if the backend takes requests (health checks pass)",
                               labels=["backend"])
        flight = GaugeMetricFamily("tokenfab_backend_in_flight", "Requests the gateway has in flight there",
                                   labels=["backend"])
        kv = GaugeMetricFamily("tokenfab_backend_kv_cache_usage", "KV-cache use the backend reports (0..1)",
                               labels=["backend"])
        for name, healthy, load in self.members():
            up.add_metric([name], 1.0 if healthy else 0.0)
            flight.add_metric([name], load.in_flight)
            kv.add_metric([name], load.kv_cache_usage)
        yield from (up, flight, kv)
