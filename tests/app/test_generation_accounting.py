"""streamrl.report: generation_accounting (generated, trained, dropped, the waste fraction of a run) and the
measured ledger (what each service counted itself, the unaccounted difference per hop)."""

from __future__ import annotations

import json

import pytest

from streamrl.common.ledger import Ledger, ledger_path, read_ledgers
from streamrl.report import generation_accounting, measured_ledger


def test_counts_by_hand(tmp_path):
    ledger = tmp_path / "trained.jsonl"
    ledger.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"step": 1, "version": 1, "rollout_ids": ["a", "b", "c", "d"]},
                {"step": 2, "version": 2, "rollout_ids": ["e", "f", "g", "h"], "rolled_back_at": 5.0},  # not trained
                {"step": 2, "version": 2, "rollout_ids": ["e", "f", "g", "h"]},
            ]
        )
        + "\n"
    )
    records = [
        {"dropped_stale": 4, "evicted": 0, "buffered_groups": 3},
        {"dropped_stale": 2, "evicted": 2, "buffered_groups": 1},
    ]
    got = generation_accounting(records, ledger, group_size=4)
    # generated = 8 trained + 6 dropped + 2 evicted + 1 group of 4 still held
    assert got == {
        "generated": 20,
        "trained": 8,
        "dropped_stale": 6,
        "evicted": 2,
        "held_at_end": 4,
        "waste_fraction": pytest.approx(6 / 20),
    }


def test_empty_run(tmp_path):
    got = generation_accounting([], tmp_path / "absent.jsonl", group_size=4)
    assert got["generated"] == 0 and got["waste_fraction"] == 0.0


def test_rolled_back_steps_count_once(tmp_path):
    """A learner killed after its checkpoint at step 1 had trained step 2; the restarted learner trains
    step 2 again on the batch served again (the same dropped count in it): metrics.jsonl holds step 2
    twice. The summary counts 2 steps and the 3 dropped rollouts once."""
    from streamrl.report import distinct_steps

    ledger = tmp_path / "trained.jsonl"
    ledger.write_text(
        "\n".join(json.dumps({"step": s, "version": s, "rollout_ids": ["a", "b"]}) for s in (1, 2)) + "\n"
    )
    records = [
        {"step": 1, "dropped_stale": 1, "evicted": 0, "buffered_groups": 0, "reward_mean": 0.0},
        {"step": 2, "dropped_stale": 3, "evicted": 0, "buffered_groups": 1, "reward_mean": 0.1},  # rolled back
        {"step": 2, "dropped_stale": 3, "evicted": 0, "buffered_groups": 0, "reward_mean": 0.2},
    ]
    steps = distinct_steps(records)
    assert [r["step"] for r in steps] == [1, 2] and steps[-1]["reward_mean"] == 0.2
    got = generation_accounting(steps, ledger, group_size=2)
    assert got["dropped_stale"] == 1 + 3 and got["trained"] == 4 and got["held_at_end"] == 0


def _write_ledgers(run, files: dict[str, dict]) -> None:
    for name, content in files.items():
        service, index = name.rsplit("-", 1)
        ledger = Ledger(ledger_path(run, service, int(index)))
        for key, n in content.get("counts", {}).items():
            ledger.add(key, n, flush=False)
        for key, value in content.items():
            if key != "counts":
                ledger.set_gauge(key, value)
        ledger.flush()


def _trained(run, steps: list[list[str]]):
    path = run / "trained.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s + 1, "version": s + 1, "rollout_ids": ids}) + "\n" for s, ids in enumerate(steps))
    )
    return path


def test_measured_ledger_balances_by_hand(tmp_path):
    # two generators sent 6 + 6; the scorer passed on 10 and dropped 2 (a group whose reward raised);
    # the buffer accepted 10: 4 trained, 2 dropped stale, 2 held in a group, 4 in a batch served and
    # not acknowledged, of which 2 (a, b) the learner trained at its last step
    _write_ledgers(
        tmp_path,
        {
            "generator-0": {"counts": {"sent": 6}},
            "generator-1": {"counts": {"sent": 6}},
            "scorer-0": {"counts": {"scored": 10, "dropped": 2}},
            "buffer-0": {
                "counts": {"accepted": 10, "dropped_stale": 2},
                "held": 2,
                "served_unacked_ids": ["a", "b", "x", "y"],
            },
        },
    )
    got = measured_ledger(read_ledgers(tmp_path), _trained(tmp_path, [["c", "d"], ["a", "b"]]))
    assert (
        got["sent"],
        got["scored"],
        got["scorer_dropped"],
        got["accepted"],
        got["trained"],
        got["dropped_stale"],
        got["evicted"],
        got["held_at_end"],
    ) == (12, 10, 2, 10, 4, 2, 0, 4)
    assert got["unaccounted"] == {"generator_to_scorer": 0, "scorer_to_buffer": 0, "buffer": 0, "total": 0}
    assert got["missing"] == []


def test_a_rollout_sent_and_never_accepted_is_unaccounted(tmp_path):
    """A planted loss: the scorer passed on 8 rollouts, the buffer accepted 7 (one lost on the way, e.g.
    in a killed buffer's queue). The old computed ledger cannot see it; the measured one shows 1."""
    _write_ledgers(
        tmp_path,
        {
            "generator-0": {"counts": {"sent": 8}},
            "scorer-0": {"counts": {"scored": 8}},
            "buffer-0": {"counts": {"accepted": 7, "evicted": 3}, "held": 0, "served_unacked_ids": []},
        },
    )
    got = measured_ledger(read_ledgers(tmp_path), _trained(tmp_path, [["a", "b", "c", "d"]]))
    assert got["unaccounted"] == {"generator_to_scorer": 0, "scorer_to_buffer": 1, "buffer": 0, "total": 1}
    # and one sent by a generator that no scorer saw (in flight at the stop) is unaccounted at its hop
    _write_ledgers(tmp_path, {"generator-0": {"counts": {"sent": 1}}})  # continues from its file: 9 sent
    got = measured_ledger(read_ledgers(tmp_path), tmp_path / "trained.jsonl")
    assert got["unaccounted"]["generator_to_scorer"] == 1 and got["unaccounted"]["total"] == 2


def test_missing_services_are_named(tmp_path):
    got = measured_ledger(read_ledgers(tmp_path), tmp_path / "absent.jsonl")
    assert got["missing"] == ["generator", "scorer", "buffer"] and got["unaccounted"]["total"] == 0
