"""People in the loop on SmolLM2: the four TAMER+RL combinations vs no feedback, at equal wall time and label budget.

The environment reward is VADER's compound score (the default job). A simulated labeller
(``python -m streamrl.services.feedback.simulate``, HTTP API only) likes a property VADER ignores:
``--likes`` (default ``char:o``: the fraction of the letter ``o`` in the completion), and is a person,
not an oracle: ``--attention`` (fraction of rollouts looked at), ``--delay-min``/``--delay-max``
(seconds from a rollout appearing to its label), ``--noise`` (fraction of labels flipped),
``--threshold`` (fixed rating threshold), at most ``--max-labels`` labels per run (the equal label
budget); ``--credit-delay-min``/``--credit-delay-max`` set the service's TAMER credit window. Arms:
``none``, ``reward_shaping``, ``q_augmentation``, ``action_biasing``, ``control_sharing``, each run
once per ``--seeds`` seed (``run.seed``; the labeller's draws too). Each arm runs
the five services (learner, buffer, scorer, generator and, for the feedback arms, the feedback
service plus the labeller) from the same config (``deploy/configs/default.toml`` with the
overrides below) for ``--seconds`` of wall time after the learner's first step, then the learner is
stopped (SIGTERM: it checkpoints); with ``--steps N`` instead every arm trains exactly N learner steps
(the learner stops itself; equal training, unequal wall time, which is recorded: on a machine shared
with other work equal wall time gives unequal training), and every checkpoint (``--eval-every``) is
evaluated for the curve. Then the last checkpoint is evaluated on held-out prompts:
``--samples`` completions of each of ``--prompts`` held-out prompts, VADER and the labeller's
property per completion, mean and standard error over prompts (completions of one prompt are
correlated). Figures per arm: learner steps, labels used, both rewards +- SE, the delay from a label to
the first H-hat version that includes it (``streamrl_feedback_label_to_model_seconds``, mean), and the
delay from the first label to the first learner step whose batch H-hat influenced (shaped reward or
H-hat's pick kept). Across seeds: the mean of the per-run held-out means and its standard error,
and each arm's difference from ``none`` in units of that SE.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

from bench.report import REPO, RESULTS_DIR, command_line, environment, environment_line, markdown_table, write_results
from streamrl.common.config import load_config
from streamrl.common.messages import SamplingParams
from streamrl.common.models import configure_torch, load_causal_lm, load_tokenizer, resolve_model_path
from streamrl.evaluation import held_out_prompts
from streamrl.services.feedback.simulate import preference
from streamrl.services.generator.sampling import prepare_run_prompts, sample_completions
from streamrl.services.scorer.rewards import vader_sentiment
from streamrl.testing import Services, free_port, scrape, wait_until

ARMS = ("none", "reward_shaping", "q_augmentation", "action_biasing", "control_sharing")
CONFIG = REPO / "deploy" / "configs" / "default.toml"


def arm_overrides(workdir: Path, arm: str, args, seed: int = 0) -> tuple[list[str], dict]:
    """`--set` overrides of one arm: fresh loopback ports, output under ``workdir``; the ports used."""
    ports = {k: free_port() for k in ("generator", "scorer", "buffer", "learner", "feedback", "http")}
    values = {
        "run.output_dir": str(workdir / "run"),
        "run.seed": seed,
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
    if arm != "none":
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


def run_arm(arm: str, args, workdir: Path, seed: int = 0) -> dict:
    """Run one arm for ``args.seconds`` after the first learner step; returns its figures."""
    config, set_args, ports = arm_config(workdir, arm, args, seed)
    procs = Services(config, workdir)
    names = ["learner", "buffer", "scorer", "generator"] + (["feedback"] if arm != "none" else [])
    for name in names:
        procs.start(name, 0, *set_args)
    metrics_jsonl = workdir / "run" / "metrics.jsonl"
    labeller = None
    result: dict = {"arm": arm, "seed": seed}
    try:
        if arm != "none":
            url = f"http://127.0.0.1:{ports['http']}"

            def up() -> bool:
                try:
                    return requests.get(url + "/healthz", timeout=2).ok
                except requests.RequestException:
                    return False

            if not wait_until(up, 600):
                raise RuntimeError(f"feedback service did not start\n{procs.logs()}")
            cfg_args = ["--config", str(config)] + set_args
            token = subprocess.run(
                [sys.executable, "-m", "streamrl.services.feedback.admin", *cfg_args, "labeller", "add", "simulated"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            labeller = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "streamrl.services.feedback.simulate",
                    "--url",
                    url,
                    "--token",
                    token,
                    *person_args(args, seed),
                    "--duration",
                    str(args.seconds + 600),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        if not wait_until(lambda: metrics_jsonl.exists() and metrics_jsonl.read_text().strip(), 900):
            raise RuntimeError(f"no learner step\n{procs.logs()}")
        started = time.time()
        if args.steps:  # equal learner steps: the learner stops itself at learner.total_steps (and checkpoints)
            learner = procs.procs["learner-0"]
            if not wait_until(lambda: learner.poll() is not None, args.step_timeout) or learner.returncode != 0:
                raise RuntimeError(f"learner did not finish {args.steps} steps\n{procs.logs()}")
        else:
            time.sleep(args.seconds)
        if arm != "none":
            feedback = scrape(ports["feedback"])
            count = feedback.get("streamrl_feedback_label_to_model_seconds_count", 0)
            result["label_to_model_s"] = (
                feedback.get("streamrl_feedback_label_to_model_seconds_sum", 0) / count if count else math.nan
            )
        if procs.procs["learner-0"].poll() is None:
            procs.stop("learner-0", signal.SIGTERM, timeout=300)
        records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
        result["steps"] = len(records)
        result["steps_in_window"] = sum(r["time"] >= started for r in records)
        result["wall_s"] = records[-1]["time"] - records[0]["time"]  # first to last learner step
        result["load_1min"] = os.getloadavg()[0]
        if arm != "none":
            db = workdir / "run" / "feedback" / "labels.sqlite3"
            with sqlite3.connect(db) as con:
                result["labels"] = con.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
                first_label = con.execute("SELECT MIN(created_at) FROM labels").fetchone()[0]
            influenced = [
                r["time"]
                for r in records
                if r.get("human/shaped_fraction", 0) > 0 or r.get("human/by_model_fraction", 0) > 0
            ]
            result["first_label_to_influenced_step_s"] = (
                min(influenced) - first_label if influenced and first_label else math.nan
            )
        else:
            result["labels"] = 0
    finally:
        if labeller is not None:
            labeller.terminate()
            labeller.wait(30)
        procs.close()
    checkpoints = sorted((workdir / "run" / "checkpoints").glob("step-*"))
    result.update(evaluate(args, config, set_args, checkpoints[-1] / "model"))
    if args.steps:  # the held-out curve: every checkpoint before the last one too
        result["curve"] = [
            {"step": int(c.name.split("-")[1]), **evaluate(args, config, set_args, c / "model")}
            for c in checkpoints[:-1]
        ] + [{"step": int(checkpoints[-1].name.split("-")[1]), **{k: result[k] for k in ("liked", "liked_se")}}]
    return result


def evaluate(args, config: Path, set_args: list[str], model_dir: Path) -> dict:
    """VADER and the labeller's property of held-out completions: mean and SE over prompts."""
    cfg = load_config(config, [o for o in set_args if o != "--set"])
    configure_torch(2, seed=1234)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path, cfg.model.cache_path))
    model = load_causal_lm(str(model_dir), device=torch.device("cpu")).eval()
    prompts = held_out_prompts(cfg, args.prompts)
    likes = preference(args.likes)
    sampling = SamplingParams(
        temperature=cfg.generator.temperature, top_p=cfg.generator.top_p, max_new_tokens=cfg.generator.max_new_tokens
    )
    vader, prop = [], []
    for start in range(0, len(prompts), 8):
        batch = prompts[start : start + 8]
        _, ids = prepare_run_prompts(tokenizer, batch, cfg)
        for group in sample_completions(model, tokenizer, ids, group_size=args.samples, sampling=sampling):
            texts = [c.text for c in group]
            vader.append(float(np.mean(vader_sentiment([""] * len(texts), texts, [{}] * len(texts)))))
            prop.append(float(np.mean([likes(t) for t in texts])))

    def mean_se(values):
        values = np.array(values)
        return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))

    (v, v_se), (p, p_se) = mean_se(vader), mean_se(prop)
    return {"vader": v, "vader_se": v_se, "liked": p, "liked_se": p_se, "eval_prompts": len(prompts)}


def across_seeds(results: list[dict], key: str) -> dict[str, tuple[float, float, int]]:
    """Per arm: (mean over seeds of ``key``, its standard error across seeds, seeds)."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        values = np.array([r[key] for r in results if r["arm"] == arm], dtype=np.float64)
        se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        out[arm] = (float(values.mean()), se, len(values))
    return out


def plot_curve(results: list[dict], args, path: Path) -> None:
    """Held-out preference score (mean +- SE across seeds) against learner step, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r["curve"] for r in results if r["arm"] == arm]
        steps = [p["step"] for p in runs[0]]
        values = np.array([[p["liked"] for p in curve] for curve in runs])
        se = values.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros(len(steps))
        ax.errorbar(steps, values.mean(axis=0), yerr=se, capsize=3, marker="o", label=arm)
    ax.set_xlabel("learner step")
    ax.set_ylabel(f"held-out {args.likes} (simulated person's score)")
    ax.set_title(f"SmolLM2-135M, {len(runs)} seeds, mean ± SE across seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
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
    env = environment()
    liked, vader = across_seeds(results, "liked"), across_seeds(results, "vader")
    base = liked.get("none")

    def paired(arm: str) -> tuple[float, float]:
        """Mean over seeds of (arm - none) on the same seed (same prompts split), and its SE across seeds."""
        by_seed = {r["seed"]: r["liked"] for r in results if r["arm"] == "none"}
        diffs = np.array([r["liked"] - by_seed[r["seed"]] for r in results if r["arm"] == arm and r["seed"] in by_seed])
        se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
        return float(diffs.mean()), se

    def versus_none(arm: str) -> str:
        if base is None or arm == "none":
            return ""
        diff = liked[arm][0] - base[0]
        se = math.sqrt(liked[arm][1] ** 2 + base[1] ** 2)
        pd, pse = paired(arm)
        return (f"{diff:+.4f} ({diff / se:+.1f} SE)" if se > 0 else f"{diff:+.4f}") + (
            f"; paired {pd:+.4f} ({pd / pse:+.1f} SE)" if pse > 0 else ""
        )

    ranked = sorted(liked, key=lambda a: -liked[a][0])
    rows = [
        [
            arm,
            liked[arm][2],
            f"{liked[arm][0]:.4f} ± {liked[arm][1]:.4f}",
            versus_none(arm),
            f"{vader[arm][0]:.3f} ± {vader[arm][1]:.3f}",
            f"{vader[arm][0] - vader['none'][0]:+.3f}" if "none" in vader and arm != "none" else "",
            round(float(np.mean([r["steps"] for r in results if r["arm"] == arm])), 1),
            round(float(np.mean([r["labels"] for r in results if r["arm"] == arm])), 1),
            round(float(np.mean([r["wall_s"] for r in results if r["arm"] == arm and "wall_s" in r] or [math.nan]))),
        ]
        for arm in ranked
    ]
    table = markdown_table(
        [
            "arm (best first)",
            "seeds",
            f"held-out {args.likes} ± SE (seeds)",
            "vs none",
            "held-out VADER ± SE",
            "VADER cost vs none",
            "learner steps",
            "labels",
            "learner wall s",
        ],
        rows,
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
    plot = ""
    if args.steps:
        plot_curve(results, args, RESULTS_DIR / "feedback.png")
        plot = f"\n![held-out {args.likes} vs learner step per arm](results/feedback.png)\n"
    section = f"""## People in the loop: the four TAMER+RL combinations on SmolLM2

`{command_line()}`

{budget_line}, VADER as the environment
reward, a simulated person (HTTP API only; ratings and pairwise picks alternating) who likes `{args.likes}`,
which VADER ignores, and {person}; credit window {args.credit_delay_min:g}-{args.credit_delay_max:g} s;
beta = {args.beta:g}, decay {args.beta_decay:g} per step, K = {args.candidates} candidates (action biasing,
control sharing), lr {args.lr:g}, {args.max_new_tokens} new tokens. Held-out: {results[0]["eval_prompts"]}
prompts x {args.samples} completions of each run's last checkpoint, scored by the person's own taste; mean
and SE across seeds {args.seeds}. First: {ranked[0]}.

{table}
{plot}
{environment_line(env)}
"""
    write_results("feedback", {"args": vars(args), "results": results, "environment": env}, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


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
