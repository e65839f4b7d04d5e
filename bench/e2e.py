"""End-to-end benchmark: the same job with ``run.max_staleness = 0`` (synchronous) and with the
config's staleness bound (asynchronous), repeated; medians and the async/sync ratio.

Each run starts the four services as separate processes (``python -m streamrl.services.<name>``,
like the e2e tests; one generator, the default on 2 cores) from one config (default:
``deploy/configs/default.toml``, SmolLM2-135M) with ``learner.total_steps`` lowered and
fresh loopback ports. Figures per run:

* samples/s and trained (completion) tokens/s over the steady window: from the end of
  the learner's first step to the end of its last (the first step includes model
  loading and the first generation batch);
* learner seconds waiting for data in that window (``wait_data_s`` of steps 2..N in
  ``metrics.jsonl``) and seconds training (``train_s``) and publishing (``publish_s``);
* generator seconds paused waiting for fresher weights
  (``streamrl_generator_weight_wait_seconds_total``) and blocked by backpressure
  (``send_blocked_seconds_total``), scraped when the learner logs its last step;
* staleness of every trained rollout (the buffer's ``streamrl_buffer_staleness``
  histogram) and stale drops.

Modes alternate (sync, async, sync, ...) so slow drift of the shared machine hits both.
``--profile`` adds an in-process split of one learner step (pi_old pass, reference pass,
forward + backward + AdamW updates, weight packing) and of one generation batch.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.e2e --steps 8 --runs 3 --profile
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.report import (
    Deadline,
    command_line,
    environment,
    environment_line,
    markdown_table,
    median,
    write_results,
)
from streamrl.common.config import add_config_arguments, load_config
from streamrl.testing import Services, free_port, scrape, toml_value, wait_until

MODES = {"sync": 0, "async": None}  # None: the config's own max_staleness


def run_overrides(cfg, workdir: Path, steps: int, max_staleness: int, scorers: int) -> list[str]:
    """`--set` overrides for one benchmark run on loopback: fresh ports, output under `workdir`, `steps` steps."""
    values = {
        "learner.total_steps": steps,
        "learner.checkpoint_every": steps,
        "run.max_staleness": max_staleness,
        "run.output_dir": str(workdir / "run"),
        "endpoints.scorers": [f"tcp://127.0.0.1:{free_port()}" for _ in range(scorers)],
        "endpoints.buffer": f"tcp://127.0.0.1:{free_port()}",
        "endpoints.batches": f"tcp://127.0.0.1:{free_port()}",
        "endpoints.weights_announce": f"tcp://127.0.0.1:{free_port()}",
        "endpoints.weights": f"tcp://127.0.0.1:{free_port()}",
        "metrics.generator_port": free_port(),
        "metrics.scorer_port": free_port(),
        "metrics.buffer_port": free_port(),
        "metrics.learner_port": free_port(),
    }
    return [f"{k}={toml_value(v)}" for k, v in values.items()]


def rollouts_per_step(cfg) -> int:
    """Rollouts in one learner step (the buffer serves whole batches of ``groups_per_step`` groups);
    the ``samples`` key of a metrics.jsonl record holds example completions, not a count."""
    return cfg.learner.groups_per_step * cfg.generator.group_size


def _staleness_histogram(samples: dict[str, float]) -> dict[str, float]:
    """Per-bucket counts (not cumulative) of ``streamrl_buffer_staleness`` as {"0": n, "1": n, ...}."""
    cumulative = []
    for key, value in samples.items():
        if key.startswith("streamrl_buffer_staleness_bucket{"):
            labels = dict(kv.split("=", 1) for kv in key[key.index("{") + 1 : -1].split(","))  # streamrl.status.read
            le = labels["le"].strip('"')
            cumulative.append((float("inf") if le == "+Inf" else float(le), value))
    cumulative.sort()
    out, below = {}, 0.0
    for le, value in cumulative:
        if value - below > 0:
            out["inf" if le == float("inf") else f"{le:g}"] = value - below
        below = value
    return out


def run_once(
    config: str, extra: list[str], mode: str, steps: int, generators: int, workdir: Path, timeout_s: float
) -> dict:
    """One run of ``steps`` learner steps; returns the per-run figures (see module docstring)."""
    cfg = load_config(config, extra)
    max_staleness = MODES[mode] if MODES[mode] is not None else cfg.run.max_staleness
    scorers = len(cfg.endpoints.scorers)
    overrides = [*extra, *run_overrides(cfg, workdir, steps, max_staleness, scorers)]
    cfg = load_config(config, overrides)
    args = [a for o in overrides for a in ("--set", o)]
    services = Services(Path(config).resolve(), workdir)
    log_path = Path(cfg.run.output_dir) / "metrics.jsonl"

    def records() -> list[dict]:
        if not log_path.exists():
            return []
        return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]

    started = time.time()
    try:
        services.start("learner", 0, *args)
        services.start("buffer", 0, *args)
        for i in range(scorers):
            services.start("scorer", i, *args)
        for i in range(generators):
            services.start("generator", i, *args)

        def finished() -> bool:
            if any(p.poll() not in (None, 0) for p in services.procs.values()):
                raise RuntimeError("a service died:\n" + services.logs())
            return len(records()) >= steps

        if not wait_until(finished, timeout=timeout_s, interval=0.2):
            raise TimeoutError(f"{mode} run did not reach {steps} steps in {timeout_s:.0f}s:\n" + services.logs())
        gen = [scrape(cfg.metrics.generator_port + i) for i in range(generators)]
        buf = scrape(cfg.metrics.buffer_port)
    finally:
        services.close()
    recs = records()[:steps]
    steady = recs[1:]
    window = recs[-1]["time"] - recs[0]["time"]
    samples = len(steady) * rollouts_per_step(cfg)
    tokens = sum(r["tokens"] for r in steady)

    def gen_sum(name: str) -> float:
        return sum(g.get(f"streamrl_generator_{name}", 0.0) for g in gen)

    staleness = _staleness_histogram(buf)
    n = sum(staleness.values())
    return {
        "mode": mode,
        "max_staleness": max_staleness,
        "steps": len(recs),
        "wall_s": time.time() - started,
        "first_step_at_s": recs[0]["time"] - started,
        "window_s": window,
        "samples_per_s": samples / window,
        "tokens_per_s": tokens / window,
        "learner_wait_s": sum(r["wait_data_s"] for r in steady),
        "learner_train_s": sum(r["train_s"] for r in steady),
        "learner_publish_s": sum(r["publish_s"] for r in steady),
        "learner_wait_fraction": sum(r["wait_data_s"] for r in steady) / window,
        "generator_weight_wait_s": gen_sum("weight_wait_seconds_total"),
        "generator_blocked_s": gen_sum("send_blocked_seconds_total"),
        "generator_generation_s": gen_sum("generation_seconds_sum"),
        "generator_batches": gen_sum("generation_seconds_count"),
        "generator_fetch_s": gen_sum("weight_fetch_seconds_sum"),
        "generator_load_s": gen_sum("weight_load_seconds_sum"),
        "generator_rollouts": gen_sum("rollouts_total"),
        "dropped_stale": sum(r["dropped_stale"] for r in recs),
        "staleness_histogram": staleness,
        "staleness_mean": sum(float(k) * v for k, v in staleness.items() if k != "inf") / n if n else float("nan"),
        "reward_mean_last": recs[-1]["reward_mean"],
    }


def profile_step(config: str, extra: list[str], repeats: int = 2) -> dict:
    """Split one learner step and one generation batch on this machine (1 torch thread, in-process)."""
    import torch

    from streamrl.common.messages import SamplingParams
    from streamrl.common.models import configure_torch, load_causal_lm, load_tokenizer, resolve_model_path
    from streamrl.common.prompts import run_split
    from streamrl.common.weights import pack_state_dict
    from streamrl.evaluation import scored_group
    from streamrl.services.generator.sampling import prepare_run_prompts, sample_completions
    from streamrl.services.learner.batch import collate, forward_completions
    from streamrl.services.learner.trainer import PPOTrainer
    from streamrl.services.scorer.rewards import build_reward

    cfg = load_config(config, extra)
    gen, lc = cfg.generator, cfg.learner
    configure_torch(1, seed=0)
    path = resolve_model_path(cfg.model.path, cfg.model.cache_path)
    tokenizer = load_tokenizer(path)
    device = torch.device("cpu")
    policy = load_causal_lm(path, device=device)
    reference = load_causal_lm(path, device=device).eval()
    trainer = PPOTrainer(policy, reference, lc)
    reward = build_reward(cfg.scorer.rewards, device=device)
    train, _ = run_split(gen.prompts, cfg.run.seed)
    sampling = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)
    timings: dict[str, list[float]] = {k: [] for k in ("generate", "old", "ref", "targets", "step", "pack")}
    for rep in range(repeats):
        scored = []
        for b in range(lc.groups_per_step // gen.prompts_per_batch):
            start = rep * lc.groups_per_step + b * gen.prompts_per_batch
            prompts = train[start : start + gen.prompts_per_batch]
            texts, ids = prepare_run_prompts(tokenizer, prompts, cfg)
            policy.eval()
            t0 = time.perf_counter()
            groups = sample_completions(policy, tokenizer, ids, group_size=gen.group_size, sampling=sampling)
            timings["generate"].append(time.perf_counter() - t0)
            for p, text, group in zip(prompts, texts, groups):
                values, _ = reward([text] * len(group), [c.text for c in group], [p.metadata] * len(group))
                scored += scored_group(
                    p, group, values, sampling=sampling, generator_id="profile", group_number=len(scored)
                )
        batch = collate(scored, pad_id=tokenizer.pad_token_id)
        with torch.no_grad():
            policy.eval()
            t0 = time.perf_counter()
            forward_completions(policy, batch)
            timings["old"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            forward_completions(reference, batch)
            timings["ref"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            trainer.targets(batch)
            timings["targets"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.step(batch, 0)
        timings["step"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pack_state_dict(
            policy.state_dict(),
            version=1,
            dtype=cfg.transport.weight_dtype,
            chunk_bytes=cfg.transport.weight_chunk_bytes,
            sender="profile",
        )
        timings["pack"].append(time.perf_counter() - t0)
    out = {k: median(v) for k, v in timings.items()}
    out["updates"] = out["step"] - out["targets"]
    out["rollouts_per_step"] = lc.groups_per_step * gen.group_size
    out["rollouts_per_generate"] = gen.prompts_per_batch * gen.group_size
    out["generate_per_step"] = out["generate"] * lc.groups_per_step / gen.prompts_per_batch
    out["minibatches"] = lc.minibatches
    return out


SUMMARY_KEYS = (
    "samples_per_s",
    "tokens_per_s",
    "learner_wait_s",
    "learner_wait_fraction",
    "learner_train_s",
    "learner_publish_s",
    "generator_weight_wait_s",
    "generator_blocked_s",
    "generator_generation_s",
    "dropped_stale",
    "staleness_mean",
    "window_s",
)


def render(result: dict, env: dict, command: str) -> str:
    """The RESULTS.md section."""
    s, a = result["summary"]["sync"], result["summary"]["async"]
    ratio = result["async_over_sync"]
    labels = {
        "samples_per_s": "samples/s",
        "tokens_per_s": "trained tokens/s",
        "learner_wait_s": "learner s waiting for data",
        "learner_wait_fraction": "learner waiting fraction",
        "learner_train_s": "learner s training",
        "learner_publish_s": "learner s publishing weights",
        "generator_weight_wait_s": "generator s waiting for weights",
        "generator_blocked_s": "generator s blocked (backpressure)",
        "generator_generation_s": "generator s generating (whole run)",
        "dropped_stale": "rollouts dropped as stale",
        "staleness_mean": "mean staleness (versions)",
        "window_s": "steady window s",
    }
    rows = [[labels[k], s[k], a[k], ratio.get(k, float("nan"))] for k in SUMMARY_KEYS]

    def hist(mode: str) -> str:
        runs = [r for r in result["runs"] if r["mode"] == mode]
        total: dict[str, float] = {}
        for r in runs:
            for k, v in r["staleness_histogram"].items():
                total[k] = total.get(k, 0) + v
        n = sum(total.values()) or 1
        return ", ".join(f"{k}: {v / n:.0%}" for k, v in sorted(total.items(), key=lambda kv: float(kv[0])))

    per_run = markdown_table(
        ["run", "mode", "samples/s", "tokens/s", "learner wait s", "generator weight-wait s", "stale drops", "wall s"],
        [
            [
                i + 1,
                r["mode"],
                r["samples_per_s"],
                r["tokens_per_s"],
                r["learner_wait_s"],
                r["generator_weight_wait_s"],
                r["dropped_stale"],
                r["wall_s"],
            ]
            for i, r in enumerate(result["runs"])
        ],
    )
    lines = [
        "## 3. End to end: async vs sync",
        "",
        f"Command: `{command}`",
        "",
        environment_line(env),
        "",
        f"Config `{result['config']}` ({result['model']}), {result['steps']} learner steps of "
        f"{result['rollouts_per_step']} rollouts per run, {result['generators']} generator (the default on 2 cores: "
        f"learner and generator each own a core), sync = `run.max_staleness = 0`, async = "
        f"`run.max_staleness = {result['async_max_staleness']}` (the config's). Medians over "
        f"{result['runs_per_mode']['sync']} sync and {result['runs_per_mode']['async']} async runs; rates over the "
        "steady window (end of step 1 to end of the last step); seconds are totals over that window.",
        "",
        markdown_table(["metric", "sync (median)", "async (median)", "async / sync"], rows),
        "",
        f"Staleness of trained rollouts (all runs pooled): sync {hist('sync')}; async {hist('async')}.",
        "",
        "How to read it: a generator samples a group only with a generation credit from the buffer, granted "
        "so that the group can still be trained within `max_staleness`. With `max_staleness = 0` no credit is "
        "granted once the batch of version v is served, so the generator waits for v+1 while the learner "
        "trains and the learner then waits for a fresh generation: the two alternate and nothing is dropped. "
        "Asynchronous, the generator samples the next batches while the learner trains, the learner hardly "
        "waits, and the processes share the 2 cores; the generator runs up to the bound, so most trained "
        f"rollouts are {result['async_max_staleness']} versions old.",
        "",
        per_run,
    ]
    p = result.get("profile")
    if p:
        lines += [
            "",
            "Where the time goes (in-process, 1 torch thread, median of 2; one learner step of "
            f"{p['rollouts_per_step']} rollouts, {p['minibatches']} minibatch updates, every pass the learner "
            "can run: the services skip the reference pass (the scorers send reference log-probs) and most "
            "of the pi_old pass (`reuse_first_pass`); `bench.learner_passes` splits the step as configured):",
            "",
            markdown_table(
                ["part", "seconds"],
                [
                    [f"generate {p['rollouts_per_generate']} completions (one generator batch)", p["generate"]],
                    [f"generate {p['rollouts_per_step']} completions (one step's worth)", p["generate_per_step"]],
                    ["learner: pi_old forward pass (no grad)", p["old"]],
                    ["learner: reference forward pass (no grad)", p["ref"]],
                    ["learner: targets (pi_old + reference + advantages)", p["targets"]],
                    ["learner: forward + backward + AdamW over the minibatches", p["updates"]],
                    ["learner: whole step", p["step"]],
                    ["learner: pack weights for publishing", p["pack"]],
                ],
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    add_config_arguments(parser, default="deploy/configs/default.toml")
    parser.add_argument("--steps", type=int, default=8, help="learner steps per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (at least 2 unless the bound hits)")
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also split one learner step in-process")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="time bound: no new pair of runs starts when the last pair would not fit",
    )
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    cfg = load_config(args.config, args.overrides)
    runs: list[dict] = []
    pair_s = 0.0
    for i in range(args.runs):
        if i >= 1 and deadline.left() < pair_s * 1.2:
            print(f"time bound: stopping after {i} runs per mode", flush=True)
            break
        pair_started = time.monotonic()
        for mode in MODES:
            with tempfile.TemporaryDirectory(prefix=f"streamrl-e2e-{mode}-") as tmp:
                run = run_once(
                    args.config, args.overrides, mode, args.steps, args.generators, Path(tmp), args.run_timeout
                )
            runs.append(run)
            print(
                f"{mode} run {i + 1}: {run['samples_per_s']:.2f} samples/s, {run['tokens_per_s']:.1f} tokens/s, "
                f"learner wait {run['learner_wait_s']:.1f}s, generator weight wait "
                f"{run['generator_weight_wait_s']:.1f}s, staleness {run['staleness_histogram']}, "
                f"wall {run['wall_s']:.0f}s",
                flush=True,
            )
        pair_s = time.monotonic() - pair_started
    summary = {mode: {k: median(r[k] for r in runs if r["mode"] == mode) for k in SUMMARY_KEYS} for mode in MODES}
    ratio = {k: summary["async"][k] / summary["sync"][k] for k in SUMMARY_KEYS if summary["sync"][k]}
    profile = profile_step(args.config, args.overrides) if args.profile else None
    env = environment()
    command = command_line()
    result = {
        "command": command,
        "environment": env,
        "config": args.config,
        "overrides": args.overrides,
        "model": cfg.model.path,
        "steps": args.steps,
        "generators": args.generators,
        "rollouts_per_step": cfg.learner.groups_per_step * cfg.generator.group_size,
        "async_max_staleness": cfg.run.max_staleness,
        "runs_per_mode": {m: sum(r["mode"] == m for r in runs) for m in MODES},
        "summary": summary,
        "async_over_sync": ratio,
        "runs": runs,
        "profile": profile,
    }
    out = write_results(
        "e2e", result, render(result, env, command), results_dir=args.results_dir, results_md=args.results_md
    )
    print(f"async/sync samples/s: {ratio.get('samples_per_s', float('nan')):.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
