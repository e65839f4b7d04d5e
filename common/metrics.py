"""Prometheus metrics for one service process.

Each process owns a :class:`ServiceMetrics` with its own registry (so tests can
run several services in one interpreter) holding the standard process and
platform collectors, an info metric with the process identity, and the
``messages_rejected_total{reason}`` counter every receiver uses. Names follow
``streamrl_<service>_<what>_<unit>``; counters end in ``_total``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar, overload

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


M = TypeVar("M", Counter, Gauge, Histogram)


class Declared(Generic[M]):
    """One metric declared as a class attribute of a :class:`MetricSet` (made by
    :func:`counter`, :func:`gauge` or :func:`histogram`); on an instance the attribute
    is the metric itself, created on the instance's registry."""

    def __init__(self, kind: str, name: str, doc: str, **options):
        self.kind, self.name, self.doc, self.options = kind, name, doc, options
        self.attribute = ""

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Declared[M]: ...

    @overload
    def __get__(self, instance: MetricSet, owner: type | None = None) -> M: ...

    def __get__(self, instance, owner=None):
        return self if instance is None else instance.built[self.attribute]

    def build(self, registry: ServiceMetrics) -> M:
        """The metric, created on ``registry`` (prefix ``streamrl_<service>_``)."""
        return getattr(registry, self.kind)(self.name, self.doc, **self.options)


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Declared[Counter]:
    """Declare the counter ``streamrl_<service>_<name>`` (``name`` ends in ``_total``) on a :class:`MetricSet`."""
    return Declared("counter", name, doc, labels=tuple(labels))


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Declared[Gauge]:
    """Declare the gauge ``streamrl_<service>_<name>`` on a :class:`MetricSet`."""
    return Declared("gauge", name, doc, labels=tuple(labels))


def histogram(name: str, doc: str, buckets: Sequence[float] = SECONDS_BUCKETS) -> Declared[Histogram]:
    """Declare the histogram ``streamrl_<service>_<name>`` on a :class:`MetricSet`."""
    return Declared("histogram", name, doc, buckets=tuple(buckets))


class MetricSet:
    """Base of each service's metrics class (``GeneratorMetrics``, ``ScorerMetrics``, ...).

    A subclass names its service in ``SERVICE`` and declares every metric the
    service itself updates as a class attribute::

        class ScorerMetrics(MetricSet):
            SERVICE = "scorer"
            scored = counter("rollouts_scored_total", "Rollouts scored and sent to the buffer")

    Building the set creates each declared metric on the process's
    :class:`ServiceMetrics` (which adds the prefix ``streamrl_<service>_``);
    ``metrics.scored`` is then the Prometheus counter. Metrics of shared
    components (``messages_rejected_total`` here, ``waiting_seconds`` in
    :mod:`streamrl.common.liveness`, ``auth_*`` in :mod:`streamrl.common.security`)
    are declared by those components.

    Args:
        registry: the process's metrics (``ctx.metrics``).

    Raises:
        ValueError: ``registry`` belongs to another service (every name would carry the wrong
            prefix), or a name is declared twice (prometheus_client refuses it).
    """

    SERVICE: ClassVar[str]

    def __init__(self, registry: ServiceMetrics):
        if registry.service != self.SERVICE:
            raise ValueError(
                f"{type(self).__name__} declares streamrl_{self.SERVICE}_* metrics; "
                f"it was given the {registry.service!r} registry"
            )
        self.registry = registry
        self.built: dict[str, Counter | Gauge | Histogram] = {
            declared.attribute: declared.build(registry) for declared in self.declared()
        }

    @classmethod
    def declared(cls) -> list[Declared]:
        """The metrics declared on this class and its bases, in declaration order."""
        found: dict[str, Declared] = {}
        for klass in reversed(cls.__mro__):
            found.update({k: v for k, v in vars(klass).items() if isinstance(v, Declared)})
        return list(found.values())
