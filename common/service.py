"""What every service process does at start: arguments, config, logging, identity, metrics, signals;
and the skeleton of its loop.

Each ``python -m streamrl.services.<name>`` calls :func:`run_service`, which calls
:func:`start_service` and then runs its loop (a :class:`ServiceLoop`) until ``ctx.stop`` is set
(SIGTERM / SIGINT set it).
"""

from __future__ import annotations

import abc
import argparse
import logging
import os
import signal
import socket
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import zmq
from zmq import Socket as ZmqSocket  # in ServiceContext, `zmq` is the context field

from streamrl.common.config import Config, ConfigError, add_config_arguments, load_config
from streamrl.common.errors import StartupRefused
from streamrl.common.ledger import Ledger, ledger_path
from streamrl.common.messages import Message
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.placement import place_process
from streamrl.common.runlock import RunFolderLocked, RunLock
from streamrl.common.security import Security, SecurityError, open_security
from streamrl.common.transport import Inbox, make_socket, poll_unless_stopped

M = TypeVar("M", bound=Message)

log = logging.getLogger(__name__)

CONFIG_ENV = "STREAMRL_CONFIG"
"""Config path used when ``--config`` is not given (set by ``streamrl run`` for honcho)."""
OVERRIDES_ENV = "STREAMRL_SET"
"""Newline-separated ``key=value`` overrides applied before ``--set`` ones."""
REPLICA_ENV = "STREAMRL_REPLICA"
"""A replica's unique name (pod name, ``generator-<host>-<n>``); see :func:`replica_identity`."""


@dataclass
class ServiceContext:
    """Everything a service loop needs from its process.

    Attributes:
        config: the validated run config.
        service: ``generator``, ``scorer``, ``buffer`` or ``learner``.
        index: replica number, distinct per replica (seeds derive from it; see :class:`Replica`).
        instance: identity used in logs, messages and metrics, e.g. ``generator-1`` or a pod name.
        metrics: this process's metrics registry (already served over HTTP if enabled).
        zmq: the process's ZeroMQ context.
        stop: set on SIGTERM/SIGINT; loops check it at least every second.
        security: CURVE keys and ZAP of this process (``security=ctx.security`` in
            ``make_socket``); None when ``security.keys_dir`` is unset.
        local_index: position among the service's replicas on this host (metrics port offset,
            scorer endpoint; see :class:`Replica`).
        ledger: this replica's measured counts (:mod:`streamrl.common.ledger`), kept in
            ``<run.output_dir>/ledger/<service>-<index>.json``; in memory only when built by hand.
    """

    config: Config
    service: str
    index: int
    instance: str
    metrics: ServiceMetrics
    zmq: zmq.Context
    stop: threading.Event = field(default_factory=threading.Event)
    security: Security | None = None
    run_lock: RunLock | None = None
    local_index: int = 0
    ledger: Ledger = field(default_factory=Ledger)

    @property
    def socket_limits(self) -> dict[str, Any]:
        """The arguments every socket of this process is made with: ``max_message_bytes`` and ``hwm``
        (``transport.max_message_bytes``, bytes; ``transport.hwm``, messages) and ``security`` (its
        CURVE keys, or None); for :func:`~streamrl.common.transport.make_socket` and the classes that
        make their own sockets (``WeightClient``, ``WeightServer``, ``CreditClient``)."""
        t = self.config.transport
        return {"max_message_bytes": t.max_message_bytes, "hwm": t.hwm, "security": self.security}

    def socket(self, kind: int, *, hwm: int | None = None, **options: Any) -> ZmqSocket:
        """A socket of this process: :func:`~streamrl.common.transport.make_socket` with its context and
        :attr:`socket_limits` (``hwm`` replaces ``transport.hwm``); ``options``: ``bind``, ``connect``,
        ``subscribe``, ``identity``, ``resolve_every_s``.

        Raises:
            streamrl.common.transport.BindError: the endpoint cannot be bound (a :class:`StartupRefused`).
        """
        limits = self.socket_limits
        if hwm is not None:
            limits["hwm"] = hwm
        return make_socket(self.zmq, kind, **limits, **options)

    def inbox(self, expected: Sequence[type[M]], socket_name: str) -> Inbox[M]:
        """The decoder of one socket: accepts ``expected`` kinds up to ``transport.max_message_bytes``,
        counts and logs rejections in this process's metrics under ``socket_name``."""
        return Inbox(self.metrics, expected, max_bytes=self.config.transport.max_message_bytes, socket_name=socket_name)

    def close(self) -> None:
        """Stop the ZAP handler, close every socket still open and end the ZeroMQ context, drop the run lock."""
        if self.security is not None:
            self.security.close()
        self.zmq.destroy(linger=0)  # also after a failure that left sockets open (term would wait forever)
        if self.run_lock is not None:
            self.run_lock.release()


class ServiceLoop(abc.ABC):
    """The skeleton of a service's loop, shared by the buffer, generator, scorer, learner and
    feedback services.

    A service subclasses it; in ``__init__`` it calls ``super().__init__(ctx)``, opens its sockets
    with :meth:`socket` and hands whatever else must be closed at the end to :meth:`closing`. It
    implements :meth:`turn`, one turn of its loop, which returns within about a second (waiting on a
    socket with :meth:`wait_for`, which gives up as soon as a stop is requested), and may override
    :meth:`starting` (before the first turn), :meth:`more` (whether to take another turn; by default
    until a stop is requested) and :meth:`finishing` (after the last turn, when no exception ended
    the loop). :meth:`run` runs them and then closes what was handed to it, the last opened first,
    also when a turn raised (each is closed even when another's close raises). :func:`run_service`
    then ends the process (``os._exit`` after a clean stop).

    Attributes:
        ctx: the process's :class:`ServiceContext`.
    """

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self._resources = ExitStack()

    def socket(self, kind: int, **options: Any) -> zmq.Socket:
        """A socket made by :meth:`ServiceContext.socket` (same arguments), closed when the loop ends."""
        sock = self.ctx.socket(kind, **options)
        self._resources.callback(sock.close, 0)
        return sock

    def closing(self, close: Callable[..., object], *args: Any) -> None:
        """Call ``close(*args)`` when the loop ends (after :meth:`finishing`; last handed, first called)."""
        self._resources.callback(close, *args)

    def wait_for(self, sock: zmq.Socket, timeout_s: float, flags: int = zmq.POLLIN) -> bool:
        """Wait up to ``timeout_s`` seconds for ``sock`` to be ready (``flags``); False after the timeout
        or as soon as a stop is requested (:func:`~streamrl.common.transport.poll_unless_stopped`)."""
        return poll_unless_stopped(sock, timeout_s, self.ctx.stop, flags)

    def starting(self) -> None:  # noqa: B027 (an optional hook: most services have nothing to do)
        """Before the first turn (a log line, a thread, a first publish)."""

    def more(self) -> bool:
        """Whether to take another turn: until a stop is requested (SIGTERM, SIGINT)."""
        return not self.ctx.stop.is_set()

    @abc.abstractmethod
    def turn(self) -> None:
        """One turn of the loop; returns within about a second so that a stop request is seen."""

    def finishing(self) -> None:  # noqa: B027 (an optional hook)
        """After the last turn, when no exception ended the loop (a final checkpoint)."""

    def run(self) -> None:
        """:meth:`starting`, :meth:`turn` while :meth:`more`, :meth:`finishing`; then close everything
        handed to :meth:`socket` and :meth:`closing`, whatever happened."""
        with self._resources:
            self.starting()
            while self.more():
                self.turn()
            self.finishing()


def journal_folder(config: Config) -> Path:
    """The buffer's journal folder: ``buffer.journal_dir``, default ``<run.output_dir>/buffer``."""
    return Path(config.buffer.journal_dir or Path(config.run.output_dir) / "buffer")


def owned_folder(config: Config, service: str) -> Path | None:
    """The folder whose state one process of ``service`` owns (locked at start), or None.

    The learner owns ``run.output_dir`` (checkpoints, ``trained.jsonl``, ``metrics.jsonl``); the buffer
    owns its journal folder when the journal is on; the feedback service the folder of its label
    database (when enabled); generators and scorers keep no state on disk.
    """
    if service == "learner":
        return Path(config.run.output_dir)
    if service == "buffer" and config.buffer.journal:
        return journal_folder(config)
    if service == "feedback" and config.feedback.enabled:
        return config.feedback.database_path(config.run.output_dir).parent
    return None


def _refuse(service: str, message: str) -> NoReturn:
    """Log and print why this process cannot start, then exit with status 2."""
    log.error("%s", message)
    print(f"streamrl {service}: {message}", file=sys.stderr)
    raise SystemExit(2)


def replica_index(explicit: int | None) -> int:
    """The replica's position on its host: ``--index``, else honcho's ``HONCHO_PROCESS_NAME``
    (``generator.3`` -> 2), else 0."""
    if explicit is not None:
        return explicit
    name = os.environ.get("HONCHO_PROCESS_NAME", "")
    _, _, number = name.rpartition(".")
    return int(number) - 1 if number.isdigit() else 0


@dataclass(frozen=True)
class Replica:
    """Who a process is among the replicas of its service (see :func:`replica_identity`).

    Attributes:
        index: replica number, distinct per replica of a run: seeds derive from it. The local
            index, or for a replica named by ``$STREAMRL_REPLICA`` a number from its name.
        local_index: position among the service's replicas on this host (``--index``, honcho):
            metrics port = base port + local_index; scorer i binds ``endpoints.scorers[i]``.
        instance: the name in logs, messages and metrics: ``generator-2``, or the given name.
    """

    index: int
    local_index: int
    instance: str


def replica_identity(service: str, explicit: int | None, name: str | None = None) -> Replica:
    """This process's identity, with no hand-set index needed where a name is given.

    ``name`` (``$STREAMRL_REPLICA``: a Kubernetes pod name from the downward API, a host name)
    makes any number of replicas started from one template distinct: the instance is the name
    and the index a stable 31-bit number derived from it (CRC-32; two of n replicas collide with
    probability about n^2 / 2^32), while the local index (metrics port offset) stays ``--index`` or
    0, as each pod or host has its own ports. Without a name: ``--index``, else honcho's
    ``HONCHO_PROCESS_NAME``, else 0, and the instance is ``<service>-<index>``.

    Raises:
        ValueError: ``name`` is empty or contains whitespace.
    """
    local = replica_index(explicit)
    if name is None:
        return Replica(index=local, local_index=local, instance=f"{service}-{local}")
    if not name or any(c.isspace() for c in name):
        raise ValueError(
            f"{REPLICA_ENV}={name!r}: a replica name must be non-empty and contain no whitespace; "
            "fix: e.g. the pod name (fieldRef metadata.name) or generator-<host>-<n>"
        )
    return Replica(index=zlib.crc32(name.encode()) & 0x7FFFFFFF, local_index=local, instance=name)


def parse_args(service: str, argv: list[str] | None) -> argparse.Namespace:
    """``--config``, ``--set`` (repeatable) and ``--index`` of a service process."""
    parser = argparse.ArgumentParser(
        prog=f"python -m streamrl.services.{service}", description=f"streamrl {service} service"
    )
    add_config_arguments(
        parser,
        default=os.environ.get(CONFIG_ENV),
        config_help=f"TOML run config (default: ${CONFIG_ENV}; built-in defaults when unset)",
    )
    parser.add_argument(
        "--index",
        type=int,
        default=None,
        help="position among this service's replicas on this host: metrics port offset, scorer "
        f"endpoint (default: from HONCHO_PROCESS_NAME, else 0); ${REPLICA_ENV} names the replica",
    )
    return parser.parse_args(argv)


def start_service(service: str, argv: list[str] | None = None) -> ServiceContext:
    """Parse arguments, load and validate the config, set up logging, metrics and signals.

    Exits the process with status 2 and the full list of problems when the config is invalid
    or names a resource this service needs that is missing (a model folder, a prompt file, a
    reward function and its kwargs: ``resource_problems``, the checks ``streamrl check`` runs).
    """
    args = parse_args(service, argv)
    overrides = [line for line in os.environ.get(OVERRIDES_ENV, "").splitlines() if line.strip()]
    try:
        config = load_config(args.config, overrides + args.overrides, resources=[service])  # as `streamrl check`
    except ConfigError as err:
        print(f"streamrl {service}: invalid config\n{err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        replica = replica_identity(service, args.index, os.environ.get(REPLICA_ENV))
    except ValueError as err:
        print(f"streamrl {service}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    index, instance = replica.index, replica.instance
    logging.basicConfig(
        level=config.run.log_level,
        format=f"%(asctime)s {instance} %(levelname)s %(name)s: %(message)s",
    )
    # before any thread of ours starts (metrics server, ZeroMQ I/O): they inherit the cores
    place_process(
        service,
        config.run.cpu_placement,
        learner_threads=config.learner.threads,
        learner_ranks=config.learner.world_size,
    )
    folder = owned_folder(config, service)
    try:  # before anything reads the folder (the buffer's journal recovery, the learner's resume)
        run_lock = RunLock(folder, service) if folder is not None else None
    except RunFolderLocked as err:
        _refuse(service, str(err))
    metrics = ServiceMetrics(service, instance)
    if config.metrics.enabled:
        base = getattr(config.metrics, f"{service}_port")
        port = base + replica.local_index if base else 0
        try:
            metrics.serve(config.metrics.host, port)
        except OSError as err:
            _refuse(
                service,
                f"cannot serve metrics on {config.metrics.host}:{port}: {err.strerror}; fix: stop the "
                f"process that holds the port or set metrics.{service}_port (0 = any free port)",
            )
    try:  # a restarted replica continues from its counts file
        ledger = Ledger(ledger_path(config.run.output_dir, service, index))
    except ValueError as err:
        _refuse(service, str(err))
    context = zmq.Context()
    try:
        security = open_security(config.security.keys_dir, service, context, metrics)
    except SecurityError as err:
        print(f"streamrl {service}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    ctx = ServiceContext(
        config=config,
        service=service,
        index=index,
        instance=instance,
        metrics=metrics,
        zmq=context,
        security=security,
        run_lock=run_lock,
        local_index=replica.local_index,
        ledger=ledger,
    )

    def _on_signal(signum, _frame):
        log.info("%s got signal %d; stopping", instance, signum)
        ctx.stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("%s starting on %s (pid %d)", instance, socket.gethostname(), os.getpid())
    return ctx


def exit_now(code: int = 0) -> NoReturn:
    """End this process at once with ``code``, skipping the interpreter's own finalisation.

    For a service that has stopped cleanly: its loop has closed everything it owns (sockets, the
    ZeroMQ context, the buffer's journal, fsynced; the learner's final checkpoint, ledger and
    trackers; the run lock). What is left is Python freeing every object of torch, transformers
    and their kin, which took 2 to 5 s on a loaded machine, long enough for a launcher with a
    short grace period (honcho, supervisord, Kubernetes) to SIGKILL a process that had finished.
    Logging handlers and the standard streams are flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def run_service(service: str, loop_class, argv: list[str] | None = None, *, exit_process: bool = False) -> None:
    """Entry point of ``python -m streamrl.services.<service>``: start, build ``loop_class(ctx)``, run, clean up.

    A :class:`~streamrl.common.errors.StartupRefused` (a socket that cannot bind its endpoint, a damaged
    journal) ends the process with status 2 and a message naming the problem and the fix (never a hang:
    every socket is closed before the context ends). With ``exit_process`` (the ``__main__`` of each
    service) a loop that returned ends the process at once with status 0 (:func:`exit_now`); an
    exception still propagates (traceback, status 1).
    """
    ctx = start_service(service, argv)
    try:
        loop_class(ctx).run()
    except StartupRefused as err:  # a taken port, a damaged journal, ...
        _refuse(service, str(err))
    finally:
        ctx.close()
    if exit_process:
        exit_now(0)
