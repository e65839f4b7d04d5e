"""``streamrl pipeline``: the whole InstructGPT pipeline in one command (Ouyang et al. 2022, sec. 3.5).

Stages, in order, each resumable (a complete stage is skipped when the command runs again):

1. ``sft``: :func:`streamrl.stages.sft.run_sft` (``[sft]``): the policy PPO starts from and is held to
   (``model.path`` must be its output folder).
2. ``rm``: :func:`streamrl.stages.reward_model.run_rm` (``[rm]``); with ``rm.gold = true`` a proxy and a
   gold reward model on disjoint halves of the training pairs (Gao et al. 2022). PPO's reward
   (``[[scorer.rewards]]``) must be the proxy (or, without ``gold``, the reward model).
3. ``eval_before``: the SFT policy on the held-out prompts (``[eval]``): the training reward (the
   proxy), every ``[[eval.rewards]]`` (the gold model) and KL to the reference (0 here), kept in
   ``<run.output_dir>/pipeline/eval_before.json``.
4. ``ppo``: the streaming run (``streamrl run``: every service under the launcher, the KL penalty to
   the SFT model, PPO-ptx and the critic as configured). A run that reached
   ``learner.total_steps`` is skipped; an unfinished one is resumed from its newest checkpoint
   (``streamrl run --resume``).
5. ``eval_after``: the final checkpoint on the same prompts with the same seed
   (``pipeline/eval_after.json``).

Then ``<run.output_dir>/pipeline_summary.json`` and ``pipeline_summary.md`` (also printed): each
stage's wall time and whether it ran or was skipped, the SFT held-out loss, the reward models'
held-out accuracy +- standard error, and for the training reward (proxy) and each evaluation
reward (gold) the score before and after PPO with standard errors and the change with its paired
standard error, plus KL to the SFT reference (nats per completion and per token).

Errors: :class:`PipelineError`, whose message names the stage (``stage rm: ...``; for stages
that are not connected, one ``stage: key ...`` line per problem) and the fix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from streamrl.common.config import Config, ConfigError, load_config
from streamrl.common.errors import StartupRefused
from streamrl.runs import RunMode, RunRefused, run_state
from streamrl.training import run as run_training

__all__ = ["PipelineError", "STAGES", "run_pipeline", "stage_dirs", "wiring_problems"]

STAGES = ("sft", "rm", "eval_before", "ppo", "eval_after")


class PipelineError(RuntimeError):
    """A stage cannot run or failed; the message starts with the stage's name and ends with the fix."""


def stage_dirs(config: Config) -> dict[str, Path]:
    """Output folders: ``sft``, ``rm``, the reward model PPO optimises (``proxy``: ``<rm>/proxy`` with
    ``rm.gold``, else ``<rm>``), ``gold`` (``<rm>/gold``, or None) and ``pipeline`` (the evaluations)."""
    out = Path(config.run.output_dir)
    sft = Path(config.sft.output_dir) if config.sft.output_dir else out / "sft"
    rm = Path(config.rm.output_dir) if config.rm.output_dir else out / "rm"
    return {
        "sft": sft.resolve(),
        "rm": rm.resolve(),
        "proxy": (rm / "proxy" if config.rm.gold else rm).resolve(),
        "gold": (rm / "gold").resolve() if config.rm.gold else None,
        "pipeline": out / "pipeline",
    }


def _same(path: str | None, target: Path) -> bool:
    return path is not None and Path(path).expanduser().resolve() == target


def wiring_problems(config: Config) -> list[str]:
    """How ``config`` fails to connect the stages, one line (stage, key, fix) per problem."""
    dirs = stage_dirs(config)
    problems = []
    if not _same(config.model.path, dirs["sft"]):
        problems.append(
            f"ppo: model.path is {config.model.path}, but PPO starts from the SFT model and is held to it; "
            f'fix: set model.path = "{dirs["sft"]}"'
        )
    if not any(_same(spec.model, dirs["proxy"]) for spec in config.scorer.rewards if spec is not None):
        problems.append(
            f"ppo: no [[scorer.rewards]] uses the trained reward model; fix: add [[scorer.rewards]] "
            f'model = "{dirs["proxy"]}"'
        )
    if dirs["gold"] is not None and not any(_same(spec.model, dirs["gold"]) for spec in config.eval.rewards):
        problems.append(
            f"eval: rm.gold = true but no [[eval.rewards]] reports the gold model; fix: add "
            f'[[eval.rewards]] model = "{dirs["gold"]}", name = "gold"'
        )
    return problems


def _load(config_path: str | Path, overrides: list[str]) -> Config:
    try:
        return load_config(config_path, overrides)
    except ConfigError as err:
        raise PipelineError(f"config: {config_path} is invalid\n{err}") from None


def _eval_key(config: Config, model: str) -> dict:
    ev = config.eval
    return {
        "model": str(Path(model).resolve()),
        "limit": ev.limit,
        "seed": ev.seed,
        "samples_per_prompt": ev.samples_per_prompt,
        "prompts": ev.prompts.model_dump(mode="json") if ev.prompts else None,
        "generator_prompts": config.generator.prompts.model_dump(mode="json"),
        "rewards": [s.model_dump(mode="json") for s in config.scorer.rewards],
        "eval_rewards": [s.model_dump(mode="json") for s in ev.rewards],
    }


def _evaluation(config: Config, stage: str, model: str, folder: Path, *, force: bool, log: Callable[[str], None]):
    """``evaluate`` of ``model``, kept in ``folder/<stage>.json`` and reused while its inputs are unchanged."""
    from streamrl.evaluation import EvalResult, evaluate

    path = folder / f"{stage}.json"
    key = _eval_key(config, model)
    if path.is_file() and not force:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            log(f"{stage}: {path} is complete; skipped")
            names = {f.name for f in fields(EvalResult)}
            return EvalResult(**{k: v for k, v in stored["result"].items() if k in names}), True
    log(f"{stage}: evaluating {model} on held-out prompts ...")
    try:
        result = evaluate(
            config,
            model,
            limit=config.eval.limit,
            seed=config.eval.seed,
            samples_per_prompt=config.eval.samples_per_prompt,
        )
    except (OSError, ValueError) as err:
        raise PipelineError(
            f"stage {stage}: {err}; fix: check [eval] (prompts, rewards) and [[scorer.rewards]]"
        ) from None
    log(f"{stage}: {result.line()}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result.as_dict()}, indent=2))
    tmp.replace(path)
    return result, False


def _offline_stage(
    name: str, run: Callable, config: Config, folder: Path, *, force: bool, log: Callable[[str], None]
) -> tuple[dict, bool]:
    from streamrl.stages.finetune import StageError, stage_done

    skipped = stage_done(folder) is not None and not force
    try:
        return run(config, force=force, log=log), skipped
    except StageError as err:
        raise PipelineError(f"stage {name}: {err}") from None


def _ppo(
    config_path: str | Path,
    overrides: list[str],
    config: Config,
    *,
    force: bool,
    generators: int,
    log: Callable[[str], None],
) -> bool:
    """Run (or resume) the streaming PPO stage; True when it had already reached ``total_steps``."""
    _, step = run_state(config)
    total = config.learner.total_steps
    if step is not None and step >= total and not force:
        log(f"ppo: {config.run.output_dir} reached learner.total_steps = {total}; skipped")
        return True
    try:
        code = run_training(
            config_path, overrides, mode=RunMode.FRESH if force else RunMode.RESUME, generators=generators
        ).exit_code
    except ConfigError as err:  # what the services need (e.g. a missing reward-model folder)
        raise PipelineError(f"stage ppo: the services cannot start\n{err}") from None
    except (RunRefused, StartupRefused) as err:
        raise PipelineError(f"stage ppo: {err}") from None
    _, step = run_state(config)
    if code != 0 or step is None or step < total:
        raise PipelineError(
            f"stage ppo: the streaming run exited with status {code} at checkpoint step "
            f"{step if step is not None else 0} of {total} (its messages are above); fix: the cause "
            "printed there, then run `streamrl pipeline` again: it resumes from the newest checkpoint"
        )
    return False


def run_pipeline(
    config_path: str | Path,
    overrides: list[str] | None = None,
    *,
    force: bool = False,
    generators: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every stage of the pipeline (module docstring) and write its summary.

    Args:
        config_path: TOML config with ``[sft]``, ``[rm]``, the PPO run and ``[eval]``.
        overrides: ``section.key=value`` strings, as ``--set``.
        force: run every stage again (``--force``): the stages retrain, the PPO run starts over
            (``--fresh``: the previous run's files move to ``<output_dir>/previous/``).
        generators: rollout generator processes of the PPO run.
        log: progress lines.

    Returns:
        The summary (also written to ``<run.output_dir>/pipeline_summary.json``).

    Raises:
        PipelineError: an invalid config, stages not wired together, or a stage that failed.
    """
    from streamrl.evaluation import compare
    from streamrl.services.learner.checkpoint import latest_checkpoint
    from streamrl.stages.reward_model import run_rm
    from streamrl.stages.sft import run_sft

    overrides = list(overrides or [])
    config = _load(config_path, overrides)
    problems = wiring_problems(config)
    if problems:
        raise PipelineError("the stages are not connected:\n" + "\n".join(f"  - {p}" for p in problems))
    dirs = stage_dirs(config)
    out = Path(config.run.output_dir)
    previous = _previous_times(out / "pipeline_summary.json")
    stages: dict[str, dict] = {}

    def timed(name: str, work: Callable[[], tuple]) -> tuple:
        started = time.perf_counter()
        result = work()
        skipped = result[-1]
        seconds = round(time.perf_counter() - started, 1)
        stages[name] = {
            "status": "skipped" if skipped else "ran",
            "seconds_this_invocation": seconds,
            "wall_seconds": previous.get(name, seconds) if skipped else seconds,
        }
        return result

    sft, _ = timed("sft", lambda: _offline_stage("sft", run_sft, config, dirs["sft"], force=force, log=log))
    stages["sft"]["wall_seconds"] = sft.get("wall_seconds", stages["sft"]["wall_seconds"])
    rm, _ = timed("rm", lambda: _offline_stage("rm", run_rm, config, dirs["rm"], force=force, log=log))
    stages["rm"]["wall_seconds"] = rm.get("wall_seconds", stages["rm"]["wall_seconds"])
    before, _ = timed(
        "eval_before",
        lambda: _evaluation(config, "eval_before", str(dirs["sft"]), dirs["pipeline"], force=force, log=log),
    )
    timed("ppo", lambda: (_ppo(config_path, overrides, config, force=force, generators=generators, log=log),))
    final = latest_checkpoint(out / "checkpoints")
    after, _ = timed(
        "eval_after",
        lambda: _evaluation(config, "eval_after", str(final / "model"), dirs["pipeline"], force=force, log=log),
    )
    summary = _summary(config, config_path, overrides, stages, sft, rm, before, after, final, compare)
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    table = render_summary(summary)
    (out / "pipeline_summary.md").write_text(table)
    log(table)
    log(f"pipeline: summary in {out / 'pipeline_summary.json'} and {out / 'pipeline_summary.md'}")
    return summary


def _previous_times(path: Path) -> dict[str, float]:
    try:
        return {k: v["wall_seconds"] for k, v in json.loads(path.read_text())["stages"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _rm_models(rm: dict) -> dict[str, dict]:
    models = rm.get("models") or {"reward_model": rm}
    return {
        name: {
            "dir": m["output_dir"],
            "train_rows": m["train_rows"],
            "heldout_comparisons": m["heldout_comparisons"],
            "heldout_accuracy": m["heldout_accuracy"],
            "heldout_accuracy_stderr": m["heldout_accuracy_stderr"],
            "heldout_margin": m["heldout_margin"],
            "heldout_margin_stderr": m["heldout_margin_stderr"],
            "bias": m["bias"],
        }
        for name, m in models.items()
    }


def _summary(config: Config, config_path, overrides, stages, sft, rm, before, after, final, compare) -> dict:
    out = Path(config.run.output_dir)
    run_summary = {}
    if (out / "summary.json").is_file():
        run_summary = json.loads((out / "summary.json").read_text())
    scores = {"proxy": compare(before, after, "reward")}
    scores.update({name: compare(before, after, name) for name in after.rewards})
    return {
        "config": str(config_path),
        "overrides": overrides,
        "output_dir": str(out),
        "stages": stages,
        "total_wall_seconds": round(sum(s["wall_seconds"] for s in stages.values()), 1),
        "sft": {
            "dir": sft["output_dir"],
            "train_rows": sft["train_rows"],
            "heldout_rows": sft["heldout_rows"],
            "heldout_loss_before": sft["heldout_loss_before"],
            "heldout_loss_after": sft["heldout_loss_after"],
        },
        "reward_models": _rm_models(rm),
        "ppo": {
            "steps": config.learner.total_steps,
            "final_checkpoint": str(final),
            "train_reward_first": run_summary.get("train_reward_first"),
            "train_reward_last": run_summary.get("train_reward_last"),
        },
        "eval": {
            "prompts": after.prompts,
            "samples_per_prompt": after.samples_per_prompt,
            "seed": config.eval.seed,
            "scores": scores,
            "kl_per_completion_before": before.kl_mean,
            "kl_per_completion_after": after.kl_mean,
            "kl_per_token_after": after.kl_per_token,
            "completion_tokens_before": before.completion_tokens_mean,
            "completion_tokens_after": after.completion_tokens_mean,
        },
        "proxy_improved_by_2_stderr": bool(scores["proxy"]["delta"] > 2 * scores["proxy"]["delta_stderr"]),
    }


def render_summary(summary: dict) -> str:
    """The summary as Markdown tables (stages; reward models; held-out scores before/after PPO)."""
    lines = [f"# RLHF pipeline summary ({summary['config']})", "", "| stage | status | wall (s) |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['wall_seconds']:.1f} |" for name, s in summary["stages"].items()]
    lines += [f"| total | | {summary['total_wall_seconds']:.1f} |", ""]
    sft = summary["sft"]
    lines += [
        f"SFT: held-out response loss {sft['heldout_loss_before']:.4f} -> {sft['heldout_loss_after']:.4f} "
        f"nats/token ({sft['train_rows']} training rows, {sft['heldout_rows']} held out).",
        "",
        "| reward model | training pairs | held-out accuracy | held-out margin | comparisons |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {m['train_rows']} | {m['heldout_accuracy']:.3f} +- {m['heldout_accuracy_stderr']:.3f} | "
        f"{m['heldout_margin']:+.3f} +- {m['heldout_margin_stderr']:.3f} | {m['heldout_comparisons']} |"
        for name, m in summary["reward_models"].items()
    ]
    ev = summary["eval"]
    lines += [
        "",
        f"Held-out prompts: {ev['prompts']} x {ev['samples_per_prompt']} completions (seed {ev['seed']}); "
        f"PPO {summary['ppo']['steps']} steps. Change: paired over prompts.",
        "",
        "| score | SFT policy | after PPO | change | change / SE |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {s['before']:+.4f} +- {s['before_stderr']:.4f} | {s['after']:+.4f} +- "
        f"{s['after_stderr']:.4f} | {s['delta']:+.4f} +- {s['delta_stderr']:.4f} | {s['delta_z']:+.1f} |"
        for name, s in ev["scores"].items()
    ]
    lines += [
        f"| KL to SFT (nats/completion) | {ev['kl_per_completion_before']:.4f} | "
        f"{ev['kl_per_completion_after']:.4f} | | |",
        f"| completion length (tokens) | {ev['completion_tokens_before']:.1f} | "
        f"{ev['completion_tokens_after']:.1f} | | |",
        "",
    ]
    return "\n".join(lines)
