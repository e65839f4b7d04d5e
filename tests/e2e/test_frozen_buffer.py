"""A frozen buffer stops the generators: before generation credits, a generator
sampled on while the buffer was stopped (SIGSTOP) and queued 6,384 rollouts in operating-system
buffers. With credits (``generator.credits``, the default) a generator samples a group only with a
credit the buffer granted, and the buffer never has more than ``(max_staleness + 1) x groups_per_step``
groups granted and not yet arrived (``services/buffer/credits.py``), so what a generator can send after
the buffer froze is bounded by that, in rollouts ``x group_size``, however long the freeze lasts."""

from __future__ import annotations

import signal
import time

import pytest

from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow

FREEZE_S = 10.0


def sample(port: int, name: str) -> float:
    try:
        return scrape(port).get(name, 0.0)
    except ConnectionError:
        return 0.0


def test_a_generator_sends_at_most_its_credits_to_a_frozen_buffer(tmp_path, tiny_model_dir, services):
    staleness, per_step, group_size = 1, 2, 4
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        reference_in_scorer=False,  # the scorer starts faster without a model; credits are the claim
        run={"max_staleness": staleness},
        generator={"group_size": group_size, "prompts_per_batch": 2},
        learner={"total_steps": 1_000_000, "groups_per_step": per_step},
    )
    procs = services(write_config(tmp_path / "run.toml", sections))
    for name in ("learner", "buffer", "scorer", "generator"):
        procs.start(name)
    gen = sections["metrics"]["generator_port"]
    trained = tmp_path / "run" / "trained.jsonl"
    assert wait_until(lambda: trained.exists() and len(trained.read_text().splitlines()) >= 3, timeout=180), (
        procs.logs()
    )
    buffer = procs.procs["buffer-0"]
    buffer.send_signal(signal.SIGSTOP)
    try:
        before = sample(gen, "streamrl_generator_rollouts_total")
        time.sleep(FREEZE_S)
        # The gauge is the current wait, which starts only once the generator has spent the credits it
        # held (sampling those groups takes seconds on a loaded machine), so the freeze lasts until
        # the wait has grown to FREEZE_S / 2: a longer freeze only makes the bound below stricter.
        waited = wait_until(
            lambda: sample(gen, "streamrl_generator_waiting_seconds{on=credits}") > FREEZE_S / 2, timeout=2 * FREEZE_S
        )
        sent = sample(gen, "streamrl_generator_rollouts_total") - before
        credit_wait = sample(gen, "streamrl_generator_waiting_seconds{on=credits}")
    finally:
        buffer.send_signal(signal.SIGCONT)
    bound = (staleness + 1) * per_step * group_size
    assert sent <= bound, (sent, bound, procs.logs())
    assert waited, (credit_wait, procs.logs())  # it says what it waits for
    # the buffer is back: credits flow and training goes on
    steps = len(trained.read_text().splitlines())
    assert wait_until(lambda: len(trained.read_text().splitlines()) >= steps + 2, timeout=120), procs.logs()
    print(f"rollouts sent during a {FREEZE_S:.0f} s buffer freeze: {sent:.0f} (bound {bound})")
