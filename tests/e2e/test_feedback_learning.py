"""Learning from a simulated labeller on the tiny model (reward shaping), against the same run without feedback.

The environment reward is the fraction of ``e`` in a completion; the simulated labeller (a separate
process that uses only the HTTP API) likes ``a``, which that reward ignores. It rates against a fixed
threshold (+1 for any ``a``, else -1), so it always has something to rate: against the running median
it skipped every completion tied with the median, and once most completions held no ``a`` it rated
only the few with one (all +1), leaving H-hat nothing to contrast. The environment reward (the fraction of
``e``) has weight 0: the run without feedback then keeps the base policy's rate of ``a``, and the run with
feedback can only move it through H-hat. With reward shaping
(R + beta * H-hat, beta = 1, no decay), the final policy's completions carry more ``a`` than those
of the run without feedback, by more than 2 standard errors of the difference.

Robust to a loaded machine: both runs train a fixed number of learner steps (the learner stops itself;
wall time only bounds the wait), and in the feedback run the learner is held (SIGSTOP) from the first
rollout the feedback service receives until it has published H-hat fit on the labeller's first labels,
so every step but the few on rollouts scored before that carries the person's term, however the
feedback service, the labeller and the learner share the cores (unheld, how many of the tiny learner's 60
steps, seconds of work, came before the first fit depended on how busy the machine was).

The standard error is that of the two final policies' sampling (512 completions each, the same 4
prompts in both, seeded): it says the two policies differ, not how much another pair of training
runs would; pooling over the prompts makes it larger than the within-prompt (stratified) error, so the
2-SE bar is conservative for that claim.
"""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch

from streamrl.common.messages import SamplingParams
from streamrl.common.models import load_causal_lm, load_tokenizer
from streamrl.services.generator.sampling import encode_prompts, sample_completions
from streamrl.testing import (
    answers,
    feedback_sections,
    local_run_config,
    scrape,
    start_simulated_labeller,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 60
STARTUP_S = 900
"""Bound of each wait for a service to come up or act, seconds: on a 2-core machine at load average 12-16 the
feedback service had not answered /healthz after 300 s (importing torch and loading the model at a small
share of a core); the waits end as soon as the condition holds, so this only bounds a hang."""
PROMPTS = ["The film was", "I think that", "My review:", "Overall it is"]


def run_job(tmp_path, tiny_model_dir, services, *, feedback: bool) -> tuple[np.ndarray, dict]:
    """One job to STEPS learner steps; returns the final policy's ``a`` fractions and the labeller's counts."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        learner={
            "total_steps": STEPS,
            "lr": 3e-3,
            "kl_coef": 0.0,
            "normalize_rewards": False,
            "checkpoint_every": STEPS,
        },
        generator={"group_size": 8, "max_new_tokens": 12},
        buffer={"capacity_groups": 8},
    )
    # the environment reward at weight 0: at full weight the policy was all "e" within 30 steps, and at 0.1 it
    # still was on a quiet machine (a clean-clone rehearsal): no completion held an "a" left to reinforce, and
    # both arms ended at 0.0; the person's term alone then drives the feedback run (+0.030, 8.3 SE, 54 s)
    sections["scorer"]["rewards"][0]["weight"] = 0.0
    if feedback:
        sections = feedback_sections(
            sections,
            combination="reward_shaping",
            beta=1.0,
            beta_decay=1.0,
            min_labels=4,
            fit_interval_s=0.3,
            # 50 labels/s from the simulated person (limit 200): at 10/s the quiet machine's tiny learner took its
            # 60 steps in seconds, H-hat lagged, and the policy found completions H-hat rated high without an "a"
            # (shaping mean 0.93, 'a' 0.0008 vs 0.0112 in a clean-clone rehearsal); at 50/s: 0.91 and 0.83 vs 0.011
            label_rate_per_s=200.0,
        )
    config = write_config(tmp_path / "run.toml", sections)
    procs = services(config)
    names = ("learner", "buffer", "scorer", "generator") + (("feedback",) if feedback else ())
    for name in names:
        procs.start(name)
    counts: dict = {}
    if feedback:
        url = f"http://127.0.0.1:{sections['feedback']['http_port']}"
        assert wait_until(lambda: answers(url + "/healthz", timeout=1), STARTUP_S), procs.logs()
        _, labeller = start_simulated_labeller(
            config,
            url,
            ["--likes", "char:a", "--threshold", "0", "--labels-per-second", "50", "--duration", "600"],
        )
    learner = procs.procs["learner-0"]
    try:
        if feedback:
            # the learner is held (SIGSTOP) from the first streamed rollout until H-hat exists; the generator
            # has the learner's first weights by then and fills the buffer meanwhile (the learner cannot start
            # later: the generators wait for its weights)
            port = sections["metrics"]["feedback_port"]
            assert wait_until(lambda: feedback_metric(port, "rollouts_received_total") >= 1, STARTUP_S), procs.logs()
            learner.send_signal(signal.SIGSTOP)
            try:
                assert wait_until(lambda: feedback_metric(port, "human_model_version") >= 1, STARTUP_S), procs.logs()
            finally:
                learner.send_signal(signal.SIGCONT)
        # a fixed number of steps: the learner stops itself; the timeout only bounds a very loaded machine
        assert wait_until(lambda: learner.poll() is not None, timeout=900) and learner.returncode == 0, procs.logs()
    finally:
        if feedback:
            labeller.terminate()
            labeller.wait(10)
    if feedback:
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        counts = {"shaped_steps": sum(r.get("human/shaped_fraction", 0) > 0 for r in records)}
    model_dir = tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}" / "model"
    return sample_a_fraction(model_dir), counts


def feedback_metric(port: int, name: str) -> float:
    """``streamrl_feedback_<name>`` of the feedback service (0 while it starts)."""
    try:
        return scrape(port).get(f"streamrl_feedback_{name}", 0.0)
    except ConnectionError:
        return 0.0


def sample_a_fraction(model_dir) -> np.ndarray:
    torch.manual_seed(123)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), device=torch.device("cpu")).eval()
    ids = encode_prompts(tokenizer, PROMPTS, max_prompt_tokens=32, add_special_tokens=False)
    texts = [
        c.text
        for _ in range(4)
        for group in sample_completions(
            model, tokenizer, ids, group_size=32, sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12)
        )
        for c in group
    ]
    return np.array([t.count("a") / max(1, len(t)) for t in texts])


def test_simulated_feedback_raises_the_property_the_reward_ignores(tmp_path, tiny_model_dir, services):
    with_feedback, counts = run_job(tmp_path / "feedback", tiny_model_dir, services, feedback=True)
    without, _ = run_job(tmp_path / "plain", tiny_model_dir, services, feedback=False)
    diff = with_feedback.mean() - without.mean()
    se = math.sqrt(with_feedback.var(ddof=1) / len(with_feedback) + without.var(ddof=1) / len(without))
    print(
        f"fraction of 'a': with feedback {with_feedback.mean():.4f}, without {without.mean():.4f}, "
        f"difference {diff:.4f} = {diff / se:.1f} SE; {counts}"
    )
    # most steps carry the person's term: all but those on rollouts scored before the scorer had H-hat (the
    # buffer's 8 groups = 4 steps, what the credits let be in flight, and the scorer's H-hat subscription lag:
    # 49-55 of 60 in rehearsals)
    assert counts["shaped_steps"] >= STEPS // 2, counts
    assert diff > 2 * se, (with_feedback.mean(), without.mean(), se)
