"""A frozen learner is never invisible: while a generator's weight fetch retries
against a learner stopped with SIGSTOP, ``waiting_seconds{on="learner"}`` grows with the wait instead
of reading 0 until the fetch gives up.

The learner is stopped as soon as it has trained past the version the generator has loaded; the
generator is then caught mid-fetch when its ``announced_version`` is ahead of its ``policy_version``
(both are set around the fetch and the metrics thread answers while the fetch blocks); if it missed
the announcement, the learner is continued and stopped again at its next version.
``request_timeout_s = 60`` keeps that fetch retrying through the test, and ``announce_interval_s = 5``
puts the silent-announcement check (5 intervals = 25 s) out of reach, so only the fetch can explain
the wait.
"""

from __future__ import annotations

import signal
import time

import pytest

from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow

WAITING = "streamrl_generator_waiting_seconds{on=learner}"


def sample(port: int, name: str) -> float:
    try:
        return scrape(port).get(name, 0.0)
    except ConnectionError:
        return 0.0


def test_waiting_on_the_learner_grows_while_a_fetch_retries_against_a_frozen_learner(
    tmp_path, tiny_model_dir, services
):
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        reference_in_scorer=False,  # the scorer starts faster without a model; the generator's wait is the claim
        run={"max_staleness": 4},
        transport={"announce_interval_s": 5.0, "request_timeout_s": 60.0},
        learner={"total_steps": 1_000_000, "groups_per_step": 1},
    )
    procs = services(write_config(tmp_path / "run.toml", sections))
    for name in ("learner", "buffer", "scorer", "generator"):
        procs.start(name)
    gen, learner_port = sections["metrics"]["generator_port"], sections["metrics"]["learner_port"]
    learner = procs.procs["learner-0"]
    assert wait_until(lambda: sample(gen, "streamrl_generator_policy_version") >= 2, timeout=180), procs.logs()
    fetching = False
    try:
        for _ in range(5):
            loaded = sample(gen, "streamrl_generator_policy_version")
            assert wait_until(
                lambda v=loaded: sample(learner_port, "streamrl_learner_policy_version") > v, timeout=60, interval=0.02
            ), procs.logs()
            learner.send_signal(signal.SIGSTOP)
            fetching = wait_until(
                lambda: (
                    sample(gen, "streamrl_generator_announced_version")
                    > sample(gen, "streamrl_generator_policy_version")
                ),
                timeout=4,
            )
            if fetching:
                break
            learner.send_signal(signal.SIGCONT)  # the announcement was not out yet: try at the next version
        assert fetching, procs.logs()
        frozen_at = time.monotonic()
        waited = 0.0
        while time.monotonic() - frozen_at < 15 and waited < 6:
            waited = sample(gen, WAITING)
            time.sleep(0.5)
        assert waited >= 6, (waited, procs.logs())
        assert sample(gen, "streamrl_generator_announced_version") > sample(gen, "streamrl_generator_policy_version")
        assert "weight fetch failed" not in (tmp_path / "generator-0.log").read_text()  # the same fetch, retrying
    finally:
        learner.send_signal(signal.SIGCONT)
    # the learner is back: the fetch completes and the wait ends
    assert wait_until(
        lambda: (
            sample(gen, WAITING) == 0
            and sample(gen, "streamrl_generator_policy_version") >= sample(gen, "streamrl_generator_announced_version")
        ),
        timeout=120,
    ), procs.logs()
