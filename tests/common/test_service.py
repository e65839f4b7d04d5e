"""Service start-up (streamrl.common.service): replica index, arguments and overrides, config
errors exit 2, signals set stop, metrics served on the configured port, run_service cleans up."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import urllib.request

import pytest
import zmq

from streamrl.common import messages as m
from streamrl.common.config import load_config
from streamrl.common.errors import StartupRefused
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.service import (
    CONFIG_ENV,
    OVERRIDES_ENV,
    ServiceContext,
    ServiceLoop,
    parse_args,
    replica_index,
    run_service,
    start_service,
)
from streamrl.testing import free_port, write_config


@pytest.fixture
def process_state(monkeypatch):
    """Undo what start_service does to the test process: signal handlers, root log level, env."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    level = logging.getLogger().level
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    monkeypatch.delenv("HONCHO_PROCESS_NAME", raising=False)
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    logging.getLogger().setLevel(level)


def scorer_config(tmp_path, **metrics):
    return write_config(
        tmp_path / "run.toml",
        {"run": {"name": "svc", "output_dir": str(tmp_path / "out")}, "metrics": {"enabled": False, **metrics}},
    )


@pytest.mark.parametrize(
    ("explicit", "honcho", "index"),
    [
        (3, "generator.7", 3),  # --index wins
        (None, "generator.3", 2),  # honcho numbers replicas from 1
        (None, "scorer.1", 0),
        (None, "learner", 0),  # no number
        (None, "generator.x", 0),
        (None, None, 0),
    ],
)
def test_replica_index(monkeypatch, explicit, honcho, index):
    if honcho is None:
        monkeypatch.delenv("HONCHO_PROCESS_NAME", raising=False)
    else:
        monkeypatch.setenv("HONCHO_PROCESS_NAME", honcho)
    assert replica_index(explicit) == index


def test_parse_args_defaults_to_the_config_in_the_environment(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "/runs/job.toml")
    args = parse_args("buffer", ["--set", "a.b=1", "--set", "c.d=2"])
    assert (args.config, args.overrides, args.index) == ("/runs/job.toml", ["a.b=1", "c.d=2"], None)
    args = parse_args("buffer", ["--config", "x.toml", "--index", "2"])
    assert (args.config, args.overrides, args.index) == ("x.toml", [], 2)
    with pytest.raises(SystemExit) as exit_info:
        parse_args("buffer", ["--index", "two"])
    assert exit_info.value.code == 2


def test_start_service_builds_the_context_and_applies_overrides_in_order(tmp_path, monkeypatch, process_state):
    path = scorer_config(tmp_path)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setenv(OVERRIDES_ENV, "run.seed=5\n\nlearner.lr=0.5\n")  # blank lines are skipped
    ctx = start_service("scorer", ["--set", "run.seed=9", "--index", "1"])
    try:
        assert (ctx.service, ctx.index, ctx.instance) == ("scorer", 1, "scorer-1")
        assert ctx.config.run.name == "svc"
        assert ctx.config.run.seed == 9  # --set comes after $STREAMRL_SET
        assert ctx.config.learner.lr == 0.5
        assert ctx.metrics.instance == "scorer-1" and ctx.metrics.port is None  # metrics.enabled = false
        assert ctx.security is None and not ctx.stop.is_set()
    finally:
        ctx.close()
    assert ctx.zmq.closed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_stop(tmp_path, process_state, sig):
    ctx = start_service("scorer", ["--config", str(scorer_config(tmp_path))])
    try:
        os.kill(os.getpid(), sig)
        assert ctx.stop.wait(5)
    finally:
        ctx.close()


def test_metrics_are_served_on_base_port_plus_index(tmp_path, process_state):
    base = free_port()
    ctx = start_service(
        "scorer", ["--config", str(scorer_config(tmp_path, enabled=True, scorer_port=base - 1)), "--index", "1"]
    )
    try:
        assert ctx.metrics.port == base
        text = urllib.request.urlopen(f"http://127.0.0.1:{base}/metrics", timeout=10).read().decode()
        assert 'streamrl_scorer_info{instance_id="scorer-1",service="scorer"} 1.0' in text
    finally:
        ctx.close()


def test_invalid_config_exits_2_listing_every_problem(tmp_path, process_state, capsys):
    path = write_config(tmp_path / "bad.toml", {"run": {"max_staleness": -1}, "learner": {"lr": "fast"}})
    with pytest.raises(SystemExit) as exit_info:
        start_service("buffer", ["--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("streamrl buffer: invalid config")
    assert "run.max_staleness" in err and "learner.lr" in err
    with pytest.raises(SystemExit) as exit_info:
        start_service("buffer", ["--config", str(tmp_path / "missing.toml")])
    assert exit_info.value.code == 2
    assert "missing.toml does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a malformed override
        start_service("buffer", ["--config", str(scorer_config(tmp_path)), "--set", "nope"])
    assert exit_info.value.code == 2
    assert "nope" in capsys.readouterr().err


class Recorder:
    """A loop class: remembers its context; ``behaviour`` says what run() does."""

    seen: list = []
    behaviour = "return"

    def __init__(self, ctx):
        self.ctx = ctx
        Recorder.seen.append(ctx)

    def run(self):
        if Recorder.behaviour == "refuse":
            raise StartupRefused("cannot bind tcp://127.0.0.1:1: address in use; fix: stop the other process")
        if Recorder.behaviour == "crash":
            raise RuntimeError("loop crashed")


@pytest.mark.parametrize("behaviour", ["return", "refuse", "crash"])
def test_run_service_runs_the_loop_and_always_closes(tmp_path, process_state, capsys, behaviour, monkeypatch):
    monkeypatch.setattr(Recorder, "seen", [])
    monkeypatch.setattr(Recorder, "behaviour", behaviour)
    argv = ["--config", str(scorer_config(tmp_path))]
    if behaviour == "return":
        run_service("scorer", Recorder, argv)
    elif behaviour == "refuse":
        with pytest.raises(SystemExit) as exit_info:
            run_service("scorer", Recorder, argv)
        assert exit_info.value.code == 2
        assert "streamrl scorer: cannot bind tcp://127.0.0.1:1: address in use; fix:" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="loop crashed"):
            run_service("scorer", Recorder, argv)
    (ctx,) = Recorder.seen
    assert ctx.zmq.closed


# ------------------------------------------------------------------ the loop skeleton


@pytest.fixture
def make_context():
    """``make_context(**transport)``: a scorer's :class:`ServiceContext` built by hand (the config's
    defaults with these ``transport`` keys), closed after the test."""
    made = []

    def make(**transport) -> ServiceContext:
        config = load_config(None, [f"transport.{key}={value}" for key, value in transport.items()])
        metrics = ServiceMetrics("scorer", "scorer-0")
        made.append(
            ServiceContext(
                config=config, service="scorer", index=0, instance="scorer-0", metrics=metrics, zmq=zmq.Context()
            )
        )
        return made[-1]

    yield make
    for ctx in made:
        ctx.close()


def test_context_sockets_take_the_limits_from_the_config(make_context):
    ctx = make_context(max_message_bytes=4096, hwm=7)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    plain = ctx.socket(zmq.PULL, bind=endpoint)
    wide = ctx.socket(zmq.PUSH, connect=[endpoint], hwm=50)
    assert [plain.getsockopt(option) for option in (zmq.MAXMSGSIZE, zmq.SNDHWM, zmq.RCVHWM)] == [4096, 7, 7]
    assert (wide.getsockopt(zmq.MAXMSGSIZE), wide.getsockopt(zmq.SNDHWM)) == (4096, 50)
    assert ctx.socket_limits == {"max_message_bytes": 4096, "hwm": 7, "security": None}
    inbox = ctx.inbox([m.BatchRequest], "batches")
    assert (inbox.max_bytes, inbox.expected, inbox.socket_name) == (4096, (m.BatchRequest,), "batches")
    assert inbox.decode([b"\x00" * 5000]) is None  # over the limit: rejected and counted
    assert inbox.rejected_counts == {"oversize": 1}


class Counting(ServiceLoop):
    """A loop of ``turns`` turns (then it asks itself to stop) that records what ran, in order."""

    def __init__(self, ctx, turns, fail_at=None):
        super().__init__(ctx)
        self.events, self.turns, self.fail_at = [], turns, fail_at
        self.sock = self.socket(zmq.PULL, bind=f"tcp://127.0.0.1:{free_port()}")
        self.closing(self.events.append, "close first opened")
        self.closing(self.events.append, "close last opened")

    def starting(self):
        self.events.append("starting")

    def turn(self):
        self.events.append("turn")
        if len(self.events) - 1 == self.fail_at:
            raise RuntimeError("turn failed")
        if self.events.count("turn") == self.turns:
            self.ctx.stop.set()

    def finishing(self):
        self.events.append("finishing")


def test_service_loop_runs_its_turns_until_stopped_then_closes_last_opened_first(make_context):
    ctx = make_context()
    loop = Counting(ctx, turns=3)
    loop.run()
    assert loop.events == [
        "starting",
        "turn",
        "turn",
        "turn",
        "finishing",
        "close last opened",
        "close first opened",
    ]
    assert loop.sock.closed


def test_service_loop_closes_everything_when_a_turn_raises(make_context):
    ctx = make_context()
    loop = Counting(ctx, turns=5, fail_at=2)
    with pytest.raises(RuntimeError, match="turn failed"):
        loop.run()
    assert loop.events == ["starting", "turn", "turn", "close last opened", "close first opened"]
    assert loop.sock.closed


def test_service_loop_waits_end_at_a_stop_request(make_context):
    ctx = make_context()
    loop = Counting(ctx, turns=1)
    threading.Timer(0.2, ctx.stop.set).start()
    started = time.monotonic()
    assert loop.wait_for(loop.sock, 30.0) is False  # nothing arrives; the stop ends the wait
    assert 0.2 <= time.monotonic() - started < 2.0
    assert loop.wait_for(loop.sock, 30.0) is False  # stopped already: at once
    assert time.monotonic() - started < 2.0
