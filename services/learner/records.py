"""What the learner writes per step: the ``metrics.jsonl`` record, the ``trained.jsonl`` ledger line, the log line."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from streamrl.common.messages import Batch

SAMPLES_PER_RECORD = 2
"""Prompt/completion pairs kept in each ``metrics.jsonl`` record, to read alongside the numbers."""


def step_record(
    *,
    step: int,
    version: int,
    now: float,
    stats: dict,
    batch: Batch,
    behaviour_versions: Sequence[int],
    wait_s: float,
    train_s: float,
    publish_s: float,
) -> dict:
    """The ``metrics.jsonl`` record of one learner step.

    Args:
        step, version: the step just completed and the version it produced.
        now: wall-clock time (Unix seconds) of the record.
        stats: the trainer's statistics of the step (losses, KL, ratios, ``tokens``, ...).
        batch: the batch trained on (its buffer counts and first samples are recorded).
        behaviour_versions: ``[B]`` the policy version that sampled each row.
        wait_s, train_s, publish_s: seconds waiting for the batch, training, publishing.

    Returns:
        ``stats`` plus ``samples_per_second`` (rows over wait + train seconds), the buffer's
        ``dropped_stale``/``evicted``/``buffered_groups``, the distinct ``behaviour_versions``,
        ``generators_in_batch``, the first :data:`SAMPLES_PER_RECORD` samples and the timings.
    """
    return {
        "step": step,
        "version": version,
        "time": now,
        **stats,
        "samples_per_second": len(batch.rollouts) / (train_s + wait_s),
        "dropped_stale": batch.dropped_stale,
        "evicted": batch.evicted,
        "buffered_groups": batch.buffered_groups,
        "behaviour_versions": sorted({int(v) for v in behaviour_versions}),
        "generators_in_batch": len({s.rollout.generator_id for s in batch.rollouts}),
        "samples": [
            {
                "prompt": s.rollout.prompt_text,
                "completion": s.rollout.completion_text,
                "reward": s.reward,
                "policy_version": s.rollout.policy_version,
            }
            for s in batch.rollouts[:SAMPLES_PER_RECORD]
        ],
        "wait_data_s": wait_s,
        "train_s": train_s,
        "publish_s": publish_s,
    }


def ledger_line(step: int, version: int, batch: Batch) -> str:
    """The ``trained.jsonl`` line of a step: the rollout ids trained on (the learner's ledger)."""
    return json.dumps({"step": step, "version": version, "rollout_ids": [s.rollout.rollout_id for s in batch.rollouts]})


def roll_back_ledger(path: Path, checkpoint_step: int) -> list[int]:
    """Move the ``trained.jsonl`` lines of steps after ``checkpoint_step`` (trained by a learner killed
    before it checkpointed them: their updates are lost) to ``rolled_back.jsonl`` beside it, each with
    ``"rolled_back_at"`` (Unix seconds); ``path`` is rewritten atomically (temp file, fsync, rename).

    After this, ``trained.jsonl`` holds checkpointed steps only, each once; the steps trained from now
    on are appended (durable at the next checkpoint). The buffer serves the rolled-back batches again
    (``BatchRequest.durable_version``), so their rollout ids come back under new step numbers.

    Returns:
        The rolled-back step numbers, in file order (empty: nothing changed on disk).

    Raises:
        ValueError: a line of ``path`` is not a JSON object with an integer ``step``.
    """
    if not path.exists():
        return []
    kept: list[tuple[int, str]] = []
    moved: list[tuple[int, str]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a ledger line ({err}); fix: repair or move the file aside") from err
        (kept if step <= checkpoint_step else moved).append((step, line))
    if not moved:
        return []
    now = time.time()
    with path.with_name("rolled_back.jsonl").open("a") as f:
        for _, line in moved:
            f.write(json.dumps({**json.loads(line), "rolled_back_at": now}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(line + "\n" for _, line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return [step for step, _ in moved]


def append_line(path: Path, line: str, *, fsync: bool = False) -> None:
    """Append ``line`` and a newline to ``path``; with ``fsync`` it is on disk when this returns."""
    with path.open("a") as f:
        f.write(line + "\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def step_log_line(record: dict, total_steps: int) -> str:
    """The console line of a step record (reward, KL, entropy, clipping, ratios, ESS, staleness, throughput)."""
    r = record
    return (
        f"step {r['step']}/{total_steps} v{r['version']} | reward {r['reward_mean']:.3f} | kl {r['kl']:.4f} | "
        f"entropy {r['entropy']:.3f} | clip {r['clip_fraction']:.3f} | "
        f"ratio {r['importance_ratio_mean']:.3f}/{r['importance_ratio_max']:.3f} | ess {r['ess_fraction']:.2f} | "
        f"stale {r['staleness_min']:.0f}-{r['staleness_max']:.0f} | dropped {r['dropped_stale']} | "
        f"{r['samples_per_second']:.1f} samples/s | wait {r['wait_data_s']:.1f}s | "
        f"generators {r['generators_in_batch']}"
    )
