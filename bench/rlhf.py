"""RLHF on real preference data: SFT held-out loss, reward-model accuracy, and (``--pipeline``) PPO.

Default: runs ``streamrl sft`` then ``streamrl rm`` (the reward models start from the SFT model,
as in InstructGPT) with ``deploy/configs/rlhf.toml`` on Anthropic hh-rlhf (harmless-base,
``../shared/data``) and SmolLM2-135M-Instruct, and records: the SFT response loss on held-out
rows before and after, and each reward model's held-out accuracy (pairs ranked right) with its
standard error, its z-score against chance and the mean margin (with ``rm.gold = true``, as in
the recipe: the proxy and the gold model, trained on disjoint halves of the pairs, measured on
the same held-out pairs), plus the wall time of each stage. The held-out rows (``eval_rows``,
500 by default) are never trained on by either stage.

``--pipeline`` runs the whole ``streamrl pipeline`` instead (the two stages, the held-out
evaluation of the SFT policy, streaming PPO against the proxy, the evaluation of the final
policy) and records its summary too: the proxy and gold scores before and after PPO with
standard errors, the change with its paired standard error, and KL to the SFT model.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.rlhf
    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.rlhf --pipeline
    .venv/bin/python -m bench.rlhf --set rm.epochs=3 --set rm.data.train_rows=800
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.report import REPO, command_line, environment, environment_line, markdown_table, write_results
from streamrl.common.config import ConfigError, add_config_arguments, load_config

CONFIG = REPO / "deploy" / "configs" / "rlhf.toml"


def run(config_path: Path, overrides: list[str], *, force: bool) -> dict:
    """Run both stages; returns their summaries and wall times."""
    from streamrl.stages.reward_model import run_rm
    from streamrl.stages.sft import run_sft

    config = load_config(config_path, overrides)
    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    sft = run_sft(config, force=force, log=log)
    sft_seconds = time.perf_counter() - started
    rm = run_rm(config, force=force, log=log)
    return {
        "sft": sft,
        "rm": rm,
        "sft_seconds": round(sft_seconds, 1),
        "rm_seconds": round(time.perf_counter() - started - sft_seconds, 1),
    }


def run_whole(config_path: Path, overrides: list[str], *, force: bool) -> dict:
    """``streamrl pipeline``; returns its summary with the SFT and RM summaries beside it."""
    import json

    from streamrl.pipeline import run_pipeline, stage_dirs

    pipeline = run_pipeline(config_path, overrides, force=force, log=lambda line: print(line, flush=True))
    dirs = stage_dirs(load_config(config_path, overrides))
    summaries = {key: json.loads((dirs[key] / "summary.json").read_text()) for key in ("sft", "rm")}
    return {**summaries, "pipeline": pipeline}


def _rm_row(name: str, rm: dict) -> list:
    se = rm["heldout_accuracy_stderr"]
    z = (rm["heldout_accuracy"] - 0.5) / se if se else float("inf")
    return [
        name,
        rm["train_rows"],
        rm["heldout_rows"],
        f"{rm['frozen_blocks']} blocks frozen",
        f"held-out accuracy {rm['heldout_accuracy']:.3f} +- {rm['heldout_accuracy_stderr']:.3f} "
        f"({z:.1f} SE above chance, n {rm['heldout_comparisons']}), margin {rm['heldout_margin']:+.3f} +- "
        f"{rm['heldout_margin_stderr']:.3f}; training rows {rm['train_accuracy']:.3f}; bias {rm['bias']:+.3f}",
        rm.get("wall_seconds") or "",
    ]


def render(result: dict, env: dict, command: str) -> str:
    """The RESULTS.md section."""
    from streamrl.pipeline import render_summary

    sft, rm = result["sft"], result["rm"]
    models = rm.get("models") or {"rm": rm}
    rows = [
        [
            "sft",
            sft["train_rows"],
            sft["heldout_rows"],
            f"{sft['frozen_blocks']} blocks frozen",
            f"held-out response loss {sft['heldout_loss_before']:.4f} -> {sft['heldout_loss_after']:.4f} nats/token "
            f"({sft['heldout_tokens']} tokens)",
            sft["wall_seconds"],
        ]
    ]
    rows += [_rm_row(f"rm {name}" if name != "rm" else "rm", m) for name, m in models.items()]
    if "models" in rm:
        rows.append(
            [
                "rm (both)",
                rm["train_rows"],
                rm["heldout_rows"],
                "",
                "frozen transformer's output computed once for both heads",
                rm["wall_seconds"],
            ]
        )
    table = markdown_table(
        ["stage", "training rows", "held-out rows", "frozen / trainable", "result", "wall (s)"], rows
    )
    gold = (
        " The proxy and the gold reward model are trained on disjoint halves of the training pairs (split "
        "by a seeded hash of the prompt) and measured on the same held-out pairs."
        if "models" in rm
        else ""
    )
    first = next(iter(models.values()))
    pipeline = ""
    if "pipeline" in result:
        pipeline = "\n### The whole pipeline (`--pipeline`)\n\n" + render_summary(result["pipeline"]).split("\n", 2)[2]
    return f"""## RLHF stages: SFT and reward model on hh-rlhf (`python -m bench.rlhf`)

{environment_line(env)}

Command: `{command}` (config `deploy/configs/rlhf.toml`{
        ", overrides " + ", ".join(result["overrides"]) if result["overrides"] else ""
    }).
Data: Anthropic hh-rlhf harmless-base, 1,800 pairs; {first["heldout_rows"]} held out by a seeded hash of the
prompt (never trained on by either stage). Model SmolLM2-135M-Instruct; the reward model starts from the
SFT model.{gold} The bias stored with each reward model makes its demonstrations (the chosen responses of its
training pairs) score 0 on average; held-out chosen / rejected mean normalised score
{", ".join(f"{name} {m['heldout_mean_best']:+.3f} / {m['heldout_mean_others']:+.3f}" for name, m in models.items())}.

{table}
{pipeline}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(
        parser,
        default=str(CONFIG),
        config_help="stage config (default deploy/configs/rlhf.toml)",
        example="rm.epochs=3",
    )
    parser.add_argument("--force", action="store_true", help="redo stages whose output is complete")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="run the whole `streamrl pipeline` (PPO and the held-out evaluation with proxy and gold scores too)",
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.pipeline:
            from streamrl.pipeline import PipelineError

            try:
                result = run_whole(Path(args.config), args.overrides, force=args.force)
            except PipelineError as err:
                print(f"bench.rlhf: {err}", file=sys.stderr)
                return 2
        else:
            result = run(Path(args.config), args.overrides, force=args.force)
    except ConfigError as err:
        print(f"bench.rlhf: invalid config\n{err}", file=sys.stderr)
        return 2
    result["overrides"] = args.overrides
    env = environment()
    result["environment"] = env
    write_results(
        "rlhf", result, render(result, env, command_line()), results_dir=args.results_dir, results_md=args.results_md
    )
    for name, rm in (result["rm"].get("models") or {"rm": result["rm"]}).items():
        print(
            f"{name} held-out accuracy {rm['heldout_accuracy']:.3f} +- {rm['heldout_accuracy_stderr']:.3f} "
            f"(n {rm['heldout_comparisons']})"
        )
    print(f"sft held-out loss {result['sft']['heldout_loss_before']:.4f} -> {result['sft']['heldout_loss_after']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
