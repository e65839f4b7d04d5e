"""streamrl vs Hugging Face TRL's GRPOTrainer: same model, prompts, reward, batch, group size,
completion length, lr, KL coefficient and temperature, same wall-clock budget, same held-out
evaluation; measured in one run of this command.

* ours: the four services as separate processes (one generator; 2 processes busy on
  2 cores, 1 torch thread each) from ``--config``; the learner gets SIGTERM at the
  budget, finishes its step and saves the final checkpoint.
* TRL: ``bench/trl_worker.py`` in ``.venv-trl`` (repository root) (created by ``bench/setup_trl.sh``),
  one process with ``--trl-threads`` torch threads (default 2, the same two cores),
  offline (``HF_HUB_OFFLINE=1``); it stops after the optimizer step during which the
  budget ran out and saves the policy.
* Both final policies and the initial one are scored by ``streamrl eval`` (common/evaluation.py):
  the held-out split of the same prompt file, the same sampling seed and samples per prompt.

The budget runs from process launch (model loading included) for both. One TRL
"generation" of 4 prompts x 4 completions = 16 completions is trained as 2 optimizer
steps of 8, like our step of 16 rollouts in 2 minibatches.

Usage (from the repository root)::

    bash bench/setup_trl.sh
    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.trl_grpo --seconds 360
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.e2e import rollouts_per_step, run_overrides
from bench.report import BENCH, REPO, command_line, environment, environment_line, markdown_table, write_results
from streamrl.common.config import add_config_arguments, load_config
from streamrl.testing import Services, wait_until

TRL_VENV = REPO / ".venv-trl"


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_ours(config: str, extra: list[str], seconds: float, workdir: Path, stop_after_steps: int | None = None) -> dict:
    """Train with streamrl for ``seconds`` from launch; returns steps, samples and the final checkpoint.

    ``stop_after_steps``: stop as soon as the learner has logged that many steps, even before
    ``seconds`` (the smoke test: the same launch, stop and read-back at the smallest size); None = the
    benchmark's equal wall time.
    """
    cfg = load_config(config, extra)
    overrides = [*extra, *run_overrides(cfg, workdir, 100_000, cfg.run.max_staleness, len(cfg.endpoints.scorers))]
    cfg = load_config(config, overrides)
    args = [a for o in overrides for a in ("--set", o)]
    services = Services(Path(config).resolve(), workdir)
    launched = time.time()
    try:
        learner = services.start("learner", 0, *args)
        services.start("buffer", 0, *args)
        for i in range(len(cfg.endpoints.scorers)):
            services.start("scorer", i, *args)
        services.start("generator", 0, *args)
        metrics = Path(cfg.run.output_dir) / "metrics.jsonl"
        while time.time() < launched + seconds:
            if any(p.poll() is not None for p in services.procs.values()):
                raise RuntimeError("a service exited early:\n" + services.logs())
            # complete lines only: the learner may be writing the next one
            if (
                stop_after_steps is not None
                and metrics.exists()
                and metrics.read_text().count("\n") >= stop_after_steps
            ):
                break
            time.sleep(0.5)
        learner.send_signal(signal.SIGTERM)
        if not wait_until(lambda: learner.poll() is not None, timeout=300):
            raise TimeoutError("the learner did not stop:\n" + services.logs())
    finally:
        services.close()
    output = Path(cfg.run.output_dir)
    records = _records(output / "metrics.jsonl")
    checkpoints = sorted((output / "checkpoints").glob("step-*"))
    if not records or not checkpoints:
        raise RuntimeError("no step finished within the budget:\n" + services.logs())
    per_step = rollouts_per_step(cfg)
    return {
        "launched": launched,
        "steps": len(records),
        "samples": per_step * len(records),
        "step_times": [r["time"] for r in records],
        "step_samples": [per_step for _ in records],
        "reward_train_last": records[-1]["reward_mean"],
        "model": str(checkpoints[-1] / "model"),
    }


def trl_prompts(cfg, path: Path) -> int:
    """Write the training split of the config's prompts, formatted as our generators see them, as JSONL."""
    from streamrl.common.models import load_tokenizer, resolve_model_path
    from streamrl.common.prompts import run_split
    from streamrl.services.generator.sampling import prepare_run_prompts

    gen = cfg.generator
    train, _ = run_split(gen.prompts, cfg.run.seed)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path, cfg.model.cache_path))
    texts, _ = prepare_run_prompts(tokenizer, train, cfg)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return len(texts)


def run_trl(cfg, seconds: float, threads: int, python: Path, workdir: Path, bf16: bool = False) -> dict:
    """Train with TRL GRPOTrainer for ``seconds`` from launch; returns its log and the saved model folder."""
    from streamrl.common.models import resolve_model_path

    lc, gen = cfg.learner, cfg.generator
    rollouts = lc.groups_per_step * gen.group_size
    prompts = workdir / "prompts.jsonl"
    n_prompts = trl_prompts(cfg, prompts)
    launched = time.time()
    spec = {
        "model": resolve_model_path(cfg.model.path, cfg.model.cache_path),
        "prompts": str(prompts),
        "output": str(workdir / "trl"),
        "deadline": launched + seconds,
        "threads": threads,
        "seed": cfg.run.seed,
        "bf16": bf16,
        "hyper": {
            "minibatch_size": rollouts // lc.minibatches,
            "minibatches": lc.minibatches,
            "group_size": gen.group_size,
            "ppo_epochs": lc.ppo_epochs,
            "max_new_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "lr": lc.lr,
            "weight_decay": lc.weight_decay,
            "max_grad_norm": lc.max_grad_norm,
            "kl_coef": lc.kl_coef,
            "clip_eps": lc.clip_eps,
        },
    }
    spec_path = workdir / "trl_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    with open(workdir / "trl.log", "wb") as log:
        code = subprocess.call(
            [str(python), str(BENCH / "trl_worker.py"), "--spec", str(spec_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=seconds + 600,
        )
    if code != 0:
        raise RuntimeError(f"TRL worker exited {code}:\n" + (workdir / "trl.log").read_text()[-6000:])
    result = json.loads((workdir / "trl" / "trl_log.json").read_text())
    steps = result["steps"]
    per_step = result["completions_per_step"]
    return {
        "launched": launched,
        "optimizer_steps": result["optimizer_steps"],
        "samples": result["optimizer_steps"] * per_step,
        "step_times": [s["time"] for s in steps],
        "step_samples": [per_step for _ in steps],
        "versions": result["versions"],
        "config": result["config"],
        "reward_train_last": steps[-1].get("reward") if steps else None,
        "train_prompts": n_prompts,
        "model": str(workdir / "trl" / "model"),
    }


def evaluate(
    config: str, extra: list[str], checkpoint: str | None, samples: int, limit: int | None, workdir: Path, name: str
) -> dict:
    """``streamrl eval`` of ``checkpoint`` (None: the initial model); returns the JSON result."""
    out = workdir / f"eval_{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "streamrl.cli",
        "eval",
        "--config",
        config,
        "--samples",
        str(samples),
        "--output",
        str(out),
    ]
    cmd += [a for o in extra for a in ("--set", o)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def rates(side: dict) -> dict:
    """samples/s from launch to the last finished step, and over the steady window (after step 1)."""
    times, samples = side["step_times"], side["step_samples"]
    total = sum(samples)
    overall = total / (times[-1] - side["launched"])
    steady = sum(samples[1:]) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"samples_per_s": overall, "steady_samples_per_s": steady, "train_seconds": times[-1] - side["launched"]}


def render(result: dict, env: dict, command: str) -> str:
    """The RESULTS.md section."""
    o, t, b = result["ours"], result["trl"], result["initial_eval"]

    def ev(e: dict) -> str:
        return f"{e['reward_mean']:+.3f} +- {e['reward_stderr']:.3f}"

    rows = [
        [
            f"streamrl (4 processes, 1 generator, {result.get('engine', 'hf')} engine)",
            o["samples"],
            o["samples_per_s"],
            o["steady_samples_per_s"],
            ev(o["eval"]),
            o["eval"]["reward_mean"] - b["reward_mean"],
            o["eval"]["kl_mean"],
        ],
        [
            f"TRL GRPOTrainer ({result['trl_threads']} threads, HF generate)",
            t["samples"],
            t["samples_per_s"],
            t["steady_samples_per_s"],
            ev(t["eval"]),
            t["eval"]["reward_mean"] - b["reward_mean"],
            t["eval"]["kl_mean"],
        ],
    ]
    r = result["ratios"]
    tv = t.get("versions", {})
    return "\n".join(
        [
            "## 4. End to end vs TRL GRPOTrainer (same wall-clock budget)",
            "",
            f"Command: `{command}` (after `bash bench/setup_trl.sh`)",
            "",
            environment_line(env) + f" TRL side: trl {tv.get('trl')}, transformers {tv.get('transformers')}, "
            f"torch {tv.get('torch')} in .venv-trl.",
            "",
            f"Model {result['model']}, config `{result['config']}`: {result['rollouts_per_step']} completions per step "
            f"(4 prompts x group {result['group_size']}), {result['max_new_tokens']} new tokens, lr {result['lr']}, "
            f"beta {result['kl_coef']}, temperature {result['temperature']}, reward `vader_sentiment`; "
            f"{result['seconds']:.0f} s budget each from launch (model loading included), run one after the other. "
            f"Held-out evaluation: `streamrl eval` on {b['prompts']} held-out prompts x {b['samples_per_prompt']} "
            f"samples, seed 1234; initial policy {ev(b)}.",
            "",
            markdown_table(
                [
                    "system",
                    "samples trained",
                    "samples/s (from launch)",
                    "samples/s (after step 1)",
                    "held-out reward",
                    "change vs initial",
                    "KL to ref (nats/completion)",
                ],
                rows,
            ),
            "",
            "Precision: ours learner {ours_learner}, generator {ours_generator}, scorer's reference pass "
            "{ours_reference}; TRL {trl}.".format(
                **(
                    {"ours_learner": "fp32", "ours_generator": "fp32", "ours_reference": "fp32", "trl": "fp32"}
                    | result.get("precision", {})
                )
            ),
            "",
            f"Ratios ours/TRL: samples/s {r['samples_per_s']:.2f} (steady {r['steady_samples_per_s']:.2f}); "
            f"held-out reward gain {r['reward_gain']:.2f}.",
            "",
            "Differences that remain: ours runs generation and training in separate processes (1 torch thread each, "
            "2 processes on 2 cores, up to 2 versions stale) while TRL alternates them in one process with "
            f"{result['trl_threads']} torch threads; ours puts the k1 KL penalty in the reward (InstructGPT), TRL "
            f"adds a k3 KL term to the loss (loss_type `{t['config'].get('loss_type')}`, scale_rewards "
            f"`{t['config'].get('scale_rewards')}`); both clip at epsilon {result['clip_eps']} and normalise "
            "advantages by the group std.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.trl_grpo", description=__doc__.split("\n")[0])
    add_config_arguments(parser, default="deploy/configs/default.toml")
    parser.add_argument("--seconds", type=float, default=360.0, help="wall-clock budget per system")
    parser.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL process")
    parser.add_argument("--trl-python", type=Path, default=TRL_VENV / "bin" / "python")
    parser.add_argument(
        "--trl-bf16",
        action="store_true",
        help="TRL trains and generates under bf16 autocast (GRPOConfig bf16), like our "
        "learner.autocast_bf16 / generator.autocast_bf16 / scorer.autocast_bf16",
    )
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (default: all)")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="time bound of the whole command; default 2 x --seconds + 900"
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.trl_python.exists():
        print(f"{args.trl_python} missing: run `bash bench/setup_trl.sh` first", file=sys.stderr)
        return 2
    max_seconds = args.max_seconds or 2 * args.seconds + 900
    signal.alarm(int(max_seconds))  # the time bound: SIGALRM ends the command
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="streamrl-trl-") as tmp:
        work = Path(tmp)
        (work / "ours").mkdir()
        (work / "trl").mkdir()
        ours = run_ours(args.config, args.overrides, args.seconds, work / "ours")
        print(f"ours: {ours['steps']} steps, {ours['samples']:.0f} samples", flush=True)
        trl = run_trl(cfg, args.seconds, args.trl_threads, args.trl_python, work / "trl", bf16=args.trl_bf16)
        print(f"TRL: {trl['optimizer_steps']} optimizer steps, {trl['samples']} samples", flush=True)
        initial = evaluate(args.config, args.overrides, None, args.eval_samples, args.eval_prompts, work, "initial")
        ours["eval"] = evaluate(
            args.config, args.overrides, ours["model"], args.eval_samples, args.eval_prompts, work, "ours"
        )
        trl["eval"] = evaluate(
            args.config, args.overrides, trl["model"], args.eval_samples, args.eval_prompts, work, "trl"
        )
    for side in (ours, trl):
        side.update(rates(side))
        side["model"] = Path(side["model"]).name
    gain_ours = ours["eval"]["reward_mean"] - initial["reward_mean"]
    gain_trl = trl["eval"]["reward_mean"] - initial["reward_mean"]
    ratios = {
        "samples_per_s": ours["samples_per_s"] / trl["samples_per_s"],
        "steady_samples_per_s": ours["steady_samples_per_s"] / trl["steady_samples_per_s"],
        "reward": ours["eval"]["reward_mean"] / trl["eval"]["reward_mean"]
        if trl["eval"]["reward_mean"]
        else float("nan"),
        "reward_gain": gain_ours / gain_trl if gain_trl else float("nan"),
    }
    import torch

    from streamrl.common.models import use_bf16_autocast

    cpu = torch.device("cpu")
    lc, gen = cfg.learner, cfg.generator
    env = environment({"trl (bench venv)": trl["versions"]["trl"]})
    command = command_line()
    result = {
        "command": command,
        "environment": env,
        "config": args.config,
        "overrides": args.overrides,
        "model": cfg.model.path,
        "seconds": args.seconds,
        "trl_threads": args.trl_threads,
        "engine": gen.engine.value,
        "precision": {
            "ours_learner": "bf16 autocast" if use_bf16_autocast(lc.autocast_bf16, cpu) else "fp32",
            "ours_generator": "bf16 autocast" if use_bf16_autocast(gen.autocast_bf16, cpu) else "fp32",
            "ours_reference": "bf16 autocast" if use_bf16_autocast(cfg.scorer.autocast_bf16, cpu) else "fp32",
            "trl": "bf16 autocast" if args.trl_bf16 else "fp32",
        },
        "rollouts_per_step": lc.groups_per_step * gen.group_size,
        "group_size": gen.group_size,
        "max_new_tokens": gen.max_new_tokens,
        "lr": lc.lr,
        "kl_coef": lc.kl_coef,
        "temperature": gen.temperature,
        "clip_eps": lc.clip_eps,
        "initial_eval": initial,
        "ours": ours,
        "trl": trl,
        "ratios": ratios,
    }
    out = write_results(
        "trl_grpo", result, render(result, env, command), results_dir=args.results_dir, results_md=args.results_md
    )
    print(
        f"ours/TRL samples/s {ratios['samples_per_s']:.2f}, held-out reward gain ratio "
        f"{ratios['reward_gain']:.2f}; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
