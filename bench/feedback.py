"""People in the loop on SmolLM2: the four TAMER+RL combinations vs no feedback, at equal wall time and label
budget.

The environment reward is VADER's compound score (the default job). A simulated labeller (``python -m
streamrl.services.feedback.simulate``, HTTP API only) likes a property VADER ignores: ``--likes`` (default
``char:o``: the fraction of the letter ``o`` in the completion), and is a person, not an oracle:
``--attention`` (fraction of rollouts looked at), ``--delay-min``/``--delay-max`` (seconds from a rollout
appearing to its label), ``--noise`` (fraction of labels flipped), ``--threshold`` (fixed rating threshold),
at most ``--max-labels`` labels per run (the equal label budget); ``--credit-delay-min``/``--credit-delay-max``
set the service's TAMER credit window. Arms: ``none``, ``reward_shaping``, ``q_augmentation``,
``action_biasing``, ``control_sharing``, each run once per ``--seeds`` seed (``run.seed``; the labeller's
draws too). Each arm runs the five services (learner, buffer, scorer, generator and the feedback service, plus
the labeller) from the same config (``deploy/configs/default.toml`` with the overrides below) for
``--seconds`` of wall time after the learner's first step, then the learner is stopped (SIGTERM: it
checkpoints); with ``--steps N`` instead every arm trains exactly N learner steps (the learner stops itself;
equal training, unequal wall time, which is recorded: on a machine shared with other work equal wall time
gives unequal training), and every checkpoint (``--eval-every``) is evaluated for the curve. Then the last
checkpoint is evaluated on held-out prompts: ``--samples`` x ``--candidates`` completions of each of
``--prompts`` held-out prompts, VADER and the labeller's property per completion, mean and standard error over
prompts (completions of one prompt are correlated): the *checkpoint alone*; and the *agent*: for
``action_biasing`` / ``control_sharing`` the generators' own rule
(:func:`~streamrl.services.generator.control.select_candidates`) keeps ``--samples`` of each prompt's
completions, ``--candidates`` = K per kept one, with the last H-hat version the generators received (the bench
subscribes to ``endpoints.human_model`` as they do) and the final beta_t (Knox & Stone 2010 report the agent
for action biasing: H-hat acts on action selection, the learner's update is exact); for the other arms the
agent is the checkpoint. Every arm, ``none`` included (``feedback.combination = "none"``: labels and H-hat
collected, used nowhere), runs the feedback service and the person, so the bench also reports the person's own
score of the rollouts the page streamed from H-hat's first version on (what the person saw) and how well the
final H-hat ranks the person's taste on the held-out completions (Pearson correlation, pair accuracy);
``--hhat-curve`` measures that against the number of labels from copies of the runs' label databases. Figures
per arm: learner steps, labels used, both rewards +- SE, the delay from a label to the first H-hat version
that includes it (``streamrl_feedback_label_to_model_seconds``, mean), and the delay from the first label to
the first learner step whose batch H-hat influenced (shaped reward or H-hat's pick kept). Across seeds: the
mean of the per-run held-out means and its standard error, and each arm's difference from ``none`` in units of
that SE.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.feedback --seconds 240
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch

from bench.report import REPO, RESULTS_DIR, command_line, environment, environment_line, markdown_table, write_results
from streamrl.common.config import load_config
from streamrl.common.human import HumanModelSubscription, HumanModelView, beta_at
from streamrl.common.messages import SamplingParams
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.models import configure_torch, load_causal_lm, load_tokenizer, resolve_model_path
from streamrl.common.modes import HumanCombination
from streamrl.evaluation import held_out_prompts
from streamrl.services.feedback.simulate import preference
from streamrl.services.generator.control import candidate_law
from streamrl.services.generator.sampling import Completion, prepare_run_prompts, sample_completions
from streamrl.services.scorer.rewards import vader_sentiment
from streamrl.testing import Services, answers, free_port, scrape, start_simulated_labeller, wait_until

ARMS = ("none", "reward_shaping", "q_augmentation", "action_biasing", "control_sharing")
CONFIG = REPO / "deploy" / "configs" / "default.toml"


def arm_overrides(workdir: Path, arm: str, args, seed: int = 0) -> tuple[list[str], dict]:
    """`--set` overrides of one arm: fresh loopback ports, output under ``workdir``; the ports used."""
    ports = {k: free_port() for k in ("generator", "scorer", "buffer", "learner", "feedback", "http")}
    values: dict = {
        "run.output_dir": str(workdir / "run"),
        "run.seed": seed,
        "generator.prompts.split_seed": args.split_seed,  # one held-out set for every arm and seed
        **({"generator.prompts.eval_fraction": args.eval_fraction} if args.eval_fraction is not None else {}),
        "learner.total_steps": args.steps or 100000,
        "learner.checkpoint_every": args.eval_every or args.steps or 100000,
        "learner.lr": args.lr,
        "learner.groups_per_step": 2,
        "generator.max_new_tokens": args.max_new_tokens,
        **({"generator.engine": args.engine} if args.engine else {}),
        "endpoints.scorers": [f"tcp://127.0.0.1:{free_port()}"],
        **{
            f"endpoints.{k}": f"tcp://127.0.0.1:{free_port()}"
            for k in ("buffer", "batches", "weights_announce", "weights", "feedback", "human_model")
        },
        **{f"metrics.{k}_port": ports[k] for k in ("generator", "scorer", "buffer", "learner", "feedback")},
    }
    # every arm, `none` included (combination "none": labels and H-hat are collected and used nowhere), runs the
    # feedback service and the person: equal label budget and load, and every arm's stream is watched
    values.update(
        {
            "feedback.enabled": True,
            "feedback.combination": arm,
            "feedback.http_port": ports["http"],
            "feedback.beta": args.beta,
            "feedback.beta_decay": args.beta_decay,
            "feedback.candidates": args.candidates,
            "feedback.min_labels": args.min_labels,
            "feedback.credit_delay_min_s": args.credit_delay_min,
            "feedback.credit_delay_max_s": args.credit_delay_max,
            "feedback.label_rate_per_s": max(5.0, 2 * args.labels_per_second),
        }
    )
    return [f"{k}={json.dumps(v)}" for k, v in values.items()], ports


def arm_config(workdir: Path, arm: str, args, seed: int) -> tuple[Path, list[str], dict]:
    """The default job's config under ``workdir`` (prompt paths made absolute), its ``--set`` arguments, ports."""
    overrides, ports = arm_overrides(workdir, arm, args, seed)
    config = workdir / "run.toml"
    config.write_text(CONFIG.read_text().replace('path = "../prompts/', f'path = "{CONFIG.parent.parent}/prompts/'))
    return config, [a for o in overrides for a in ("--set", o)], ports


def evaluate_base(args, workdir: Path, seed: int) -> dict:
    """Held-out figures of the model before training (step 0 of every arm's curve), on seed ``seed``'s split."""
    config, set_args, _ = arm_config(workdir, "none", args, seed)
    cfg = load_config(config, [o for o in set_args if o != "--set"])
    return {"step": 0, **evaluate(args, config, set_args, resolve_model_path(cfg.model.path, cfg.model.cache_path))}


def person_args(args, seed: int) -> list[str]:
    """The simulated person's command-line options (taste, attention, delay, noise, budget, seed)."""
    out = [
        "--likes",
        args.likes,
        "--labels-per-second",
        str(args.labels_per_second),
        "--attention",
        str(args.attention),
        "--delay-min",
        str(args.delay_min),
        "--delay-max",
        str(args.delay_max),
        "--noise",
        str(args.noise),
        "--seed",
        str(seed),
    ]
    if args.threshold is not None:
        out += ["--threshold", str(args.threshold)]
    if args.max_labels is not None:
        out += ["--max-labels", str(args.max_labels)]
    return out


class Watch(threading.Thread):
    """What the bench sees during one run, from the outside, every second until :meth:`finish`: the H-hat
    versions the feedback service publishes (a SUB on ``endpoints.human_model``, the socket and
    :class:`~streamrl.common.human.HumanModelView` the generators use, so ``view`` ends as the version the
    generators last received), and the rollouts the page streams (``GET /api/rollouts``, as the person reads
    them): per rollout, the Unix seconds it arrived and the person's own score of it.

    Args:
        cfg: the run's config.
        url: the feedback page.
        token: a labeller's bearer token.
        likes: the person's taste (:func:`~streamrl.services.feedback.simulate.preference`).
    """

    def __init__(self, cfg, url: str, token: str, likes):
        super().__init__(daemon=True)
        import zmq

        self.context = zmq.Context()
        self.human = HumanModelSubscription(self.context, cfg, ServiceMetrics("bench", "bench-0"))
        self.url, self.likes = url, likes
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.cursor = 0
        self.streamed: list[tuple[float, float]] = []  # (seen_at Unix s, the person's score)
        self.done = threading.Event()

    def _once(self) -> None:
        self.human.receive()
        try:
            while True:
                response = self.session.get(f"{self.url}/api/rollouts?after={self.cursor}&limit=500", timeout=10)
                response.raise_for_status()
                data = response.json()
                self.streamed += [(r["seen_at"], self.likes(r["completion"])) for r in data["rollouts"]]
                self.cursor = data["cursor"]
                if len(data["rollouts"]) < 500:
                    return
        except requests.RequestException:
            return  # the service is busy or restarting: the next second's poll catches up (it keeps 2000)

    def run(self) -> None:
        while not self.done.wait(1.0):
            self._once()

    def finish(self) -> HumanModelView:
        """Stop watching (after one last look); the newest H-hat received."""
        self.done.set()
        self.join(30)
        self._once()
        self.human.close()
        self.context.term()
        return self.human.view


def streamed_after(streamed: list[tuple[float, float]], since: float | None) -> dict:
    """The person's mean score (and its SE over rollouts) of the rollouts streamed at or after ``since`` (the
    first H-hat version; None: none was fit), and how many."""
    scores = np.array([score for seen_at, score in streamed if since is not None and seen_at >= since])
    if len(scores) < 2:
        return {"streamed_liked": math.nan, "streamed_liked_se": math.nan, "streamed_n": int(len(scores))}
    return {
        "streamed_liked": float(scores.mean()),
        "streamed_liked_se": float(scores.std(ddof=1) / math.sqrt(len(scores))),
        "streamed_n": int(len(scores)),
    }


@dataclass
class Agent:
    """How the generators of an action-selection arm choose at the end of the run: H-hat (``view``), beta_t
    and K; ``combination`` is ``action_biasing`` or ``control_sharing``; ``now`` the eligibility's clock."""

    view: HumanModelView | object
    combination: HumanCombination
    beta_t: float
    k: int
    now: float


def run_arm(arm: str, args, workdir: Path, seed: int = 0) -> dict:
    """Run one arm (``args.steps`` learner steps, else ``args.seconds`` after the first step); returns its figures."""
    config, set_args, ports = arm_config(workdir, arm, args, seed)
    cfg = load_config(config, [o for o in set_args if o != "--set"])
    procs = Services(config, workdir)
    for name in ("learner", "buffer", "scorer", "generator", "feedback"):
        procs.start(name, 0, *set_args)
    metrics_jsonl = workdir / "run" / "metrics.jsonl"
    labeller, watch = None, None
    result: dict = {"arm": arm, "seed": seed}
    try:
        url = f"http://127.0.0.1:{ports['http']}"
        if not wait_until(lambda: answers(url + "/healthz"), 600):
            raise RuntimeError(f"feedback service did not start\n{procs.logs()}")
        person = [
            *person_args(args, seed),
            "--duration",
            str((args.step_timeout if args.steps else args.seconds) + 600),
        ]
        token, labeller = start_simulated_labeller(config, url, person, *set_args)
        watch = Watch(cfg, url, token, preference(args.likes))
        watch.start()
        if not wait_until(lambda: metrics_jsonl.exists() and metrics_jsonl.read_text().strip(), 900):
            raise RuntimeError(f"no learner step\n{procs.logs()}")
        started = time.time()
        if args.steps:  # equal learner steps: the learner stops itself at learner.total_steps (and checkpoints)
            learner = procs.procs["learner-0"]
            if not wait_until(lambda: learner.poll() is not None, args.step_timeout) or learner.returncode != 0:
                raise RuntimeError(f"learner did not finish {args.steps} steps\n{procs.logs()}")
        else:
            time.sleep(args.seconds)
        feedback = scrape(ports["feedback"])
        count = feedback.get("streamrl_feedback_label_to_model_seconds_count", 0)
        result["label_to_model_s"] = (
            feedback.get("streamrl_feedback_label_to_model_seconds_sum", 0) / count if count else math.nan
        )
        view = watch.finish()
        watch_ended = time.time()
        if procs.procs["learner-0"].poll() is None:
            procs.stop("learner-0", signal.SIGTERM, timeout=300)
        records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
        result["steps"] = len(records)
        result["steps_in_window"] = sum(r["time"] >= started for r in records)
        result["wall_s"] = records[-1]["time"] - records[0]["time"]  # first to last learner step
        result["load_1min"] = os.getloadavg()[0]
        result["weight_max"] = max((r.get("human/weight_max", 1.0) for r in records), default=1.0)  # of 1/rho
        with sqlite3.connect(workdir / "run" / "feedback" / "labels.sqlite3") as con:
            result["labels"] = con.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
            first_label = con.execute("SELECT MIN(created_at) FROM labels").fetchone()[0]
            first_model = con.execute("SELECT MIN(created_at) FROM models").fetchone()[0]
            result["hhat_labels"] = (con.execute("SELECT MAX(labels) FROM models").fetchone()[0]) or 0
        result["hhat_version"] = view.version
        result.update(streamed_after(watch.streamed, first_model))
        influenced = [
            r["time"]
            for r in records
            if r.get("human/shaped_fraction", 0) > 0 or r.get("human/by_model_fraction", 0) > 0
        ]
        result["first_label_to_influenced_step_s"] = (
            min(influenced) - first_label if influenced and first_label else math.nan
        )
    finally:
        if watch is not None and not watch.done.is_set():
            watch.finish()
        if labeller is not None:
            labeller.terminate()
            labeller.wait(30)
        procs.close()
    checkpoints = sorted((workdir / "run" / "checkpoints").glob("step-*"))
    final_version = int(checkpoints[-1].name.split("-")[1])
    agent = None
    if cfg.feedback.combination.selects_candidates and view.message is not None:
        # the generators' rule at the end of the run: beta_t of the final policy version, the last H-hat
        beta_t = beta_at(args.beta, args.beta_decay, final_version)
        agent = Agent(view, cfg.feedback.combination, beta_t, args.candidates, watch_ended)
        result["agent_beta_t"] = beta_t
    hhat = view if view.message is not None else None
    result.update(evaluate(args, config, set_args, checkpoints[-1] / "model", agent=agent, view=hhat))
    if args.steps:  # the held-out curve: every checkpoint before the last one too
        result["curve"] = [
            {"step": int(c.name.split("-")[1]), **evaluate(args, config, set_args, c / "model")}
            for c in checkpoints[:-1]
        ] + [{"step": final_version, **{k: result[k] for k in ("liked", "liked_se", "agent_liked", "agent_liked_se")}}]
    return result


def hhat_agreement(values: np.ndarray, person: np.ndarray, groups: list) -> tuple[float, float]:
    """How well H-hat ranks the person's taste over the same rollouts.

    Args:
        values: ``[N]`` H-hat's values.
        person: ``[N]`` the person's scores.
        groups: ``[N]`` group keys; pairs are compared only within a group (the same prompt).

    Returns:
        ``(corr, pair_acc)``: Pearson correlation of ``values`` with ``person`` (0 when either is constant),
        and the fraction of same-group pairs the person scores differently that H-hat orders the same way
        (an H-hat tie counts one half; NaN without such pairs).
    """
    corr = float(np.corrcoef(values, person)[0, 1]) if values.std() > 0 and person.std() > 0 else 0.0
    keys = np.asarray(groups)
    agree = pairs = 0.0
    for key in dict.fromkeys(groups):
        members = np.flatnonzero(keys == key)
        dp = np.sign(person[members, None] - person[None, members])
        dv = np.sign(values[members, None] - values[None, members])
        upper = np.triu(dp != 0, k=1)
        pairs += upper.sum()
        agree += ((dv == dp) + 0.5 * (dv == 0))[upper].sum()
    return corr, float(agree / pairs) if pairs else math.nan


def score_held_out(
    groups: list[list[Completion]],
    likes,
    *,
    samples: int,
    view=None,
    agent: Agent | None = None,
) -> dict:
    """Per held-out prompt, the checkpoint's and the agent's figures.

    Args:
        groups: per prompt, ``samples * K`` completions of the checkpoint (K = ``agent.k``, else 1).
        likes: the person's taste, text -> float.
        samples: completions per prompt the agent keeps (G).
        view: an H-hat (``score(prompts, completions, now) -> (values, eligibilities)``, ``version``) to measure
            against the person's taste, or None.
        agent: the action-selection rule with ``agent.view`` (the generators'
            :func:`~streamrl.services.generator.control.select_candidates`), or None: the agent is the checkpoint.

    Returns:
        ``liked``, ``vader``: ``[prompts]`` lists, the mean over every completion (all are the checkpoint's
        samples); ``agent_liked``, ``agent_vader``: the expected mean over the G kept of each prompt's ``G * K``
        (each slot's scores weighted by the law the generators' rule draws from,
        :func:`~streamrl.services.generator.control.candidate_law`: the average over infinitely many draws of
        ``select_candidates`` on these candidates, so the selection adds no sampling noise); ``agent_gain``:
        ``agent_liked - liked``, what the selection adds on the same candidates; and,
        with an H-hat, ``hhat_corr`` (Pearson correlation of H-hat with the person's score over all
        completions) and ``hhat_pair_acc`` (fraction of same-prompt pairs the person scores differently that
        H-hat orders the same way; ties count one half).

    Raises:
        ValueError: a prompt without ``samples * K`` completions.
    """
    k = agent.k if agent is not None else 1
    if any(len(g) != samples * k for g in groups):
        raise ValueError(f"score_held_out: every prompt needs {samples} x {k} completions")
    scores = [np.array([likes(c.text) for c in g], np.float64) for g in groups]
    vader = [np.array(vader_sentiment([""] * len(g), [c.text for c in g], [{}] * len(g)), np.float64) for g in groups]
    out: dict = {"liked": [float(s.mean()) for s in scores], "vader": [float(v.mean()) for v in vader]}
    out["agent_liked"], out["agent_vader"] = out["liked"], out["vader"]
    out["agent_gain"] = [0.0] * len(groups)
    if agent is not None:
        view = agent.view
    if view is None:
        return out
    flat = [c for g in groups for c in g]
    values, eligibilities = view.score(
        [c.prompt_tokens for c in flat], [c.completion_tokens for c in flat], agent.now if agent else time.time()
    )
    person = np.concatenate(scores)
    prompt_of = [i for i, g in enumerate(groups) for _ in g]
    out["hhat_corr"], out["hhat_pair_acc"] = hhat_agreement(np.asarray(values, np.float64), person, prompt_of)
    if agent is not None:
        values, eligibilities, all_vader = np.asarray(values), np.asarray(eligibilities), np.concatenate(vader)
        # slot j of a prompt holds candidates [j K, (j + 1) K) of that prompt (select_candidates' layout)
        laws = [
            candidate_law(agent.combination, values[s : s + k], eligibilities[s : s + k], agent.beta_t)
            for s in range(0, len(flat), k)
        ]
        slot_liked = np.array([law @ person[i * k : (i + 1) * k] for i, law in enumerate(laws)])
        slot_vader = np.array([law @ all_vader[i * k : (i + 1) * k] for i, law in enumerate(laws)])
        out["agent_liked"] = [float(x) for x in slot_liked.reshape(len(groups), samples).mean(axis=1)]
        out["agent_vader"] = [float(x) for x in slot_vader.reshape(len(groups), samples).mean(axis=1)]
        out["agent_gain"] = [a - c for a, c in zip(out["agent_liked"], out["liked"], strict=True)]
    return out


def evaluate(args, config: Path, set_args: list[str], model_dir: Path, agent: Agent | None = None, view=None) -> dict:
    """VADER and the person's score of held-out completions, mean and SE over prompts: of the checkpoint alone
    (``liked``, ``vader``) and of the agent (``agent_liked``, ``agent_vader``: the checkpoint plus H-hat's
    action selection, :func:`score_held_out`; the same figures when ``agent`` is None); with an H-hat
    (``view``), also how well it ranks the person's taste on these completions."""
    cfg = load_config(config, [o for o in set_args if o != "--set"])
    configure_torch(2, seed=1234)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path, cfg.model.cache_path))
    model = load_causal_lm(str(model_dir), device=torch.device("cpu")).eval()
    prompts = held_out_prompts(cfg, args.prompts)
    sampling = SamplingParams(
        temperature=cfg.generator.temperature, top_p=cfg.generator.top_p, max_new_tokens=cfg.generator.max_new_tokens
    )
    # the last checkpoint of every arm: samples x K completions per prompt (the agent's candidates, or as many
    # samples of the checkpoint alone), so that the checkpoint's figure is equally precise in every arm
    per_prompt_samples = args.samples * args.candidates if view is not None or agent is not None else args.samples
    groups: list[list[Completion]] = []
    for start in range(0, len(prompts), 8):
        _, ids = prepare_run_prompts(tokenizer, prompts[start : start + 8], cfg)
        groups += sample_completions(model, tokenizer, ids, group_size=per_prompt_samples, sampling=sampling)
    samples = args.samples if agent is not None else per_prompt_samples
    per_prompt = score_held_out(groups, preference(args.likes), samples=samples, view=view, agent=agent)

    def mean_se(values):
        values = np.array(values)
        return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))

    out: dict = {"eval_prompts": len(prompts)}
    for key in ("vader", "liked", "agent_vader", "agent_liked", "agent_gain"):
        out[key], out[f"{key}_se"] = mean_se(per_prompt[key])
    out.update({k: per_prompt[k] for k in ("hhat_corr", "hhat_pair_acc") if k in per_prompt})
    return out


def across_seeds(results: list[dict], key: str) -> dict[str, tuple[float, float, int]]:
    """Per arm: (mean over seeds of ``key``, its standard error across seeds, seeds)."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        values = np.array([r[key] for r in results if r["arm"] == arm], dtype=np.float64)
        se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        out[arm] = (float(values.mean()), se, len(values))
    return out


def plot_curve(results: list[dict], args, path: Path) -> None:
    """Left: held-out preference score (mean +- SE across seeds) against learner step, one line per arm (the
    checkpoint alone), and a star at the last step for the agent of an action-selection arm. Right: each seed's
    last-step figures (checkpoint: circles; agent of an action-selection arm: stars), so the spread behind the
    SE shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, by_seed) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    arms = list(dict.fromkeys(r["arm"] for r in results))
    for n, arm in enumerate(arms):
        mine = [r for r in results if r["arm"] == arm]
        runs = [r["curve"] for r in mine]
        steps = [p["step"] for p in runs[0]]
        values = np.array([[p["liked"] for p in curve] for curve in runs])
        se = values.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros(len(steps))
        line = ax.errorbar(steps, values.mean(axis=0), yerr=se, capsize=3, marker="o", label=f"{arm}: checkpoint")
        color = line[0].get_color()
        agent = np.array([curve[-1].get("agent_liked", curve[-1]["liked"]) for curve in runs])
        selects = not np.allclose(agent, values[:, -1])  # an action-selection arm: the agent at the last step
        if selects:
            agent_se = agent.std(ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0.0
            ax.errorbar(
                [steps[-1] + 0.15],
                [agent.mean()],
                yerr=[agent_se],
                capsize=3,
                marker="*",
                markersize=11,
                linestyle="none",
                color=color,
                label=f"{arm}: agent (checkpoint + H-hat's selection)",
            )
        seeds = np.array([r["seed"] for r in mine], np.float64) + 0.12 * (n - (len(arms) - 1) / 2)
        by_seed.plot(seeds, values[:, -1], "o", color=color, label=f"{arm}: checkpoint")
        if selects:
            by_seed.plot(seeds, agent, "*", markersize=11, color=color, label=f"{arm}: agent")
    all_steps = sorted({p["step"] for r in results for p in r["curve"]})
    ax.set_xticks(all_steps)
    ax.set_xlim(all_steps[0] - 0.5, all_steps[-1] + 0.5)
    ax.set_xlabel("learner step")
    ax.set_ylabel(f"held-out {args.likes} (simulated person's score)")
    ax.set_title(f"SmolLM2-135M, {len(runs)} seeds, mean ± SE across seeds", fontsize=10)
    ax.legend(fontsize=8)
    by_seed.set_xlabel("seed")
    by_seed.set_xticks(sorted({r["seed"] for r in results}))
    by_seed.set_title("each seed, last step", fontsize=10)
    by_seed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hhat_learning_curve(databases: list[Path], likes, sizes: list[int], l2: float = 0.01) -> list[dict]:
    """How many labels H-hat needs to rank the person's taste: for each run's label database (copies of
    ``<run>/feedback/labels.sqlite3``), H-hat fit (:func:`~streamrl.services.feedback.hhat.fit_head`, the
    service's own fit) on its first n labels, n in ``sizes`` (and all of them), measured on the labelled rollouts
    of the *other* databases (other seeds' runs: rollouts it never saw) against the person's score of their
    text. Per n: mean over databases of the Pearson correlation and of the pair accuracy within groups (pairs
    the person scores differently, ordered the same way; :func:`hhat_agreement`), and the number of databases.

    Raises:
        ValueError: fewer than two databases.
    """
    from streamrl.services.feedback.hhat import fit_head
    from streamrl.services.feedback.store import LabelStore

    if len(databases) < 2:
        raise ValueError("hhat_learning_curve: needs two or more databases (one to fit, the others to measure)")
    labels, pools = [], []
    for path in databases:
        store = LabelStore(path)
        labels.append(store.training_labels(1_000_000))
        store.close()
        with sqlite3.connect(path) as con:
            rows = con.execute("SELECT group_id, completion_text, features FROM rollouts WHERE features IS NOT NULL")
            rows = rows.fetchall()
        pools.append(
            (
                [g for g, _, _ in rows],
                np.array([likes(t) for _, t, _ in rows], np.float64),
                np.stack([np.frombuffer(f, "<f4") for _, _, f in rows]) if rows else np.zeros((0, 1)),
            )
        )
    curve = []
    for n in sorted({*sizes, max(len(rows) for rows in labels)}):
        corr, acc = [], []
        for i, rows in enumerate(labels):
            if len(rows) < n:
                continue
            head, _ = fit_head(rows[:n], l2=l2)
            for j, (groups, person, features) in enumerate(pools):
                if j == i or len(person) < 3:
                    continue
                r, pair_acc = hhat_agreement(np.asarray(head.raw(features), np.float64), person, groups)
                corr.append(r)
                if not math.isnan(pair_acc):
                    acc.append(pair_acc)
        if corr:
            curve.append(
                {"labels": n, "corr": float(np.mean(corr)), "pair_acc": float(np.mean(acc)), "fits": len(corr)}
            )
    return curve


def paired(results: list[dict], arm: str, key: str) -> tuple[float, float, list[float]]:
    """Mean over seeds of (arm - none) in ``key`` on the same seed (same held-out split), its SE across seeds,
    and the per-seed differences."""
    by_seed = {r["seed"]: r[key] for r in results if r["arm"] == "none"}
    diffs = np.array([r[key] - by_seed[r["seed"]] for r in results if r["arm"] == arm and r["seed"] in by_seed])
    se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
    return (float(diffs.mean()) if len(diffs) else math.nan), se, [float(d) for d in diffs]


def summary(results: list[dict], args, arms: list[str], env: dict) -> str:
    """The RESULTS.md section of ``results`` (per-run JSON lines): the across-seed table (ranked by the agent's
    held-out score), the per-seed table and the plot (written to ``RESULTS_DIR/feedback.png``)."""
    agent, checkpoint = across_seeds(results, "agent_liked"), across_seeds(results, "liked")
    vader, streamed = across_seeds(results, "agent_vader"), across_seeds(results, "streamed_liked")

    def versus_none(arm: str, key: str) -> str:
        table = across_seeds(results, key)
        if "none" not in table or arm == "none":
            return ""
        diff = table[arm][0] - table["none"][0]
        se = math.sqrt(table[arm][1] ** 2 + table["none"][1] ** 2)
        pd, pse, _ = paired(results, arm, key)
        return (f"{diff:+.3f} ({diff / se:+.1f} SE)" if se > 0 else f"{diff:+.3f}") + (
            f"; paired {pd:+.3f} ({pd / pse:+.1f} SE)" if pse > 0 else ""
        )

    gain = across_seeds(results, "agent_gain")

    def selection_gain(arm: str) -> str:
        if not any(r["agent_gain"] for r in results if r["arm"] == arm):  # the agent is the checkpoint
            return ""
        mean, se, _ = gain[arm]
        return f"{mean:+.3f} ± {se:.3f}" + (f" ({mean / se:+.1f} SE)" if se > 0 else "")

    def mean(arm: str, key: str) -> float:
        return float(np.mean([r.get(key, math.nan) for r in results if r["arm"] == arm]))

    ranked = sorted(agent, key=lambda a: -agent[a][0])
    rows = [
        [
            arm,
            agent[arm][2],
            f"{agent[arm][0]:.3f} ± {agent[arm][1]:.3f}",
            versus_none(arm, "agent_liked"),
            selection_gain(arm),
            f"{checkpoint[arm][0]:.3f} ± {checkpoint[arm][1]:.3f}",
            versus_none(arm, "liked"),
            f"{streamed[arm][0]:.3f} ± {streamed[arm][1]:.3f}",
            versus_none(arm, "streamed_liked"),
            f"{mean(arm, 'hhat_corr'):+.2f} / {mean(arm, 'hhat_pair_acc'):.2f}",
            f"{vader[arm][0]:.3f} ± {vader[arm][1]:.3f}",
            f"{vader[arm][0] - vader['none'][0]:+.3f}" if "none" in vader and arm != "none" else "",
            round(mean(arm, "steps"), 1),
            round(mean(arm, "labels"), 1),
            round(mean(arm, "wall_s")),
        ]
        for arm in ranked
    ]
    table = markdown_table(
        [
            "arm (best agent first)",
            "seeds",
            f"agent: held-out {args.likes} ± SE (seeds)",
            "agent vs none",
            "agent vs its own checkpoint (same candidates) ± SE (seeds)",
            "checkpoint alone ± SE",
            "checkpoint vs none",
            "streamed after H-hat's first fit ± SE",
            "streamed vs none",
            "H-hat corr / pair acc (held-out)",
            "agent VADER ± SE",
            "VADER cost vs none",
            "learner steps",
            "labels",
            "learner wall s",
        ],
        rows,
    )
    per_seed = markdown_table(
        [
            "seed",
            "arm",
            "checkpoint ± SE (prompts)",
            "agent ± SE (prompts)",
            "agent - checkpoint ± SE (prompts)",
            "streamed (rollouts)",
            "H-hat corr / pair acc",
            "labels (H-hat's)",
            "final beta_t",
            "max 1/rho",
            "load (1 min)",
        ],
        [
            [
                r["seed"],
                r["arm"],
                f"{r['liked']:.3f} ± {r.get('liked_se', math.nan):.3f}",
                f"{r['agent_liked']:.3f} ± {r['agent_liked_se']:.3f}",
                f"{r['agent_gain']:+.3f} ± {r['agent_gain_se']:.3f}" if r.get("agent_gain") else "",
                f"{r['streamed_liked']:.3f} ({r.get('streamed_n', 0)})",
                f"{r.get('hhat_corr', math.nan):+.2f} / {r.get('hhat_pair_acc', math.nan):.2f}",
                f"{r['labels']} ({r.get('hhat_labels', '')})",
                f"{r['agent_beta_t']:.2f}" if "agent_beta_t" in r else "",
                f"{r['weight_max']:.1f}" if "weight_max" in r else "",
                f"{r.get('load_1min', math.nan):.1f}",
            ]
            for r in sorted(results, key=lambda r: (r["seed"], arms.index(r["arm"])))
        ],
    )
    person = (
        f"looks at {args.attention:.0%} of rollouts, labels {args.delay_min:g}-{args.delay_max:g} s after "
        f"they appear, flips {args.noise:.0%}, at most {args.labels_per_second:g} labels/s"
        + (f" and {args.max_labels} labels" if args.max_labels else "")
        + (f", rating threshold {args.threshold:g}" if args.threshold is not None else "")
    )
    budget_line = (
        f"Equal learner steps per run ({args.steps}, wall time recorded per run: the machine was shared, so "
        "equal wall time would have meant unequal training)"
        if args.steps
        else f"Equal wall time per run ({args.seconds:.0f} s after the learner's first step)"
    )
    counts = sorted({r["eval_prompts"] for r in results})
    held_out = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    plot = ""
    if args.steps and all(r.get("curve") for r in results):
        plot_curve(results, args, RESULTS_DIR / "feedback.png")
        plot = f"\n![held-out {args.likes} vs learner step per arm](results/feedback.png)\n"
    return f"""## People in the loop: the four TAMER+RL combinations on SmolLM2

`{command_line()}`

{budget_line}, VADER as the environment
reward, a simulated person (HTTP API only; ratings and pairwise picks alternating) who likes `{args.likes}`,
which VADER ignores, and {person}; credit window {args.credit_delay_min:g}-{args.credit_delay_max:g} s;
beta = {args.beta:g} (importance weights 1/rho <= exp(2 beta_t) under action biasing), decay
{args.beta_decay:g} per step, K = {args.candidates} candidates (action biasing, control sharing), lr {args.lr:g},
{args.max_new_tokens} new tokens. Every arm, `none` included, runs the feedback service and the person (same
label budget; under `none` H-hat is fit and used nowhere). Held-out: the same {held_out} prompts for every run
(`generator.prompts.split_seed = {getattr(args, "split_seed", None)}`: no run trained on them) of each run's
last checkpoint, scored by the person's own taste; mean and SE across seeds {args.seeds}.
First (agent): {ranked[0]}.

Which figure is which: **checkpoint alone** = {args.samples * args.candidates} completions per prompt sampled
from the last checkpoint, nothing else. **agent** = what the run's generators would emit at the end: for
`action_biasing`/`control_sharing`, K = {args.candidates} candidates from the checkpoint per kept completion
({args.samples} kept per prompt, the same candidates as the checkpoint figure), one kept by the generators' own
rule (`services/generator/control.py`, `select_candidates`) with the last H-hat version the generators received
and the final beta_t, averaged exactly over that rule's law (`candidate_law`), so the selection adds no sampling
noise of its own; for the other arms the agent is the checkpoint. The agent figure is the one Knox & Stone
(2010) report for action biasing: there H-hat acts on action selection only and the learner's update is left
alone (here exactly: weighted by 1/rho), so its effect is in what the agent does, not in the checkpoint.
**agent vs its own checkpoint**: the agent minus the checkpoint on the same candidates of the same run, what
H-hat's selection adds, free of the seed-to-seed spread of training (under `action_biasing` the learner's
gradient is exact, so the checkpoint differs from `none`'s only by that spread).
**streamed** = the person's own score of the rollouts the page streamed from H-hat's first version to the
end of training (what the person saw). **H-hat corr / pair acc**: the final H-hat against the person's score
on the held-out completions (Pearson; fraction of same-prompt pairs the person tells apart that H-hat orders
the same way).

{table}

Per seed:

{per_seed}
{plot}
{environment_line(env)}
"""


def feed_overhead(n: int = 20000) -> dict:
    """Seconds per scored rollout a scorer spends publishing it on the feed (encode + PUB send), with nobody
    subscribed and with a subscriber draining it, next to the seconds VADER takes to score one."""
    import threading

    import zmq

    from streamrl.common.messages import FinishReason, Rollout, ScoredRollout
    from streamrl.common.transport import make_socket, try_send

    rollout = Rollout(
        prompt_id="p",
        group_id="g",
        rollout_id="g:0",
        generator_id="generator-0",
        group_size=4,
        prompt_tokens=np.arange(64, dtype=np.int32),
        completion_tokens=np.arange(32, dtype=np.int32),
        behaviour_logprobs=np.full(32, -1.5, np.float32),
        policy_version=3,
        finish_reason=FinishReason.LENGTH,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32),
        prompt_text="This movie was one of the " * 4,
        completion_text="best films I have seen " * 6,
    )
    scored = ScoredRollout(rollout=rollout, reward=0.5, reward_parts={"vader_sentiment": 0.5})
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    out = {}
    pub = make_socket(ctx, zmq.PUB, connect=[endpoint], max_message_bytes=1 << 26, hwm=32)
    start = time.perf_counter()
    for _ in range(n):
        try_send(pub, scored)
    out["publish_nobody_s"] = (time.perf_counter() - start) / n
    sub = make_socket(ctx, zmq.SUB, bind=endpoint, subscribe=b"", max_message_bytes=1 << 26, hwm=1000)
    received = [0]
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            if sub.poll(100):
                sub.recv_multipart(copy=False)
                received[0] += 1

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    time.sleep(0.5)  # the subscription reaches the PUB
    start = time.perf_counter()
    for _ in range(n):
        try_send(pub, scored)
    out["publish_watched_s"] = (time.perf_counter() - start) / n
    time.sleep(0.5)
    stop.set()
    thread.join()
    out["received_watched"] = received[0]
    texts = [rollout.completion_text] * 64
    start = time.perf_counter()
    for _ in range(20):
        vader_sentiment([""] * 64, texts, [{}] * 64)
    out["vader_per_rollout_s"] = (time.perf_counter() - start) / (20 * 64)
    pub.close(0)
    sub.close(0)
    ctx.term()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240, help="wall time per arm after the first step")
    parser.add_argument(
        "--steps", type=int, default=None, help="equal learner steps per arm instead of equal wall time (--seconds)"
    )
    parser.add_argument("--eval-every", type=int, default=None, help="with --steps: checkpoint and evaluate every N")
    parser.add_argument("--step-timeout", type=float, default=3600, help="with --steps: seconds to wait for them")
    parser.add_argument("--min-labels", type=int, default=8, help="feedback.min_labels")
    parser.add_argument(
        "--from-log", default=None, help="no runs: summarise the per-run JSON lines an earlier invocation printed"
    )
    parser.add_argument(
        "--no-base-eval", action="store_true", help="with --steps: no step-0 evaluation (another invocation has it)"
    )
    parser.add_argument("--engine", default=None, help="generator.engine (default: the default job's)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds; every arm runs once per seed")
    parser.add_argument("--likes", default="char:o")
    parser.add_argument("--labels-per-second", type=float, default=2.0)
    parser.add_argument("--max-labels", type=int, default=None, help="label budget per run (equal across arms)")
    parser.add_argument("--threshold", type=float, default=None, help="the person's fixed rating threshold")
    parser.add_argument("--attention", type=float, default=1.0, help="fraction of rollouts the person looks at")
    parser.add_argument("--delay-min", type=float, default=0.0, help="the person's reaction delay, seconds, from")
    parser.add_argument("--delay-max", type=float, default=0.0, help="... to")
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of the person's labels flipped")
    parser.add_argument("--credit-delay-min", type=float, default=0.0, help="feedback.credit_delay_min_s")
    parser.add_argument("--credit-delay-max", type=float, default=0.0, help="feedback.credit_delay_max_s (0: off)")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--beta-decay", type=float, default=0.99)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts evaluated")
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="generator.prompts.split_seed of every run: the same held-out prompts for every arm and seed",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="generator.prompts.eval_fraction of every run (default: the default job's): more held-out prompts",
    )
    parser.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
    parser.add_argument("--notes", default=None, help="a markdown file appended to the RESULTS.md section")
    parser.add_argument(
        "--hhat-curve",
        nargs="+",
        default=None,
        help="copies of runs' label databases: H-hat's held-out ranking of --likes against labels used (no runs)",
    )
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.steps and args.eval_every and args.steps % args.eval_every:
        parser.error(f"--eval-every {args.eval_every} must divide --steps {args.steps}")
    budget = f"{args.steps} learner steps" if args.steps else f"{args.seconds:.0f} s"
    results, base_curve = [], {}
    if args.from_log:  # the runs a killed or unfinished invocation printed, one JSON line each
        lines = [json.loads(line) for line in Path(args.from_log).read_text().splitlines() if line.startswith('{"')]
        results = [r for r in lines if r.get("arm") in arms and r["seed"] in seeds]
        bases = {line["seed"]: line["base"] for line in lines if line.get("base")}
        for r in results:  # a run with --no-base-eval: step 0 from another invocation of its seed (deterministic)
            if r.get("curve") and r["curve"][0]["step"] != 0 and r["seed"] in bases:
                r["curve"].insert(0, bases[r["seed"]])
        if not results:
            parser.error(f"--from-log {args.from_log}: no runs of arms {arms} and seeds {seeds}")
        seeds = sorted({r["seed"] for r in results})
        args.seeds = ",".join(map(str, seeds))
    for i, seed in enumerate([] if args.from_log else seeds):
        if args.steps and not args.no_base_eval:
            with tempfile.TemporaryDirectory(prefix=f"bench-feedback-base-{seed}-") as tmp:
                base_curve[seed] = evaluate_base(args, Path(tmp), seed)
                print(json.dumps({"seed": seed, "base": base_curve[seed]}), flush=True)
        # arms interleaved within each seed, their order rotated from seed to seed, so a spell of load
        # from other work on the machine falls on every arm alike
        for arm in arms[i % len(arms) :] + arms[: i % len(arms)]:
            with tempfile.TemporaryDirectory(prefix=f"bench-feedback-{arm}-{seed}-") as tmp:
                print(f"arm {arm}, seed {seed}: {budget}", flush=True)
                results.append(run_arm(arm, args, Path(tmp), seed))
                if seed in base_curve:
                    results[-1]["curve"].insert(0, base_curve[seed])
                print(json.dumps(results[-1]), flush=True)
    results.sort(key=lambda r: (arms.index(r["arm"]), r["seed"]))
    for r in results:  # runs printed before the agent-level evaluation: the agent is the checkpoint
        for key in ("liked", "vader"):
            r.setdefault(f"agent_{key}", r[key])
            r.setdefault(f"agent_{key}_se", r.get(f"{key}_se", math.nan))
        r.setdefault("agent_gain", 0.0)
        r.setdefault("streamed_liked", math.nan)
    env = environment()
    section = summary(results, args, arms, env)
    hhat_curve = None
    if args.hhat_curve:
        hhat_curve = hhat_learning_curve([Path(p) for p in args.hhat_curve], preference(args.likes), [4, 8, 16, 32, 48])
        section += (
            f"\nHow many labels H-hat needs to rank `{args.likes}`: H-hat fit by the service's own fit on the first n"
            f" labels of one run's database, measured on the labelled rollouts of the other runs"
            f" ({len(args.hhat_curve)} databases; mean over fits):\n\n"
            + markdown_table(
                ["labels n", "Pearson corr with the person", "pair accuracy (same group)", "fits x pools"],
                [[c["labels"], f"{c['corr']:+.3f}", f"{c['pair_acc']:.3f}", c["fits"]] for c in hhat_curve],
            )
            + "\n"
        )
    if args.notes:
        section += "\n" + Path(args.notes).read_text()
    write_results(
        "feedback", {"args": vars(args), "results": results, "hhat_curve": hhat_curve, "environment": env}, section
    )
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
