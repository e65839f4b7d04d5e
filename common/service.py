"""What every service process does at start: arguments, config, logging, identity, metrics, signals.

Each ``python -m streamrl.services.<name>`` calls :func:`start_service` and then runs
its loop until ``ctx.stop`` is set (SIGTERM / SIGINT set it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import transformers
import zmq

from streamrl.common.config import Config, ConfigError, load_config
from streamrl.common.errors import StartupRefused
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.runlock import RunFolderLocked, RunLock
from streamrl.common.security import Security, SecurityError, open_security

log = logging.getLogger(__name__)

CONFIG_ENV = "STREAMRL_CONFIG"
"""Config path used when ``--config`` is not given (set by ``streamrl run`` for honcho)."""
OVERRIDES_ENV = "STREAMRL_SET"
"""Newline-separated ``key=value`` overrides applied before ``--set`` ones."""


@dataclass
class ServiceContext:
    """Everything a service loop needs from its process.

    Attributes:
        config: the validated run config.
        service: ``generator``, ``scorer``, ``buffer`` or ``learner``.
        index: replica index (0-based) among processes of this service.
        instance: identity used in messages and metrics, e.g. ``generator-1``.
        metrics: this process's metrics registry (already served over HTTP if enabled).
        zmq: the process's ZeroMQ context.
        stop: set on SIGTERM/SIGINT; loops check it at least every second.
        security: CURVE keys and ZAP of this process (``security=ctx.security`` in
            ``make_socket``); None when ``security.keys_dir`` is unset.
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

    def close(self) -> None:
        """Stop the ZAP handler, close every socket still open and end the ZeroMQ context, drop the run lock."""
        if self.security is not None:
            self.security.close()
        self.zmq.destroy(linger=0)  # also after a failure that left sockets open (term would wait forever)
        if self.run_lock is not None:
            self.run_lock.release()


def journal_folder(config: Config) -> Path:
    """The buffer's journal folder: ``buffer.journal_dir``, default ``<run.output_dir>/buffer``."""
    return Path(config.buffer.journal_dir or Path(config.run.output_dir) / "buffer")


def owned_folder(config: Config, service: str) -> Path | None:
    """The folder whose state one process of ``service`` owns (locked at start), or None.

    The learner owns ``run.output_dir`` (checkpoints, ``trained.jsonl``, ``metrics.jsonl``); the buffer
    owns its journal folder when the journal is on; generators and scorers keep no state on disk.
    """
    if service == "learner":
        return Path(config.run.output_dir)
    if service == "buffer" and config.buffer.journal:
        return journal_folder(config)
    return None


def _refuse(service: str, message: str) -> NoReturn:
    """Log and print why this process cannot start, then exit with status 2."""
    log.error("%s", message)
    print(f"streamrl {service}: {message}", file=sys.stderr)
    raise SystemExit(2)


def replica_index(explicit: int | None) -> int:
    """The replica index: ``--index``, else honcho's ``HONCHO_PROCESS_NAME`` (``generator.3`` -> 2), else 0."""
    if explicit is not None:
        return explicit
    name = os.environ.get("HONCHO_PROCESS_NAME", "")
    _, _, number = name.rpartition(".")
    return int(number) - 1 if number.isdigit() else 0


def parse_args(service: str, argv: list[str] | None) -> argparse.Namespace:
    """``--config``, ``--set`` (repeatable) and ``--index`` of a service process."""
    parser = argparse.ArgumentParser(prog=f"python -m streamrl.services.{service}",
                                     description=f"streamrl {service} service")
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV),
                        help=f"TOML run config (default: ${CONFIG_ENV}; built-in defaults when unset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set learner.lr=1e-5 (repeatable)")
    parser.add_argument("--index", type=int, default=None,
                        help="replica index (default: from HONCHO_PROCESS_NAME, else 0)")
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
    index = replica_index(args.index)
    instance = f"{service}-{index}"
    logging.basicConfig(
        level=config.run.log_level,
        format=f"%(asctime)s {instance} %(levelname)s %(name)s: %(message)s",
    )
    transformers.utils.logging.disable_progress_bar()  # no tqdm bars in service logs
    folder = owned_folder(config, service)
    try:  # before anything reads the folder (the buffer's journal recovery, the learner's resume)
        run_lock = RunLock(folder, service) if folder is not None else None
    except RunFolderLocked as err:
        _refuse(service, str(err))
    metrics = ServiceMetrics(service, instance)
    if config.metrics.enabled:
        base = getattr(config.metrics, f"{service}_port")
        port = base + index if base else 0
        try:
            metrics.serve(config.metrics.host, port)
        except OSError as err:
            _refuse(service, f"cannot serve metrics on {config.metrics.host}:{port}: {err.strerror}; fix: stop the "
                    f"process that holds the port or set metrics.{service}_port (0 = any free port)")
    context = zmq.Context()
    try:
        security = open_security(config.security.keys_dir, service, context, metrics)
    except SecurityError as err:
        print(f"streamrl {service}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    ctx = ServiceContext(config=config, service=service, index=index, instance=instance,
                         metrics=metrics, zmq=context, security=security, run_lock=run_lock)

    def _on_signal(signum, _frame):
        log.info("%s got signal %d; stopping", instance, signum)
        ctx.stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("%s starting on %s (pid %d)", instance, socket.gethostname(), os.getpid())
    return ctx


def run_service(service: str, loop_class, argv: list[str] | None = None) -> None:
    """Entry point of ``python -m streamrl.services.<service>``: start, build ``loop_class(ctx)``, run, clean up.

    A :class:`~streamrl.common.errors.StartupRefused` (a socket that cannot bind its endpoint, a damaged
    journal) ends the process with status 2 and a message naming the problem and the fix (never a hang:
    every socket is closed before the context ends).
    """
    ctx = start_service(service, argv)
    try:
        loop_class(ctx).run()
    except StartupRefused as err:  # a taken port, a damaged journal, ...
        _refuse(service, str(err))
    finally:
        ctx.close()
