"""A picker's Prometheus metrics about the engines' reports: how many it refused, per kind and reason (and the
failure sharing's counts: ``shared.host.outcomes.PeerOutcomeMetrics``).

A refused report or KV message (unsigned, forged, replayed, started ahead of the picker's clock:
``shared.host.report_auth``) otherwise shows only in a rate-limited log line and on the dead letters. The
counts are the verifier's own (plain integers on the feed's hot path); this collector reads them when scraped,
so the feed pays nothing for the exposition. Served on ``GANTRY_METRICS_PORT`` (0: not served), as the
placement services' metrics are, with the same naming (``gantry_..._total``, a ``service`` label).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.host.outcomes import OutcomeShare, PeerOutcomeMetrics
from shared.host.report_auth import KINDS, REASONS, ReportVerifier

REJECTED = "gantry_engine_reports_rejected"
"""Exposed as ``gantry_engine_reports_rejected_total{service, kind, reason}``: kind ``metrics`` (load reports),
``kv`` (KV-event messages) or ``snapshot`` (prefix-cache snapshots answered on request); reason ``unsigned``,
``forged``, ``replayed`` or ``ahead``."""


class RejectedReports(Collector):
    """The refusals ``verifier`` counted, as one counter family (every kind and reason, zeros included)."""

    def __init__(self, service: str, verifier: ReportVerifier) -> None:
        self.service = service
        self.verifier = verifier

    def collect(self) -> Iterator[Metric]:
        """The counter family, read off the verifier now."""
        family = CounterMetricFamily(
            REJECTED, "Engine load reports, KV-event messages and prefix-cache snapshots the picker refused: unsigned, "
            "not signed by the "
            "instance they claim (forged), not newer than the last taken of it (replayed), or started too far "
            "ahead of its clock", labels=["service", "kind", "reason"])
        for (kind, verdict), count in self.verifier.refused.items():
            family.add_metric([self.service, KINDS[kind], REASONS[verdict]], count)
        yield family


def registry_for(service: str, verifier: ReportVerifier | None, outcomes: OutcomeShare | None = None
                 ) -> CollectorRegistry:
    """A registry of the picker's own (several pickers may live in one test process): the refusals when it
    checks reports, what its replicas tell each other of failing engines (``outcomes``)."""
    registry = CollectorRegistry(auto_describe=True)
    if verifier is not None:
        registry.register(RejectedReports(service, verifier))
    if outcomes is not None:
        registry.register(PeerOutcomeMetrics(service, outcomes))
    return registry
