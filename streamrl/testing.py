"""Helpers for running real services on loopback, shared by tests/ and bench/.

Fresh loopback ports, run configs written as TOML, a process group of service
processes that is always cleaned up, metric scrapes and polling waits. Used by
the test suite and the benchmarks (and usable by anyone testing a reward or a
deployment against real processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from streamrl.deploy import DEFAULT_PROMPTS
from streamrl.ports import free_port  # noqa: F401  (tests and benchmarks take it from here)
from streamrl.status import read as read_metrics


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_config(path: Path, sections: dict) -> Path:
    """Write ``{section: {key: value}}`` as TOML (list-of-table values become [[arrays]])."""
    lines = []
    for section, values in sections.items():
        tables = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if k not in tables]
        for key, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def local_run_config(
    tmp_path: Path, model_dir: Path, *, scorers: int = 1, reference_in_scorer: bool = True, **overrides
) -> dict:
    """Config sections for a run on loopback with fresh ports; ``overrides`` = {section: {key: value}}.

    ``reference_in_scorer=False`` sets ``scorer.reference_logprobs = false``: the learner runs the
    reference pass itself and a scorer process starts without transformers or a model (1.6-1.7 s of
    CPU to be ready instead of 4.5-5.0 s on the 2-core test machine), for tests that start scorers
    often and are not about where the reference log-probs come from.
    """
    sections = {
        "run": {"output_dir": str(tmp_path / "run"), "max_staleness": 1, "seed": 0},
        "model": {"path": str(model_dir)},
        "endpoints": {
            "scorers": [f"tcp://127.0.0.1:{free_port()}" for _ in range(scorers)],
            "buffer": f"tcp://127.0.0.1:{free_port()}",
            "batches": f"tcp://127.0.0.1:{free_port()}",
            "weights_announce": f"tcp://127.0.0.1:{free_port()}",
            "weights": f"tcp://127.0.0.1:{free_port()}",
        },
        "transport": {"announce_interval_s": 0.2, "request_timeout_s": 5.0},
        "metrics": {
            "generator_port": free_port(),
            "scorer_port": free_port(),
            "buffer_port": free_port(),
            "learner_port": free_port(),
        },
        "generator": {
            "max_new_tokens": 12,
            "group_size": 4,
            "prompts_per_batch": 2,
            "prompts": {"kind": "jsonl", "path": str(DEFAULT_PROMPTS)},
        },
        "scorer": {"rewards": [{"function": "streamrl.services.scorer.rewards:count_char", "kwargs": {"char": "e"}}]},
        "buffer": {"capacity_groups": 8},
        "learner": {"total_steps": 6, "groups_per_step": 2, "lr": 1e-3, "batch_timeout_s": 120.0},
    }
    if not reference_in_scorer:
        sections["scorer"]["reference_logprobs"] = False
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


class Services:
    """Starts service processes (``python -m streamrl.services.<name>``) and always cleans them up."""

    def __init__(self, config: Path, log_dir: Path):
        self.config = config
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, service: str, index: int = 0, *extra: str) -> subprocess.Popen:
        name = f"{service}-{index}"
        log = open(self.log_dir / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"streamrl.services.{service}",
                "--config",
                str(self.config),
                "--index",
                str(index),
                *extra,
            ],
            cwd=self.log_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.procs[name] = proc
        return proc

    def train(self, timeout: float = 240.0) -> subprocess.Popen:
        """Start the buffer, a scorer, a generator and the learner; wait for the learner to finish its
        ``total_steps`` and check it exited 0 (AssertionError with every log otherwise)."""
        for name in ("buffer", "scorer", "generator"):
            self.start(name)
        learner = self.start("learner")
        assert wait_until(lambda: learner.poll() is not None, timeout=timeout), self.logs()
        assert learner.returncode == 0, self.logs()
        return learner

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 15.0) -> int | None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def logs(self) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            out.append(f"===== {path.name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(out)

    def close(self) -> None:
        """SIGTERM every process at once, then wait (and kill what does not exit in 10 s)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in list(self.procs):
            self.stop(name, timeout=10.0)


def scrape(port: int) -> dict[str, float]:
    """Samples of a service's metrics endpoint on 127.0.0.1 (``{'name{k=v}': value}``).

    Raises:
        ConnectionError: nothing serves metrics on ``port``.
    """
    samples = read_metrics("127.0.0.1", port, timeout=5.0)
    if samples is None:
        raise ConnectionError(f"no metrics endpoint on port {port}")
    return samples


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM ``proc``, then SIGKILL it if it has not exited after ``timeout`` seconds; reap it."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Call ``predicate`` every ``interval`` seconds until it returns true or ``timeout`` seconds pass.

    Returns True as soon as it holds, else its value at the deadline. The interval is short because the
    test suite waits hundreds of times: each wait overshoots by half an interval on average (it
    was 0.5 s); a predicate that costs more than a few milliseconds should pass a longer one.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def feedback_sections(sections: dict, **feedback) -> dict:
    """``sections`` (from :func:`local_run_config`) with the feedback service on: fresh loopback ports for
    its feed, H-hat publisher, web page and metrics, and the ``[feedback]`` keys given (``enabled`` is true)."""
    sections["endpoints"].update(
        feedback=f"tcp://127.0.0.1:{free_port()}", human_model=f"tcp://127.0.0.1:{free_port()}"
    )
    sections["metrics"]["feedback_port"] = free_port()
    sections["feedback"] = {
        "enabled": True,
        "http_port": free_port(),
        "fit_interval_s": 0.5,
        "announce_interval_s": 1.0,
        **feedback,
    }
    return sections


def answers(url: str, timeout: float = 2.0) -> bool:
    """True when a GET of ``url`` answers 2xx within ``timeout`` seconds (False on any connection error)."""
    import requests

    try:
        return requests.get(url, timeout=timeout).ok
    except requests.RequestException:
        return False


def add_labeller(config: Path, name: str, *config_args: str) -> str:
    """Create a labeller in the run's feedback database (the admin command, as a user would); returns the token.
    ``config_args``: the run's ``--set KEY=VALUE`` arguments, if any."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamrl.services.feedback.admin",
            "--config",
            str(config),
            *config_args,
            "labeller",
            "add",
            name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def start_simulated_labeller(
    config: Path, url: str, person: list[str], *config_args: str, name: str = "simulated"
) -> tuple[str, subprocess.Popen]:
    """Add labeller ``name`` (:func:`add_labeller`) and start the simulated person on the feedback page at ``url``
    with its options ``person`` (``--likes``, ``--duration``, ...: ``python -m
    streamrl.services.feedback.simulate --help``); returns ``(token, process)`` (stdout piped, text: the person
    prints its counts as one JSON line when it ends by itself). The caller terminates the process."""
    token = add_labeller(config, name, *config_args)
    # --token=TOKEN, not "--token TOKEN": a token may start with "-" (base64url), which argparse takes for an option
    argv = [sys.executable, "-m", "streamrl.services.feedback.simulate", "--url", url, f"--token={token}", *person]
    return token, subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
