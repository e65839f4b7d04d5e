"""Run reports: the learning-curve PNG and the end-of-run summary, from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    """The learner's per-step records (one JSON object per line); [] when the file is absent."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def distinct_steps(records: list[dict]) -> list[dict]:
    """The last record of each learner step, in step order.

    A learner killed after its newest checkpoint trained steps whose updates are lost; the restarted
    learner trains those step numbers again (their batches served again, with the same
    ``dropped_stale``/``evicted`` counts the buffer reported in them), so ``metrics.jsonl`` holds
    some steps twice. The last record of a step is the one that stands (the one in ``trained.jsonl``);
    counting every record counted rolled-back steps and their buffer counts twice. Records without a
    ``step`` are kept as they are, in order.
    """
    last: dict[int, dict] = {}
    loose = []
    for record in records:
        if isinstance(record.get("step"), int):
            last[record["step"]] = record
        else:
            loose.append(record)
    return [last[step] for step in sorted(last)] + loose


def plot_learning_curve(records: list[dict], png: Path) -> Path:
    """Plot mean reward and KL to the reference per learner step into ``png``.

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no learner records to plot")
    steps = [r["step"] for r in records]
    fig, (ax_r, ax_kl) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    ax_r.plot(steps, [r["reward_mean"] for r in records], color="tab:blue", alpha=0.35, label="batch mean")
    window = max(1, len(records) // 10)
    smooth = [
        sum(r["reward_mean"] for r in records[max(0, i - window + 1) : i + 1])
        / len(records[max(0, i - window + 1) : i + 1])
        for i in range(len(records))
    ]
    ax_r.plot(steps, smooth, color="tab:blue", label=f"moving mean ({window} steps)")
    ax_r.set_ylabel("reward")
    ax_r.legend(loc="best")
    ax_r.grid(alpha=0.3)
    ax_kl.plot(steps, [r["kl"] for r in records], color="tab:red")
    ax_kl.set_ylabel("KL to reference (nats/token)")
    ax_kl.set_xlabel("learner step (= policy version)")
    ax_kl.grid(alpha=0.3)
    fig.suptitle("streamrl learning curve")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def generation_accounting(records: list[dict], trained_path: Path, group_size: int) -> dict:
    """Where the run's rollouts went: trained, dropped as stale, evicted, still held (generation not wasted).

    Args:
        records: the learner's ``metrics.jsonl`` records, one per step (:func:`distinct_steps`).
        trained_path: the learner's ``trained.jsonl`` ledger (lines rolled back by a restart are not counted).
        group_size: G, rollouts per group (to count the complete groups still held at the end).

    Returns:
        ``generated`` (rollouts that reached the buffer by the last step: trained + dropped + evicted + held
        then; rollouts still in flight at the stop are not known here), ``trained``, ``dropped_stale``,
        ``evicted``, ``held_at_end`` and ``waste_fraction`` = dropped_stale / generated (0 when nothing was).
    """
    trained = 0
    if trained_path.exists():
        for line in trained_path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if entry and "rolled_back_at" not in entry:
                trained += len(entry["rollout_ids"])
    dropped = sum(r.get("dropped_stale", 0) for r in records)
    evicted = sum(r.get("evicted", 0) for r in records)
    held = records[-1].get("buffered_groups", 0) * group_size if records else 0
    generated = trained + dropped + evicted + held
    return {
        "generated": generated,
        "trained": trained,
        "dropped_stale": dropped,
        "evicted": evicted,
        "held_at_end": held,
        "waste_fraction": dropped / generated if generated else 0.0,
    }


def _trained_ids(trained_path: Path) -> set[str]:
    """Rollout ids of the steps that stand in the learner's ``trained.jsonl`` (rolled-back lines not counted)."""
    ids: set[str] = set()
    if trained_path.exists():
        for line in trained_path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if entry and "rolled_back_at" not in entry:
                ids.update(entry["rollout_ids"])
    return ids


def measured_ledger(ledgers: dict[str, list[dict]], trained_path: Path) -> dict:
    """The run's ledger from what each service counted itself (:mod:`streamrl.common.ledger`), hop by hop.

    Unlike :func:`generation_accounting` nothing here is derived from the rest, so a rollout lost
    between two services shows up as ``unaccounted`` at that hop.

    Args:
        ledgers: every replica's counts file by service (:func:`streamrl.common.ledger.read_ledgers`).
        trained_path: the learner's ``trained.jsonl`` (its own measured ledger: each standing step's rollout ids).

    Returns:
        ``sent`` (sum over generators), ``scored`` (passed on by the scorers), ``scorer_dropped`` (their
        reward raised, or a member of their group's did), ``scorer_unsent`` (scored, not sent: the scorer
        stopped while the buffer was full), ``accepted`` and ``buffer_refused`` (by the buffer),
        ``trained``, ``dropped_stale``, ``evicted`` (``reward_failed`` groups included), ``learner_refused``,
        ``held_at_end`` (in groups, plus served batches not acknowledged and not trained) and
        ``unaccounted``: per hop, ``generator_to_scorer`` = sent - scored - scorer_dropped - scorer_unsent
        (rollouts in flight, or lost with a killed scorer), ``scorer_to_buffer`` = scored - accepted -
        buffer_refused (in flight, or lost in a killed buffer's queue), ``buffer`` = accepted - trained -
        dropped_stale - evicted - learner_refused - held_at_end (should be 0), and ``total``. A service
        with no counts file counts 0 (the block says which were ``missing``).
    """

    def total(service: str, key: str) -> int:
        return sum(int(f.get("counts", {}).get(key, 0)) for f in ledgers.get(service, []))

    trained_ids = _trained_ids(trained_path)
    buffers = ledgers.get("buffer", [])
    held = sum(int(f.get("held", 0)) for f in buffers)
    held += len({i for f in buffers for i in f.get("served_unacked_ids", [])} - trained_ids)
    out = {
        "sent": total("generator", "sent"),
        "scored": total("scorer", "scored"),
        "scorer_dropped": total("scorer", "dropped"),
        "scorer_unsent": total("scorer", "unsent"),
        "accepted": total("buffer", "accepted"),
        "buffer_refused": total("buffer", "refused"),
        "trained": len(trained_ids),
        "dropped_stale": total("buffer", "dropped_stale"),
        "evicted": total("buffer", "evicted") + total("buffer", "reward_failed"),
        "learner_refused": total("buffer", "learner_refused"),
        "held_at_end": held,
    }
    hops = {
        "generator_to_scorer": out["sent"] - out["scored"] - out["scorer_dropped"] - out["scorer_unsent"],
        "scorer_to_buffer": out["scored"] - out["accepted"] - out["buffer_refused"],
        "buffer": (
            out["accepted"]
            - out["trained"]
            - out["dropped_stale"]
            - out["evicted"]
            - out["learner_refused"]
            - out["held_at_end"]
        ),
    }
    out["unaccounted"] = {**hops, "total": sum(hops.values())}
    out["missing"] = [s for s in ("generator", "scorer", "buffer") if not ledgers.get(s)]
    return out
