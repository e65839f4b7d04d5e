"""One streaming training job, as ``streamrl run`` and the pipeline's PPO stage start it.

:func:`run` validates the config and what every service needs from it, applies the run mode to
``run.output_dir`` (:mod:`streamrl.runs`), records the launch there, then starts every service as
its own process from the Procfile that ships in the package (``streamrl.deploy``) under honcho's
process manager (:mod:`streamrl.launcher`), in the current directory. When the learner finishes
(or any process dies, or the job gets SIGTERM/SIGINT) every service is stopped and waited for;
then the learning curve (PNG) and ``summary.json`` are written to the run's output folder, with
the initial and final policies' held-out scores when an evaluation was asked for.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streamrl.common.config import SERVICES, Config, load_config
from streamrl.common.ledger import read_ledgers
from streamrl.common.service import CONFIG_ENV, OVERRIDES_ENV
from streamrl.deploy import PROCFILE
from streamrl.launcher import interrupted, run_procfile
from streamrl.ports import PortsTaken, claim_ports
from streamrl.report import distinct_steps, generation_accounting, measured_ledger, plot_learning_curve, read_metrics
from streamrl.runs import JournalRewards, RunMode, RunRefused, prepare_run_folder, record_launch
from streamrl.services.scorer.http_reward import probe_report

if TYPE_CHECKING:
    from streamrl.evaluation import EvalResult

# The evaluation (transformers, the generator's engine) and the checkpoint and model helpers (torch)
# are imported where they are used: a run without --eval would otherwise import torch and transformers
# before starting any service, seconds of CPU on every `streamrl run`.

__all__ = ["EvalOptions", "JobResult", "run", "summarize"]


@dataclass(frozen=True)
class EvalOptions:
    """Held-out evaluation settings; a field left None takes ``[eval]``'s value.

    Attributes:
        limit: held-out prompts used (``eval.limit``).
        seed: sampling seed (``eval.seed``).
        samples_per_prompt: completions per prompt (``eval.samples_per_prompt``).
    """

    limit: int | None = None
    seed: int | None = None
    samples_per_prompt: int | None = None

    def resolve(self, config: Config) -> dict:
        """:func:`streamrl.evaluation.evaluate` keyword arguments: these values where given, else ``[eval]``'s."""
        ev = config.eval
        return {
            "limit": self.limit if self.limit is not None else ev.limit,
            "seed": self.seed if self.seed is not None else ev.seed,
            "samples_per_prompt": self.samples_per_prompt
            if self.samples_per_prompt is not None
            else ev.samples_per_prompt,
        }


@dataclass(frozen=True)
class JobResult:
    """What a finished job leaves.

    Attributes:
        exit_code: the services' exit status (0: the learner finished; 130/143: stopped by a
            signal, :func:`streamrl.launcher.interrupted`).
        summary: the contents of ``<run.output_dir>/summary.json`` (:func:`summarize`).
    """

    exit_code: int
    summary: dict


def run(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    mode: RunMode = RunMode.NEW,
    generators: int = 1,
    scorers: int | None = None,
    stop_timeout_s: float = 60.0,
    evaluation: EvalOptions | None = None,
    free_ports: bool = False,
    journal_rewards: JournalRewards = JournalRewards.KEEP,
    probe_rewards: bool = True,
) -> JobResult:
    """Run one streaming training job to its end (module docstring).

    Args:
        config_path: the TOML run config.
        overrides: ``section.key=value`` strings (``--set``), applied after the file.
        mode: what to do with a ``run.output_dir`` that already holds a run (:class:`RunMode`).
        generators: rollout generator processes.
        scorers: scorer processes; None = one per ``endpoints.scorers`` entry.
        stop_timeout_s: seconds each service gets to exit after SIGTERM before it is killed.
        evaluation: score the initial and the final policy on held-out prompts; None = no evaluation.
        journal_rewards: with ``mode = RunMode.RESUME``, what happens to the journaled rollouts when
            ``scorer.rewards`` changed since the previous launch (:class:`streamrl.runs.JournalRewards`:
            keep them as scored, score them again, or move the journal to ``previous/``).
        free_ports: every port of the run on a free loopback port (:func:`streamrl.ports.claim_ports`;
            also done when the config sets no port and a default one is taken).
        probe_rewards: send each HTTP reward server one request before anything starts
            (:func:`streamrl.services.scorer.http_reward.probe_report`), so a server that cannot answer
            refuses the run at once instead of a learner waiting ``learner.batch_timeout_s``.

    Returns:
        The services' exit status and the run's summary.

    Raises:
        ConfigError: an invalid config, or a file, folder, import or device a service needs.
        RunRefused: the run folder and ``mode`` do not agree (:func:`streamrl.runs.prepare_run_folder`),
            more ``scorers`` than ``endpoints.scorers`` lists, a port the config sets is taken here, or
            (``probe_rewards``) a reward server that did not answer.
        StartupRefused: the run folder is in use.
    """
    overrides = list(overrides)
    config = load_config(config_path, overrides, resources=SERVICES)
    if probe_rewards and (report := probe_report(config.scorer.rewards)) is not None:
        raise RunRefused(report)
    scorers = scorers if scorers is not None else len(config.endpoints.scorers)
    try:  # another run on this machine: free ports, or the keys of the taken ones (streamrl/ports.py)
        ports = claim_ports(config, generators, scorers, free_ports=free_ports)
    except PortsTaken as err:
        raise RunRefused(str(err)) from None
    if ports:
        overrides += ports
        config = load_config(config_path, overrides, resources=SERVICES)
    if scorers > len(config.endpoints.scorers):
        raise RunRefused(
            f"--scorers {scorers} but endpoints.scorers lists {len(config.endpoints.scorers)}; "
            "fix: add one endpoint per scorer to the config, or run with --free-ports"
        )
    print(prepare_run_folder(config, mode, journal_rewards=journal_rewards), flush=True)
    record_launch(config, mode=mode, config_path=str(config_path), overrides=overrides)
    started = time.time()
    before = None
    if evaluation is not None:
        from streamrl.common.models import resolve_model_path
        from streamrl.evaluation import evaluate

        base = resolve_model_path(config.model.path, config.model.cache_path)
        print("streamrl: evaluating the initial policy on held-out prompts ...", flush=True)
        before = evaluate(config, base, **evaluation.resolve(config))
        print(f"held-out before: {before.line()}", flush=True)
    env = dict(os.environ)
    env[CONFIG_ENV] = str(Path(config_path).resolve())
    env[OVERRIDES_ENV] = "\n".join(overrides)
    env["PYTHON"] = sys.executable
    env.setdefault("PYTHONUNBUFFERED", "1")
    feedback = 1 if config.feedback.enabled else 0
    print(
        f"streamrl: starting learner, buffer, {scorers} scorer(s) and {generators} generator(s)"
        + (f", feedback page on http://{config.feedback.http_host}:{config.feedback.http_port}/" if feedback else "")
        + f"; output in {config.run.output_dir}",
        flush=True,
    )
    code = run_procfile(
        PROCFILE,
        {"generator": generators, "scorer": scorers, "feedback": feedback},
        env,
        os.getcwd(),
        stop_timeout_s=stop_timeout_s,
    )
    if interrupted(code):
        print(f"streamrl: stopped by a signal (exit status {code}); every service has exited", file=sys.stderr)
        before = None  # no final evaluation of an interrupted run
    summary = summarize(config, str(config_path), overrides, started, before=before, evaluation=evaluation)
    return JobResult(exit_code=code, summary=summary)


def summarize(
    config: Config,
    config_path: str,
    overrides: list[str],
    started: float,
    *,
    before: EvalResult | None = None,
    evaluation: EvalOptions | None = None,
) -> dict:
    """After a run: plot the learning curve, evaluate the final checkpoint against ``before`` (the
    initial policy's held-out result, when there is one), write and print the summary.

    Args:
        config: the run's config.
        config_path, overrides: as given to :func:`run` (recorded in the summary).
        started: ``time.time()`` when the services started (the summary's ``wall_seconds``).
        before: the initial policy's evaluation; None = no evaluation.
        evaluation: the settings ``before`` was computed with (the final policy gets the same).

    Returns:
        The summary, also written to ``<run.output_dir>/summary.json``.
    """
    from streamrl.services.learner.checkpoint import latest_checkpoint

    output = Path(config.run.output_dir)
    records = distinct_steps(read_metrics(output / "metrics.jsonl"))  # rolled-back steps once
    final = latest_checkpoint(output / "checkpoints")
    summary: dict = {
        "config": config_path,
        "overrides": overrides,
        "steps": len(records),
        "wall_seconds": round(time.time() - started, 1),
    }
    if records:
        summary["learning_curve"] = str(plot_learning_curve(records, output / "learning_curve.png"))
        k = max(1, len(records) // 5)
        summary["train_reward_first"] = sum(r["reward_mean"] for r in records[:k]) / k
        summary["train_reward_last"] = sum(r["reward_mean"] for r in records[-k:]) / k
        summary.update(generation_accounting(records, output / "trained.jsonl", config.generator.group_size))
        summary["behaviour_versions_seen"] = len({v for r in records for v in r["behaviour_versions"]})
    summary["ledger"] = measured_ledger(read_ledgers(output), output / "trained.jsonl")
    if before is not None and final is not None:
        from streamrl.evaluation import compare, evaluate

        after = evaluate(config, str(final / "model"), **(evaluation or EvalOptions()).resolve(config))
        delta = after.reward_mean - before.reward_mean
        se = math.sqrt(before.reward_stderr**2 + after.reward_stderr**2)
        changes = {name: compare(before, after, name) for name in before.per_prompt}
        summary.update(
            before=before.as_dict(),
            after=after.as_dict(),
            reward_delta=delta,
            reward_delta_stderr=se,
            improved_by_2_stderr=bool(delta > 2 * se),
            changes=changes,
        )
        print(f"held-out before: {before.line()}")
        print(f"held-out after:  {after.line()}")
        print(f"held-out reward change {delta:+.4f} +- {se:.4f} ({'>' if delta > 2 * se else '<='} 2 stderr)")
        for name, change in changes.items():
            print(
                f"  {name}: {change['before']:+.4f} -> {change['after']:+.4f}, change {change['delta']:+.4f} +- "
                f"{change['delta_stderr']:.4f} (paired over prompts)"
            )
        for sample in after.samples:
            print(f"  [{sample['reward']:+.3f}] {sample['prompt']!r} -> {sample['completion']!r}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {output / 'summary.json'}" + (f", learning curve: {summary['learning_curve']}" if records else ""))
    return summary
