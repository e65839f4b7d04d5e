"""Waste of generation: generation credits on and off, async and sync, side by side.

Each run starts the four services as separate processes (``streamrl.testing``, fresh loopback
ports, ``--generators`` generators, one scorer) from one config with ``learner.total_steps``
lowered, once per (``run.max_staleness``, ``generator.credits``) pair, the pairs alternating so
drift of a shared machine hits all of them. Figures per run, when the learner has finished:

* ``sent``: rollouts the generators sampled and sent (``streamrl_generator_rollouts_total``);
* ``inserted``: rollouts the buffer accepted; ``trained``: rollouts in ``trained.jsonl``;
* ``dropped``: rollouts the buffer dropped as stale;
* waste = dropped / inserted (what reached the buffer only to be thrown away), and
  (sent - trained) / sent (everything sampled that was not trained: dropped, still queued
  between generator, scorer and buffer, or held when the run stopped).

Usage (from the repository root; the default config is SmolLM2's default job)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.waste --steps 10
    .venv/bin/python -m bench.waste --set model.path=PATH_TO_TINY_MODEL --steps 12   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.report import command_line, environment, environment_line, markdown_table, write_results
from streamrl.common.config import load_config
from streamrl.report import generation_accounting, read_metrics
from streamrl.testing import Services, free_port, scrape, toml_value, wait_until


def run_once(
    config: str,
    overrides: list[str],
    *,
    max_staleness: int,
    credits: bool,
    steps: int,
    generators: int,
    tmp: Path,
    timeout_s: float,
) -> dict:
    """One run of the job; returns its figures (module docstring)."""
    ports = {k: free_port() for k in ("generator_port", "scorer_port", "buffer_port", "learner_port")}
    endpoints = {k: f"tcp://127.0.0.1:{free_port()}" for k in ("buffer", "batches", "weights_announce", "weights")}
    sets = [
        *overrides,
        f"run.max_staleness={max_staleness}",
        f"generator.credits={str(credits).lower()}",
        f"learner.total_steps={steps}",
        f"run.output_dir={toml_value(str(tmp / 'run'))}",
        f"endpoints.scorers={toml_value([f'tcp://127.0.0.1:{free_port()}'])}",
        *[f"endpoints.{k}={toml_value(v)}" for k, v in endpoints.items()],
        *[f"metrics.{k}={v}" for k, v in ports.items()],
    ]
    extra = [x for s in sets for x in ("--set", s)]
    procs = Services(Path(config).resolve(), tmp)
    started = time.time()
    try:
        for name in ("learner", "buffer", "scorer"):
            procs.start(name, 0, *extra)
        for i in range(generators):
            procs.start("generator", i, *extra)
        learner = procs.procs["learner-0"]
        if not wait_until(lambda: learner.poll() is not None, timeout=timeout_s) or learner.returncode != 0:
            raise RuntimeError(f"the learner did not finish {steps} steps:\n{procs.logs()}")
        wall = time.time() - started
        sent = sum(
            scrape(ports["generator_port"] + i).get("streamrl_generator_rollouts_total", 0.0) for i in range(generators)
        )
        buffer = scrape(ports["buffer_port"])
    finally:
        procs.close()
    cfg = load_config(config, sets)
    acc = generation_accounting(
        read_metrics(tmp / "run" / "metrics.jsonl"), tmp / "run" / "trained.jsonl", cfg.generator.group_size
    )
    inserted = buffer.get("streamrl_buffer_inserted_total", 0.0)
    dropped = buffer.get("streamrl_buffer_dropped_stale_total", 0.0)
    return {
        "max_staleness": max_staleness,
        "credits": credits,
        "wall_s": wall,
        "sent": sent,
        "inserted": inserted,
        "trained": acc["trained"],
        "dropped": dropped,
        "waste_of_inserted": dropped / inserted if inserted else 0.0,
        "untrained_of_sent": (sent - acc["trained"]) / sent if sent else 0.0,
        "samples_per_s": acc["trained"] / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/default.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--staleness", default="2,0", help="max_staleness values, comma-separated")
    parser.add_argument("--run-timeout", type=float, default=900.0)
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = []
    for eta in (int(x) for x in args.staleness.split(",")):
        for credits in (True, False):
            with tempfile.TemporaryDirectory(prefix="streamrl-waste-") as tmp:
                run = run_once(
                    args.config,
                    args.overrides,
                    max_staleness=eta,
                    credits=credits,
                    steps=args.steps,
                    generators=args.generators,
                    tmp=Path(tmp),
                    timeout_s=args.run_timeout,
                )
            runs.append(run)
            print(
                f"max_staleness {eta}, credits {credits}: sent {run['sent']:.0f}, inserted {run['inserted']:.0f}, "
                f"trained {run['trained']}, dropped {run['dropped']:.0f} "
                f"({run['waste_of_inserted']:.1%} of inserted), wall {run['wall_s']:.0f}s",
                flush=True,
            )
    env = environment()
    command = command_line()
    table = markdown_table(
        [
            "max_staleness",
            "credits",
            "sent",
            "inserted",
            "trained",
            "dropped stale",
            "dropped / inserted",
            "untrained / sent",
            "samples/s",
            "wall s",
        ],
        [
            [
                r["max_staleness"],
                "on" if r["credits"] else "off",
                f"{r['sent']:.0f}",
                f"{r['inserted']:.0f}",
                r["trained"],
                f"{r['dropped']:.0f}",
                f"{r['waste_of_inserted']:.1%}",
                f"{r['untrained_of_sent']:.1%}",
                f"{r['samples_per_s']:.2f}",
                f"{r['wall_s']:.0f}",
            ]
            for r in runs
        ],
    )
    section = (
        f"## Waste of generation: generation credits on and off\n\n`{command}`\n\n{environment_line(env)}\n\n"
        f"{args.config} {' '.join(args.overrides)}, {args.steps} learner steps, {args.generators} "
        f"generator(s), generation credits on and off side by side.\n\n{table}\n"
    )
    out = write_results(
        "waste",
        {"command": command, "environment": env, "runs": runs},
        section,
        results_dir=args.results_dir,
        results_md=args.results_md,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
