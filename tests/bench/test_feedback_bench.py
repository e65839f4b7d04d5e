"""bench.feedback (not run here: it trains SmolLM2 for minutes per arm): every arm's overrides make a
valid run config with its combination, and the simulated person's settings reach the labeller."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from bench.feedback import (
    ARMS,
    CONFIG,
    Agent,
    across_seeds,
    arm_overrides,
    main,
    person_args,
    score_held_out,
    streamed_after,
)
from streamrl.common.config import load_config
from streamrl.common.messages import FinishReason
from streamrl.common.modes import HumanCombination
from streamrl.services.feedback.simulate import preference
from streamrl.services.generator.control import select_candidates
from streamrl.services.generator.sampling import Completion


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_is_a_valid_config(tmp_path, arm):
    args = argparse.Namespace(
        lr=2e-5,
        max_new_tokens=24,
        beta=1.0,
        beta_decay=0.99,
        candidates=4,
        credit_delay_min=1.0,
        credit_delay_max=3.0,
        labels_per_second=2.0,
        min_labels=8,
        steps=None,
        eval_every=None,
        engine=None,
        split_seed=0,
        eval_fraction=None,
    )
    overrides, _ = arm_overrides(tmp_path, arm, args, seed=3)
    cfg = load_config(CONFIG, overrides)
    assert cfg.run.seed == 3 and cfg.feedback.combination is HumanCombination(arm)
    # every arm and seed is evaluated on the same held-out prompts, none of which any run trains on
    assert cfg.generator.prompts.split_seed == 0
    assert cfg.learner.total_steps == 100000 and cfg.generator.engine == load_config(CONFIG, []).generator.engine
    # equal learner steps: the learner stops itself at --steps and checkpoints every --eval-every
    args.steps, args.eval_every, args.engine, args.eval_fraction = 12, 4, "hf", 0.5
    cfg = load_config(CONFIG, arm_overrides(tmp_path, arm, args, seed=3)[0])
    assert (cfg.learner.total_steps, cfg.learner.checkpoint_every, cfg.generator.engine) == (12, 4, "hf")
    assert cfg.generator.prompts.eval_fraction == 0.5
    # every arm runs the feedback service and the person (`none`: labels and H-hat collected, used nowhere)
    assert cfg.feedback.enabled
    assert (cfg.feedback.credit_delay_min_s, cfg.feedback.credit_delay_max_s) == (1.0, 3.0)
    assert set(ARMS) == {c.value for c in HumanCombination}


def test_the_person_and_the_seeds():
    args = argparse.Namespace(
        likes="char:o",
        labels_per_second=2.0,
        attention=0.5,
        delay_min=1.0,
        delay_max=3.0,
        noise=0.1,
        threshold=0.05,
        max_labels=300,
    )
    assert person_args(args, 7) == [
        "--likes",
        "char:o",
        "--labels-per-second",
        "2.0",
        "--attention",
        "0.5",
        "--delay-min",
        "1.0",
        "--delay-max",
        "3.0",
        "--noise",
        "0.1",
        "--seed",
        "7",
        "--threshold",
        "0.05",
        "--max-labels",
        "300",
    ]
    got = across_seeds(
        [{"arm": "none", "liked": 1.0}, {"arm": "none", "liked": 3.0}, {"arm": "q", "liked": 2.0}], "liked"
    )
    assert got["none"] == (2.0, 1.0, 2) and got["q"][0] == 2.0 and math.isnan(got["q"][1])
    with pytest.raises(SystemExit):
        main(["--arms", "none,nonsense"])


def test_a_summary_from_the_printed_runs(tmp_path, monkeypatch):
    """--from-log: the per-run JSON lines of an unfinished invocation give the table, the paired per-seed
    differences and the plot. Hand-computed: the agent of action biasing - none = +0.2 and +0.4 on seeds 0
    and 1 (mean 0.3, SE 0.1, 3.0 SE); its checkpoint alone - none = 0.0 and +0.1 (mean 0.05, SE 0.05, 1.0 SE);
    a run printed before the agent-level evaluation (none) counts its checkpoint as its agent. The agent against
    its own checkpoint: +0.2 and +0.3 (mean 0.25, SE 0.05, 5.0 SE)."""
    import bench.feedback as feedback

    def run(arm, seed, liked, agent=None):
        curve = [{"step": 0, "liked": 0.5}, {"step": 6, "liked": liked}]
        out = {"arm": arm, "seed": seed, "steps": 6, "labels": 0, "wall_s": 60.0, "liked": liked, "vader": 0.1} | {
            "liked_se": 0.05,
            "vader_se": 0.01,
            "eval_prompts": 16,
            "curve": curve,
        }
        if agent is not None:
            out |= {"agent_liked": agent, "agent_liked_se": 0.05, "agent_vader": 0.1, "agent_vader_se": 0.01}
            out |= {"agent_gain": agent - liked, "agent_gain_se": 0.02}
            out |= {"streamed_liked": agent, "streamed_n": 40, "hhat_corr": 0.5, "hhat_pair_acc": 0.7}
            curve[-1]["agent_liked"] = agent
        return out

    runs = [run("none", 0, 1.0), run("action_biasing", 0, 1.0, 1.2), run("none", 1, 0.8)]
    runs.append(run("action_biasing", 1, 0.9, 1.2))
    log = tmp_path / "bench.log"
    log.write_text('{"seed": 0, "base": {}}\narm none, seed 0\n' + "\n".join(json.dumps(r) for r in runs) + "\n")
    notes = tmp_path / "notes.md"
    notes.write_text("Reading: by hand.\n")
    written = {}
    monkeypatch.setattr(feedback, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(feedback, "write_results", lambda name, res, section: written.update(res=res, md=section))
    argv = ["--steps", "6", "--seeds", "0,1,2", "--arms", "none,action_biasing", "--from-log", str(log)]
    main(argv + ["--notes", str(notes)])
    assert [r["seed"] for r in written["res"]["results"]] == [0, 1, 0, 1]
    md = written["md"]
    assert "paired +0.300 (+3.0 SE)" in md and "paired +0.050 (+1.0 SE)" in md and "First (agent): action_biasing" in md
    assert "| +0.250 ± 0.050 (+5.0 SE) |" in md and "| +0.300 ± 0.020 |" in md
    assert md.rstrip().endswith("Reading: by hand.")
    assert (tmp_path / "feedback.png").stat().st_size > 10_000


class FakeHhat:
    """H-hat by completion: ``values[completion_tokens[0]]``; eligibility 1."""

    version = 3

    def __init__(self, values):
        self.values = values

    def score(self, prompts, completions, now):
        return np.array([self.values[int(c[0])] for c in completions]), np.ones(len(completions))


def completions(*texts_and_ids):
    return [
        Completion(np.array([7], np.int32), np.array([i], np.int32), np.zeros(1, np.float32), FinishReason.LENGTH, t)
        for t, i in texts_and_ids
    ]


@pytest.mark.parametrize(
    "combination, beta_t",
    [(HumanCombination.CONTROL_SHARING, 1.0), (HumanCombination.ACTION_BIASING, 60.0)],
)
def test_the_agent_keeps_what_the_generators_rule_keeps(combination, beta_t):
    """The agent-level held-out figure against hand-computed values: two prompts, K = 2 candidates, G = 1 kept.
    Control sharing at beta_t = 1 (p = 1) and action biasing at beta_t = 60 (P(other) = 1/(1 + e^48) and
    1/(1 + e^60)) keep H-hat's best: prompt 0 "the the great cat" (word:the 2; H-hat 0.5 over -0.5), prompt 1 "dog"
    (0; H-hat 0.9 over 0.1 for "the dog", 1: H-hat is wrong there). The checkpoint's figure is the mean of all
    candidates: (2 + 0)/2 and (0 + 1)/2. H-hat's pair accuracy 1/2 (right on prompt 0, wrong on 1); its
    correlation with the person over (0.5, -0.5, 0.9, 0.1) vs (2, 0, 0, 1): 0.35 / sqrt(1.07 x 2.75) = 0.20404."""
    groups = [completions(("the the great cat", 0), ("a cat", 1)), completions(("dog", 2), ("the dog", 3))]
    view = FakeHhat({0: 0.5, 1: -0.5, 2: 0.9, 3: 0.1})
    agent = Agent(view, combination, beta_t, k=2, now=0.0)
    got = score_held_out(groups, preference("word:the"), samples=1, agent=agent)
    assert got["liked"] == [1.0, 0.5] and got["agent_liked"] == pytest.approx([2.0, 0.0], abs=1e-12)
    assert got["agent_gain"] == pytest.approx([1.0, -0.5], abs=1e-12)
    assert got["hhat_pair_acc"] == 0.5 and got["hhat_corr"] == pytest.approx(0.20404, abs=1e-5)
    # VADER of the kept completions, not of the pool: "the the great cat" is positive, the others neutral (0)
    assert got["vader"][0] > 0 and got["agent_vader"] == pytest.approx([2 * got["vader"][0], 0.0], abs=1e-12)
    # no agent (none, reward shaping, Q-augmentation): the agent is the checkpoint, every completion counts
    plain = score_held_out(groups, preference("word:the"), samples=2, view=view)
    assert plain["agent_liked"] == plain["liked"] == [1.0, 0.5] and plain["hhat_pair_acc"] == 0.5
    # nor an H-hat (a checkpoint before the last, the model before training): the same, gain 0
    bare = score_held_out(groups, preference("word:the"), samples=2)
    assert bare["agent_liked"] == bare["liked"] == [1.0, 0.5] and bare["agent_gain"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="1 x 2 completions"):
        score_held_out([groups[0][:1]], preference("word:the"), samples=1, agent=agent)


@pytest.mark.parametrize("combination", [HumanCombination.CONTROL_SHARING, HumanCombination.ACTION_BIASING])
def test_the_agent_figure_is_the_mean_over_many_draws_of_the_generators_rule(combination):
    """Slow reference: 4000 draws of select_candidates on the same candidates (two prompts, G = 2 slots of
    K = 3, beta_t = 0.8, eligibility 1) average to the exact figure within 4 SE of the draws."""
    texts = ["the the the", "a", "the b", "c", "the the", "d", "e", "the", "the the the the", "f g", "h", "the x"]
    groups = [
        completions(*((t, i) for i, t in enumerate(texts[:6]))),
        completions(*((t, i + 6) for i, t in enumerate(texts[6:]))),
    ]
    view = FakeHhat({i: v for i, v in enumerate([0.9, -0.2, 0.3, 0.1, 0.5, -0.8, 0.0, 0.4, 0.7, -0.3, 0.2, 0.6])})
    likes = preference("word:the")
    got = score_held_out(groups, likes, samples=2, agent=Agent(view, combination, 0.8, k=3, now=0.0))
    rng = np.random.default_rng(0)
    draws = np.array(
        [
            [
                np.mean([likes(c.text) for c in g])
                for g in select_candidates(
                    view, groups, group_size=2, k=3, beta_t=0.8, rng=rng, now=0.0, combination=combination
                )[0]
            ]
            for _ in range(4000)
        ]
    )
    se = draws.std(axis=0, ddof=1) / math.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - got["agent_liked"]) < 4 * se), (draws.mean(axis=0), got)
    # the selection favours "the": above the plain mean of the candidates on both prompts
    assert all(gain > 0.05 for gain in got["agent_gain"])


def test_what_the_person_saw_after_the_first_fit():
    """Scores of rollouts streamed from H-hat's first version on: (0 + 1)/2, SE std(0, 1)/sqrt(2) = 0.5."""
    streamed = [(1.0, 2.0), (2.0, 0.0), (3.0, 1.0)]
    assert streamed_after(streamed, 2.0) == {"streamed_liked": 0.5, "streamed_liked_se": 0.5, "streamed_n": 2}
    assert math.isnan(streamed_after(streamed, None)["streamed_liked"])


def test_how_many_labels_hhat_needs(tmp_path):
    """H-hat's learning curve from two runs' label databases, each fit on its first n labels and measured on the
    other's rollouts. Feature x = the number of "the" in the text (D = 1), ratings +1 when x >= 2: the service's
    fit finds w > 0 from 4 labels, so on the other database H-hat is linear in x = the person's score:
    correlation 1 and every pair of one group ordered right."""
    from bench.feedback import hhat_learning_curve
    from services.feedback.store import LabelStore
    from tests.feedback_support import scored

    paths = []
    for run in range(2):
        store = LabelStore(tmp_path / f"run{run}.sqlite3")
        store.add_labeller("person")
        for i, count in enumerate([0, 1, 2, 3]):
            rollout = scored(f"r{run}-{i}", group=f"g{run}", completion=" ".join(["the"] * count + ["film"]))
            store.add_label(
                labeller="person",
                kind="rating",
                scored=rollout,
                value=1 if count >= 2 else -1,
                model_version=0,
                seen_at=float(i),
            )
            store.set_features({rollout.rollout.rollout_id: np.array([count], np.float32)})
        store.close()
        paths.append(tmp_path / f"run{run}.sqlite3")
    curve = hhat_learning_curve(paths, preference("word:the"), [2, 4, 8])
    assert [c["labels"] for c in curve] == [2, 4]  # no database holds 8 labels
    assert curve[1] == {"labels": 4, "corr": pytest.approx(1.0), "pair_acc": 1.0, "fits": 2}
    with pytest.raises(ValueError, match="two or more"):
        hhat_learning_curve(paths[:1], preference("word:the"), [4])


def test_a_token_that_starts_with_a_dash_reaches_the_labeller(tmp_path, monkeypatch):
    """A labeller token is base64url and may start with "-" (1 in 32): passed as "--token TOKEN", argparse took
    it for an option and the person never started (a bench run with 0 labels). With --token=TOKEN the person
    runs (here for 0 s against a page nobody serves) and prints its counts."""
    import streamrl.testing as testing

    monkeypatch.setattr(testing, "add_labeller", lambda config, name, *args: "-Ab_c")
    token, proc = testing.start_simulated_labeller(
        tmp_path / "run.toml", f"http://127.0.0.1:{testing.free_port()}", ["--duration", "0"]
    )
    out, _ = proc.communicate(timeout=120)
    assert token == "-Ab_c" and proc.returncode == 0 and json.loads(out)["rating"] == 0
