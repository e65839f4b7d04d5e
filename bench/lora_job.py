"""LoRA against the whole model on the default job at equal wall time: held-out reward gain of each.

Each arm runs the default job (``deploy/configs/default.toml``, four service processes) for the same
wall-clock budget from launch (model loading included), one arm after the other, then ``streamrl eval``
scores its last checkpoint (a LoRA checkpoint is an adapter folder; eval merges it) and the initial
policy on the same held-out prompts and seed. The gain of each arm is paired over prompts
(:func:`streamrl.evaluation.compare`), and so is the difference between the two arms' final policies.

Arms: ``full`` (the default job as it stands, ``learner.lr`` from the config) and ``lora``
(``learner.lora.rank`` > 0 at ``--lora-lr``; docs/lora.md starts LoRA at 3e-4).

Usage (from the repository root, nothing else running)::

    .venv/bin/python -m bench.lora_job --seconds 420
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.report import command_line, environment, environment_line, markdown_table, output_arguments, write_results
from bench.trl_grpo import evaluate, run_ours
from streamrl.evaluation import EvalResult, compare


def arm_overrides(arm: str, rank: int, lora_lr: float) -> list[str]:
    """The ``--set`` overrides of one arm on top of the default job."""
    if arm == "full":
        return []
    return [f"learner.lora.rank={rank}", f"learner.lr={lora_lr}"]


def render(result: dict, env: dict, command: str) -> str:
    """The RESULTS.md section."""
    rows = []
    for arm in result["arms"]:
        a = result["runs"][arm]
        g = a["gain"]
        rows.append(
            [
                arm,
                " ".join(a["overrides"]) or "(default job)",
                a["steps"],
                a["samples"],
                f"{g['after']:+.3f} +- {g['after_stderr']:.3f}",
                f"{g['delta']:+.3f} ({g['delta'] / g['delta_stderr_unpaired']:.1f} SE; paired {g['delta_z']:.1f})",
                a["eval"]["kl_per_token"],
            ]
        )
    d = result["lora_minus_full"]
    return "\n".join(
        [
            "## LoRA vs the whole model on the default job at equal wall time",
            "",
            f"Command: `{command}`",
            "",
            environment_line(env),
            "",
            f"Each arm: `{result['config']}` for {result['seconds']:.0f} s from launch (model loading included), "
            f"one arm after the other, then `streamrl eval` of its last checkpoint on {result['limit']} held-out "
            f"prompts x {result['samples']} samples (seed of the config). Initial policy "
            f"{result['initial']['reward_mean']:+.3f} +- {result['initial']['reward_stderr']:.3f}.",
            "",
            markdown_table(
                [
                    "arm",
                    "overrides",
                    "learner steps",
                    "samples trained",
                    "held-out reward",
                    "gain (SE)",
                    "KL to reference, nats/token",
                ],
                rows,
            ),
            "",
            f"LoRA minus whole model, final policies paired over prompts: {d['delta']:+.3f} +- {d['delta_stderr']:.3f} "
            f"({d['delta_z']:+.1f} SE).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.lora_job", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="deploy/configs/default.toml", help="the job (default: the default job)")
    parser.add_argument("--seconds", type=float, default=420.0, help="wall-clock budget per arm, from launch")
    parser.add_argument("--rank", type=int, default=4, help="learner.lora.rank of the lora arm")
    parser.add_argument("--lora-lr", type=float, default=3e-4, help="learner.lr of the lora arm")
    parser.add_argument("--arms", default="full,lora", help="comma-separated: full, lora (run in this order)")
    parser.add_argument("--samples", type=int, default=8, help="held-out completions per prompt")
    parser.add_argument("--limit", type=int, default=16, help="held-out prompts")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    output_arguments(parser, max_seconds=3600.0, bound="not enforced; the arms' budgets bound the run")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory(prefix="lora_job_") as tmp:
        work = args.workdir or Path(tmp)
        runs = {}
        for arm in arms:
            overrides = arm_overrides(arm, args.rank, args.lora_lr)
            (work / arm).mkdir(parents=True, exist_ok=True)
            print(f"{arm}: training for {args.seconds:.0f} s ({' '.join(overrides) or 'default job'})", flush=True)
            runs[arm] = {"overrides": overrides, **run_ours(args.config, overrides, args.seconds, work / arm)}
            print(f"{arm}: {runs[arm]['steps']} steps, {runs[arm]['samples']} samples", flush=True)
        initial = evaluate(args.config, [], None, args.samples, args.limit, work, "initial")
        before = EvalResult(**initial)
        finals = {}
        for arm in arms:
            runs[arm]["eval"] = evaluate(args.config, [], runs[arm]["model"], args.samples, args.limit, work, arm)
            finals[arm] = EvalResult(**runs[arm]["eval"])
            runs[arm]["gain"] = compare(before, finals[arm])
            g = runs[arm]["gain"]
            print(
                f"{arm}: held-out {g['after']:+.4f}, gain {g['delta']:+.4f} (paired z {g['delta_z']:.1f})", flush=True
            )
    result = {
        "config": args.config,
        "seconds": args.seconds,
        "samples": args.samples,
        "limit": args.limit,
        "arms": arms,
        "initial": initial,
        "runs": runs,
        "lora_minus_full": compare(finals["full"], finals["lora"]) if {"full", "lora"} <= set(arms) else None,
    }
    env = environment()
    command = command_line()
    out = write_results(
        "lora_job",
        result,
        render(result, env, command),
        results_dir=args.results_dir,
        results_md=args.results_md,
    )
    print(json.dumps({a: runs[a]["gain"] for a in arms}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
