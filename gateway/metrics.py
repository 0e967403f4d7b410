"""``GET /metrics`` in Prometheus's text format (docs/metrics.md), built with prometheus-client.

Two collectors, both read at scrape time: :class:`TrafficCollector`, the requests, latency,
bytes, redirects, SSH logins and store errors counted by every process of this server
(gateway/traffic.py), and :class:`DatabaseCollector`, what the database knows whichever
process answers (rentals per phase, the queue per GPU model, pods per backend, credits
charged). Served on the API's port to admins (gateway/routes/metrics.py) and, with
``KGPU_METRICS_ADDRESS``, on a listener of its own without a token (:func:`serve`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from gateway import billing, traffic
from gateway.models import Rental
from gateway.rentals.phases import WITH_POD, Phase

log = logging.getLogger("kgpu.metrics")

# Where a 302 or 307 hands the client a presigned URL of the store.
_REDIRECTING = ("files", "shared", "objects")


class TrafficCollector(Collector):
    def __init__(self, snapshots: traffic.Snapshots, live: traffic.Traffic = traffic.TRAFFIC):
        self._snapshots = snapshots
        self._live = live

    def _totals(self) -> dict:
        total = traffic.empty_totals()
        traffic.add(total, self._live.totals())
        for other in self._snapshots.others():
            traffic.add(total, other)
        return total

    def collect(self) -> Iterator[Metric]:
        total = self._totals()
        requests = CounterMetricFamily(
            "kgpu_http_requests", "HTTP requests answered, by route family and status", labels=["family", "status"]
        )
        redirects = CounterMetricFamily(
            "kgpu_redirects", "302 and 307 answers that hand out a presigned URL of the store", labels=["family", "status"]
        )
        for family, status, n in sorted(total["requests"]):
            requests.add_metric([family, str(status)], n)
            if status in (302, 307) and family in _REDIRECTING:
                redirects.add_metric([family, str(status)], n)
        yield requests
        yield redirects
        latency = HistogramMetricFamily(
            "kgpu_http_request_duration_seconds", "Time from a request's arrival to its answer's end", labels=["family"]
        )
        for family, buckets in sorted(total["latency_buckets"].items()):
            cumulative, running = [], 0
            for bound, n in zip((*traffic.LATENCY_BOUNDS, float("inf")), buckets):
                running += n
                cumulative.append((_le(bound), running))
            latency.add_metric([family], cumulative, total["latency_seconds"].get(family, 0.0))
        yield latency
        for name, key, help_text in (
            ("kgpu_http_request_body_bytes", "received_bytes", "Bytes of request bodies received (streamed uploads)"),
            ("kgpu_http_response_body_bytes", "sent_bytes", "Bytes of response bodies sent (proxied downloads)"),
        ):
            family = CounterMetricFamily(name, help_text, labels=["family"])
            for label, n in sorted(total[key].items()):
                family.add_metric([label], n)
            yield family
        logins = CounterMetricFamily("kgpu_ssh_logins", "SSH logins at the bastion, by outcome", labels=["outcome"])
        for outcome in ("accepted", "refused"):
            logins.add_metric([outcome], total["ssh_logins"].get(outcome, 0))
        yield logins
        yield CounterMetricFamily(
            "kgpu_store_errors", "Object store operations that failed (unreachable, or an error)", value=total["store_errors"]
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class DatabaseCollector(Collector):
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        try:
            with self._sessions() as session:
                phases = dict(session.execute(select(Rental.phase, func.count()).group_by(Rental.phase)).all())
                queued = session.execute(
                    select(Rental.gpu_model, func.count()).where(Rental.phase == Phase.QUEUED).group_by(Rental.gpu_model)
                ).all()
                pods = session.execute(
                    select(Rental.backend, func.count()).where(Rental.phase.in_(WITH_POD)).group_by(Rental.backend)
                ).all()
                credits = billing.charged_in_all(session)
        except SQLAlchemyError:
            log.warning("metrics: the database did not answer", exc_info=True)
            yield GaugeMetricFamily("kgpu_database_up", "Whether the database answered this scrape", value=0)
            return
        yield GaugeMetricFamily("kgpu_database_up", "Whether the database answered this scrape", value=1)
        rentals = GaugeMetricFamily("kgpu_rentals", "Rentals in each phase", labels=["phase"])
        for phase in Phase:
            rentals.add_metric([phase.value], phases.get(phase.value, 0))
        yield rentals
        queue = GaugeMetricFamily("kgpu_queue_length", "Rentals queued for GPUs, by GPU model", labels=["gpu_model"])
        for model, n in sorted(queued):
            queue.add_metric([model], n)
        yield queue
        backends = GaugeMetricFamily("kgpu_pods", "Rentals with a pod (Pending or Running), by backend", labels=["backend"])
        for backend, n in sorted(pods):
            backends.add_metric([backend], n)
        yield backends
        yield CounterMetricFamily("kgpu_credits_charged", "Credits charged for rentals, in all", value=credits)


def registry(sessions: sessionmaker, snapshots: traffic.Snapshots) -> CollectorRegistry:
    """What a scrape answers: this server's traffic and the database's gauges."""
    found = CollectorRegistry(auto_describe=False)
    found.register(TrafficCollector(snapshots))
    found.register(DatabaseCollector(sessions))
    return found


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def serve(address: str, scraped: CollectorRegistry) -> None:
    """The metrics on a listener of their own (KGPU_METRICS_ADDRESS): a thread, no token asked."""
    host, port = parse_address(address)
    start_http_server(port, host, registry=scraped)
    log.info("metrics on http://%s/metrics", address)
