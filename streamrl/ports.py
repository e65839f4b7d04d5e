"""The TCP ports a run binds on this machine: which are taken, and free ones for a second run.

Every run on one machine binds the same default ports (ZeroMQ endpoints 5550-5581, metrics
9100-9500, the feedback page 8080), so a second run there used to fail with "Address already
in use" once its services started. ``streamrl run`` now looks first (:func:`taken_ports`): when
the config leaves every endpoint and metrics port at its default, it picks free loopback ports
for this run and says so (the ports are in ``<run.output_dir>/config.toml``, which ``streamrl
status --config`` reads); ``--free-ports`` does that whatever the config says, for a config on
loopback; otherwise it refuses before starting anything, naming each taken port's config key.
``streamrl check`` names the taken ports and their keys as a note.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from streamrl.common.config import SINGLE_ENDPOINTS, WILDCARD_HOSTS, Config, EndpointsSection, MetricsSection

_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` returned in this process (none is returned twice)."""

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and was not returned before in this process.

    The kernel may hand the same ephemeral port to two ``bind(0)`` calls once the first socket
    is closed, so two services of one run could otherwise get the same port (the second one
    then fails with "Address already in use").

    Raises:
        RuntimeError: no new port after 1,000 tries.
    """
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 that was not handed out already ({len(_HANDED_OUT)} were)")


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1 (metrics ports of replicas: base + i).

    Raises:
        RuntimeError: none found in 1,000 tries.
    """
    for _ in range(1000):
        base = free_port()
        rest = range(base + 1, base + count)
        if base + count <= 65536 and not any(p in _HANDED_OUT or port_taken("127.0.0.1", p) for p in rest):
            _HANDED_OUT.update(rest)
            return base
    raise RuntimeError(f"no {count} consecutive free TCP ports on 127.0.0.1")


@dataclass(frozen=True)
class PortUse:
    """One port a process of the run binds: its config ``key``, the ``host`` it binds and the ``port``."""

    key: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.port} ({self.key})"


def run_ports(cfg: Config, generators: int, scorers: int) -> list[PortUse]:
    """Every TCP port a run of ``cfg`` with ``generators`` and ``scorers`` processes binds here.

    ZeroMQ endpoints (the bind address where ``endpoints.bind`` sets one), metrics ports
    (``0`` = ephemeral: none) and, with the feedback service on, its endpoints and web page.
    """
    e, m, feedback = cfg.endpoints, cfg.metrics, cfg.feedback.enabled
    uses: list[PortUse] = []

    def endpoint(key: str, address: str) -> None:
        transport, _, rest = address.partition("://")
        host, _, port = rest.rpartition(":")
        if transport == "tcp" and port.isdigit():
            uses.append(PortUse(key, host.strip("[]"), int(port)))

    for i in range(scorers):
        bound = e.scorer_bind(i)
        endpoint(
            "endpoints.bind.scorer" if bound else f"endpoints.scorers[{i}]",
            bound if bound else e.scorers[min(i, len(e.scorers) - 1)],
        )
    for name in SINGLE_ENDPOINTS:
        if name in ("feedback", "human_model") and not feedback:
            continue
        endpoint(f"endpoints.bind.{name}" if getattr(e.bind, name) else f"endpoints.{name}", e.bind_address(name))
    if m.enabled:
        for service, count in (
            ("generator", generators),
            ("scorer", scorers),
            ("buffer", 1),
            ("learner", 1),
            ("feedback", int(feedback)),
        ):
            base = getattr(m, f"{service}_port")
            uses += [PortUse(f"metrics.{service}_port", m.host, base + i) for i in range(count) if base]
    if feedback and cfg.feedback.http_port:
        uses.append(PortUse("feedback.http_port", cfg.feedback.http_host, cfg.feedback.http_port))
    return uses


def port_taken(host: str, port: int) -> bool:
    """True when a socket on this machine holds ``host:port`` (``host`` a wildcard: any interface).

    Probed with a bind and ``SO_REUSEADDR``, as libzmq and the metrics server bind, so connections
    of a run that just ended (TIME_WAIT) do not count. A host that is not this machine's is not
    taken (its owner runs elsewhere).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = "" if host in WILDCARD_HOSTS else host
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
    except OSError as err:
        return err.errno == errno.EADDRINUSE
    return False


def taken_ports(uses: list[PortUse]) -> list[PortUse]:
    """The entries of ``uses`` whose port is held on this machine now (:func:`port_taken`)."""
    return [use for use in uses if port_taken(use.host, use.port)]


def ports_at_defaults(cfg: Config) -> bool:
    """True when ``cfg`` sets no endpoint, bind address or metrics (or feedback page) port: every run
    of such configs on one machine asks for the same ports."""
    defaults = EndpointsSection()
    endpoints = cfg.endpoints.model_dump(exclude={"resolve_interval_s"})
    ports = {k: v for k, v in cfg.metrics.model_dump().items() if k.endswith("_port")}
    default_ports = {k: v for k, v in MetricsSection().model_dump().items() if k.endswith("_port")}
    return (
        endpoints == defaults.model_dump(exclude={"resolve_interval_s"})
        and ports == default_ports
        and cfg.feedback.http_port == type(cfg.feedback)().http_port
    )


def free_port_overrides(cfg: Config, generators: int, scorers: int) -> list[str]:
    """``--set`` overrides that move every port of :func:`run_ports` to a free loopback port.

    Raises:
        ValueError: an endpoint or the metrics host is not loopback (a run over several hosts, where
            every host must agree on the ports: set them in the config instead).
    """
    e = cfg.endpoints
    addresses = {f"endpoints.scorers[{i}]": a for i, a in enumerate(e.scorers)}
    addresses |= {f"endpoints.{n}": getattr(e, n) for n in SINGLE_ENDPOINTS}
    addresses |= {f"endpoints.bind.{n}": v for n, v in e.bind.model_dump().items() if v is not None}
    for key, address in addresses.items():
        host = address.partition("://")[2].rpartition(":")[0]
        if key.startswith("endpoints.bind.") or (address.startswith("tcp://") and host not in _LOOPBACK):
            raise ValueError(
                f'{key} = "{address}": free ports are for runs on one machine, on loopback '
                "addresses; fix: set the ports in the config (every host reads the same one)"
            )
    if cfg.metrics.host not in _LOOPBACK:
        raise ValueError(
            f'metrics.host = "{cfg.metrics.host}": free ports are for runs on one machine, where '
            "Prometheus reads the ports from the run's config; fix: set the metrics ports in the config"
        )
    tcp = [f'"tcp://127.0.0.1:{free_port()}"' for _ in range(max(scorers, len(e.scorers)))]
    overrides = [f"endpoints.scorers=[{', '.join(tcp)}]"]
    overrides += [f'endpoints.{name}="tcp://127.0.0.1:{free_port()}"' for name in SINGLE_ENDPOINTS]
    if cfg.metrics.enabled:
        counts = {"generator": generators, "scorer": scorers, "buffer": 1, "learner": 1, "feedback": 1}
        overrides += [f"metrics.{service}_port={free_port_range(max(1, n))}" for service, n in counts.items()]
    if cfg.feedback.enabled and cfg.feedback.http_port:
        overrides.append(f"feedback.http_port={free_port()}")
    return overrides


class PortsTaken(ValueError):
    """A port the config sets is held on this machine, or free ports cannot be given; the message names
    each taken port's key and the fix."""


def claim_ports(cfg: Config, generators: int, scorers: int, *, free_ports: bool = False) -> list[str]:
    """The ``--set`` overrides that give a run free ports ([] when its own are free), as the module
    docstring says: with ``free_ports``, or when every port is at its default and one is taken.
    Prints which default ports were taken and the ports chosen.

    Raises:
        PortsTaken: a port the config sets is taken (without ``free_ports``), or ``free_ports`` on a
            config that is not on loopback.
    """
    taken = taken_ports(run_ports(cfg, generators, scorers))
    if not free_ports and not (taken and ports_at_defaults(cfg)):
        if taken:
            raise PortsTaken(
                f"ports in use on this machine (another run?): {', '.join(map(str, taken))}; fix: set "
                "these keys to free ports, or add --free-ports (every port of this run on a free "
                "loopback port)"
            )
        return []
    try:
        overrides = free_port_overrides(cfg, generators, scorers)
    except ValueError as err:
        raise PortsTaken(f"--free-ports: {err}") from None
    if taken and not free_ports:
        print(
            f"streamrl: the default ports {', '.join(map(str, taken))} are in use (another run on this "
            "machine?): this run uses free ports instead",
            flush=True,
        )
    print(
        f"streamrl: ports of this run: {' '.join(overrides)} (in {cfg.run.output_dir}/config.toml; "
        "`streamrl status --config` that file finds its services)",
        flush=True,
    )
    return overrides
