"""Prometheus metrics for one service process.

Each process owns a :class:`ServiceMetrics` with its own registry (so tests can
run several services in one interpreter) holding the standard process and
platform collectors, an info metric with the process identity, and the
``messages_rejected_total{reason}`` counter every receiver uses. Names follow
``streamrl_<service>_<what>_<unit>``; counters end in ``_total``.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from streamrl.common.messages import RejectReason

log = logging.getLogger(__name__)

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
REWARD_BUCKETS = (-5, -2, -1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1, 2, 5)


class ServiceMetrics:
    """The metrics registry of one service process.

    Args:
        service: ``generator``, ``scorer``, ``buffer`` or ``learner`` (the name prefix).
        instance: unique identity of this process (e.g. ``generator-2``).
    """

    def __init__(self, service: str, instance: str):
        self.service = service
        self.instance = instance
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        info = Info(f"streamrl_{service}", "Identity of this process", registry=self.registry)
        info.info({"service": service, "instance_id": instance})
        self.rejected = self.counter(
            "messages_rejected_total", "Messages rejected by the decoder, by reason", ["reason"]
        )
        for reason in RejectReason:  # export every decoder reason at 0 so dashboards show no rejections, not no data
            self.rejected.labels(reason=reason.value)
        self.port: int | None = None

    def _name(self, name: str) -> str:
        return f"streamrl_{self.service}_{name}"

    def counter(self, name: str, doc: str, labels: list[str] | tuple = ()) -> Counter:
        """A counter ``streamrl_<service>_<name>``; ``name`` must end in ``_total``."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        return Counter(self._name(name), doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: list[str] | tuple = ()) -> Gauge:
        """A gauge ``streamrl_<service>_<name>``."""
        return Gauge(self._name(name), doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, buckets=SECONDS_BUCKETS) -> Histogram:
        """A histogram ``streamrl_<service>_<name>``."""
        return Histogram(self._name(name), doc, buckets=buckets, registry=self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 = ephemeral) in a daemon thread.

        Returns:
            The port actually bound.

        Raises:
            OSError: the port is taken.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = server.server_port
        log.info("%s metrics on http://%s:%d/metrics", self.instance, host, self.port)
        return self.port


class MetricSet:
    """Base of each service's metrics class (``GeneratorMetrics``, ``ScorerMetrics``, ...).

    A subclass names its service in ``SERVICE`` and declares every metric the
    service itself updates in ``__init__``, on the process's
    :class:`ServiceMetrics` (which adds the prefix ``streamrl_<service>_``).
    Metrics of shared components (``messages_rejected_total`` here,
    ``waiting_seconds`` in :mod:`streamrl.common.liveness`, ``auth_*`` in
    :mod:`streamrl.common.security`) are declared by those components.

    Args:
        registry: the process's metrics (``ctx.metrics``).

    Raises:
        ValueError: ``registry`` belongs to another service (every name would carry the wrong prefix).
    """

    SERVICE: ClassVar[str]

    def __init__(self, registry: ServiceMetrics):
        if registry.service != self.SERVICE:
            raise ValueError(f"{type(self).__name__} declares streamrl_{self.SERVICE}_* metrics; "
                             f"it was given the {registry.service!r} registry")
        self.registry = registry
