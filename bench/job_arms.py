"""Variants of the default job at equal wall time: samples/s and held-out reward gain of each.

Each arm runs the default job (``deploy/configs/default.toml``, four service processes) with its
overrides for the same wall-clock budget from launch (model loading included), one arm after the
other, then ``streamrl eval`` scores its last checkpoint (a LoRA checkpoint is an adapter folder; eval
merges it) and the initial policy on the same held-out prompts and seed, with the config's engine for
every arm (the yardstick does not change with the arm). The gain of each arm is paired over prompts
(:func:`streamrl.evaluation.compare`), and so is each arm's final policy against the first arm's.

Arms (:data:`ARMS`): ``full`` (the default job as it stands: the whole model at ``learner.lr``, the
config's engine), ``lora`` (``learner.lora.rank`` > 0 at ``--lora-lr``; docs/lora.md starts LoRA at
3e-4), ``hf`` (the default job with ``generator.engine = "hf"``: Hugging Face ``generate`` instead
of vLLM) and ``learner2`` (the learner on 2 torch threads and every process left to the scheduler,
against the default's one learner thread on a core of its own). The section written is
``<arms after the first>_job`` (``lora_job``, ``hf_learner2_job``).

Usage (from the repository root, nothing else running)::

    .venv/bin/python -m bench.job_arms --seconds 480                # full against lora
    .venv/bin/python -m bench.job_arms --seconds 480 --arms full,hf # the default job's engines
    .venv/bin/python -m bench.job_arms --seconds 480 --arms full,learner2  # its placement
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.report import command_line, environment, environment_line, markdown_table, output_arguments, write_results
from bench.trl_grpo import evaluate, rates, run_ours
from streamrl.common.config import load_config
from streamrl.evaluation import EvalResult, compare

ARMS = {
    "full": "the default job",
    "lora": "LoRA",
    "hf": "Hugging Face generate (generator.engine = hf)",
    "learner2": "the learner on 2 threads, unpinned",
}
"""Arm name -> what the section's title calls it."""


def arm_overrides(arm: str, rank: int, lora_lr: float) -> list[str]:
    """The ``--set`` overrides of one arm on top of the default job.

    Raises:
        ValueError: an arm not in :data:`ARMS`.
    """
    if arm == "full":
        return []
    if arm == "lora":
        return [f"learner.lora.rank={rank}", f"learner.lr={lora_lr}"]
    if arm == "hf":
        return ["generator.engine=hf"]
    if arm == "learner2":
        return ["learner.threads=2", "run.cpu_placement=none"]
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def arm_label(arm: str, engine: str) -> str:
    """What the section calls ``arm``; ``engine``: the config's ``generator.engine``."""
    return f"{ARMS[arm]} ({engine} engine, whole model)" if arm == "full" else ARMS[arm]


def section_name(arms: list[str]) -> str:
    """The RESULTS.md section of a run of ``arms``: ``<arms after the first>_job`` (``lora_job``)."""
    return "_".join(arms[1:] or arms) + "_job"


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
                a["samples_per_s"],
                a["steady_samples_per_s"],
                f"{g['after']:+.3f} +- {g['after_stderr']:.3f}",
                f"{g['delta']:+.3f} ({g['delta'] / g['delta_stderr_unpaired']:.1f} SE; paired {g['delta_z']:.1f})",
                a["eval"]["kl_per_token"],
            ]
        )
    arms, engine = result["arms"], result["engine"]
    first = arms[0]
    lines = []
    for arm in arms[1:]:
        d, label = result["differences"][f"{arm}_minus_{first}"], arm_label(arm, engine)
        ratio = result["runs"][arm]["samples_per_s"] / result["runs"][first]["samples_per_s"]
        lines.append(
            f"{label[:1].upper()}{label[1:]} minus {arm_label(first, engine)}, final policies paired over prompts: "
            f"{d['delta']:+.3f} +- {d['delta_stderr']:.3f} ({d['delta_z']:+.1f} SE); samples/s {ratio:.2f}x."
        )
    return "\n".join(
        [
            f"## The default job at equal wall time: {' vs '.join(arm_label(arm, engine) for arm in arms)}",
            "",
            f"Command: `{command}`",
            "",
            environment_line(env),
            "",
            f"Each arm: `{result['config']}` for {result['seconds']:.0f} s from launch (model loading included), "
            f"one arm after the other, then `streamrl eval` of its last checkpoint ({engine} engine for every arm) "
            f"on {result['limit']} held-out prompts x {result['samples']} samples (seed of the config). Initial "
            f"policy {result['initial']['reward_mean']:+.3f} +- {result['initial']['reward_stderr']:.3f}. "
            "Samples/s from launch to the last finished step, and after the first step.",
            "",
            markdown_table(
                [
                    "arm",
                    "overrides",
                    "learner steps",
                    "samples trained",
                    "samples/s",
                    "samples/s after step 1",
                    "held-out reward",
                    "gain (SE)",
                    "KL to reference, nats/token",
                ],
                rows,
            ),
            "",
            *lines,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.job_arms", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="deploy/configs/default.toml", help="the job (default: the default job)")
    parser.add_argument("--seconds", type=float, default=420.0, help="wall-clock budget per arm, from launch")
    parser.add_argument("--rank", type=int, default=4, help="learner.lora.rank of the lora arm")
    parser.add_argument("--lora-lr", type=float, default=3e-4, help="learner.lr of the lora arm")
    parser.add_argument(
        "--arms",
        default="full,lora",
        help=f"comma-separated, from {', '.join(ARMS)}; run in this order, each compared with the first",
    )
    parser.add_argument("--samples", type=int, default=8, help="held-out completions per prompt")
    parser.add_argument("--limit", type=int, default=16, help="held-out prompts")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    output_arguments(parser, max_seconds=3600.0, bound="not enforced; the arms' budgets bound the run")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    arms = args.arms.split(",")
    overrides = {arm: arm_overrides(arm, args.rank, args.lora_lr) for arm in arms}  # refuses an unknown arm first
    with tempfile.TemporaryDirectory(prefix="job_arms_") as tmp:
        work = args.workdir or Path(tmp)
        runs = {}
        for arm in arms:
            (work / arm).mkdir(parents=True, exist_ok=True)
            print(f"{arm}: training for {args.seconds:.0f} s ({' '.join(overrides[arm]) or 'default job'})", flush=True)
            runs[arm] = {"overrides": overrides[arm], **run_ours(args.config, overrides[arm], args.seconds, work / arm)}
            runs[arm].update(rates(runs[arm]))
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
    env = environment()
    command = command_line()
    result = {
        "command": command,
        "environment": env,
        "config": args.config,
        "engine": load_config(args.config, []).generator.engine.value,
        "seconds": args.seconds,
        "samples": args.samples,
        "limit": args.limit,
        "arms": arms,
        "initial": initial,
        "runs": runs,
        "differences": {f"{arm}_minus_{arms[0]}": compare(finals[arms[0]], finals[arm]) for arm in arms[1:]},
    }
    out = write_results(
        section_name(arms),
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
