"""streamrl.report.generation_accounting: generated, trained, dropped and the waste fraction of a run."""

from __future__ import annotations

import json

import pytest

from streamrl.report import generation_accounting


def test_counts_by_hand(tmp_path):
    ledger = tmp_path / "trained.jsonl"
    ledger.write_text("\n".join(json.dumps(x) for x in [
        {"step": 1, "version": 1, "rollout_ids": ["a", "b", "c", "d"]},
        {"step": 2, "version": 2, "rollout_ids": ["e", "f", "g", "h"], "rolled_back_at": 5.0},  # not trained
        {"step": 2, "version": 2, "rollout_ids": ["e", "f", "g", "h"]},
    ]) + "\n")
    records = [{"dropped_stale": 4, "evicted": 0, "buffered_groups": 3},
               {"dropped_stale": 2, "evicted": 2, "buffered_groups": 1}]
    got = generation_accounting(records, ledger, group_size=4)
    # generated = 8 trained + 6 dropped + 2 evicted + 1 group of 4 still held
    assert got == {"generated": 20, "trained": 8, "dropped_stale": 6, "evicted": 2, "held_at_end": 4,
                   "waste_fraction": pytest.approx(6 / 20)}


def test_empty_run(tmp_path):
    got = generation_accounting([], tmp_path / "absent.jsonl", group_size=4)
    assert got["generated"] == 0 and got["waste_fraction"] == 0.0


def test_rolled_back_steps_count_once(tmp_path):
    """A learner killed after its checkpoint at step 1 had trained step 2; the restarted learner trains
    step 2 again on the batch served again (the same dropped count in it): metrics.jsonl holds step 2
    twice. The summary counts 2 steps and the 3 dropped rollouts once."""
    from streamrl.report import distinct_steps

    ledger = tmp_path / "trained.jsonl"
    ledger.write_text("\n".join(json.dumps({"step": s, "version": s, "rollout_ids": ["a", "b"]})
                                for s in (1, 2)) + "\n")
    records = [{"step": 1, "dropped_stale": 1, "evicted": 0, "buffered_groups": 0, "reward_mean": 0.0},
               {"step": 2, "dropped_stale": 3, "evicted": 0, "buffered_groups": 1, "reward_mean": 0.1},  # rolled back
               {"step": 2, "dropped_stale": 3, "evicted": 0, "buffered_groups": 0, "reward_mean": 0.2}]
    steps = distinct_steps(records)
    assert [r["step"] for r in steps] == [1, 2] and steps[-1]["reward_mean"] == 0.2
    got = generation_accounting(steps, ledger, group_size=2)
    assert got["dropped_stale"] == 1 + 3 and got["trained"] == 4 and got["held_at_end"] == 0
