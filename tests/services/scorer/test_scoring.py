"""The scorer's pure logic: the endpoint a replica binds and scoring one micro-batch."""

from __future__ import annotations

import dataclasses

import pytest

from streamrl.common.messages import GroupDropped, ScoredRollout, decode, encode
from streamrl.services.scorer.http_reward import RewardServerDown
from streamrl.services.scorer.rewards import CompositeReward, RewardComponent
from streamrl.services.scorer.scoring import DroppedGroups, drop_failed_groups, score_batch, score_each, scorer_endpoint
from support import scored_item


def rollouts(texts: list[tuple[str, str, dict]]):
    base = scored_item("g", 0).rollout
    return [
        dataclasses.replace(base, rollout_id=f"g-{i}", prompt_text=p, completion_text=c, metadata=meta)
        for i, (p, c, meta) in enumerate(texts)
    ]


def length(prompts, completions, metadata):
    return [float(len(c)) for c in completions]


def matches(prompts, completions, metadata):
    return [1.0 if c == m.get("answer") else 0.0 for c, m in zip(completions, metadata)]


def test_scorer_endpoint_is_the_replicas_entry():
    assert scorer_endpoint(["tcp://a:1", "tcp://b:2"], 1) == "tcp://b:2"
    with pytest.raises(ValueError, match=r"scorer index 2 has no endpoint: endpoints.scorers lists 2; fix: add one"):
        scorer_endpoint(["tcp://a:1", "tcp://b:2"], 2)
    with pytest.raises(ValueError, match="scorer index -1"):
        scorer_endpoint(["tcp://a:1"], -1)


def test_score_batch_weights_parts_and_keeps_order_and_rollouts():
    reward = CompositeReward([RewardComponent("length", 0.5, length), RewardComponent("exact", 2.0, matches)])
    batch = rollouts([("Q1", "abcd", {"answer": "abcd"}), ("Q2", "xy", {"answer": "no"}), ("Q3", "", {})])
    scored = score_batch(reward, batch, "scorer-3")
    # totals by hand: 0.5 * len + 2 * exact
    assert [s.reward for s in scored] == [0.5 * 4 + 2.0, 0.5 * 2, 0.0]
    assert [s.reward_parts for s in scored] == [
        {"length": 4.0, "exact": 1.0},
        {"length": 2.0, "exact": 0.0},
        {"length": 0.0, "exact": 0.0},
    ]
    assert [s.rollout for s in scored] == batch
    assert {(s.sender, s.scorer_id) for s in scored} == {("scorer-3", "scorer-3")}
    again = decode(encode(scored[0]), expected=(ScoredRollout,))  # what the buffer receives
    assert again.reward == 4.0 and again.rollout.rollout_id == "g-0" and again.reward_parts == scored[0].reward_parts


def test_score_batch_refuses_a_reward_that_loses_rollouts():
    batch = rollouts([("Q1", "a", {}), ("Q2", "b", {})])
    with pytest.raises(ValueError, match="returned 1 totals and 2 parts for 2 rollouts"):
        score_batch(lambda p, c, m: ([1.0], [{}, {}]), batch, "scorer-0")


def test_score_batch_passes_reward_errors_on():
    def broken(prompts, completions, metadata):
        raise KeyError("answer")

    with pytest.raises(KeyError):
        score_batch(broken, rollouts([("Q", "a", {})]), "scorer-0")


def grouped(completions: list[str], group_size: int):
    """Rollouts ``g-i`` of groups ``G0, G1, ...`` of ``group_size`` each, one per completion."""
    return [
        dataclasses.replace(r, group_id=f"G{i // group_size}", group_size=group_size, generator_id="gen-1")
        for i, r in enumerate(rollouts([("Q", c, {}) for c in completions]))
    ]


def picky(prompts, completions, metadata):
    """Raises on any micro-batch holding a completion with an 'x' (a reward that fails on some inputs)."""
    bad = [c for c in completions if "x" in c]
    if bad:
        raise ValueError(f"cannot score {bad[0]!r}")
    return [float(len(c)) for c in completions]


def test_a_reward_that_raises_on_some_inputs_loses_only_those_and_their_groups():
    """Before, one exception discarded the whole micro-batch: with 1 bad completion in 8, every
    rollout of every group was lost, and with a few such inputs nothing reached the buffer."""
    reward = CompositeReward([RewardComponent("len", 1.0, picky)])
    batch = grouped(["aa", "bbb", "x", "c", "dd", "e", "fff", "xx"], group_size=2)  # G1 and G3 hold an 'x'
    scoring = score_each(reward, batch, "scorer-0")
    assert set(scoring.failures) == {"g-2", "g-7"}
    assert [type(e).__name__ for e in scoring.raised] == ["ValueError"] * 3  # the batch, then g-2 and g-7 alone
    assert [(s.rollout.rollout_id, s.reward) for s in scoring.results] == [
        ("g-0", 2.0),
        ("g-1", 3.0),
        ("g-3", 1.0),
        ("g-4", 2.0),
        ("g-5", 1.0),
        ("g-6", 3.0),
    ]
    kept, notices = drop_failed_groups(batch, scoring, "scorer-0")
    assert [s.rollout.rollout_id for s in kept] == ["g-0", "g-1", "g-4", "g-5"]  # G0 and G2 whole
    assert [(n.group_id, n.rollout_id, n.generator_id, n.group_size, n.reason) for n in notices] == [
        ("G1", "g-2", "gen-1", 2, "ValueError"),
        ("G3", "g-7", "gen-1", 2, "ValueError"),
    ]
    assert notices[0].error == "ValueError: cannot score 'x'"
    assert decode(encode(notices[0]), expected=(GroupDropped,)).group_id == "G1"  # what the buffer receives
    assert score_each(reward, batch[:2], "scorer-0").failures == {}  # no 'x': scored in one call


def test_a_reward_that_is_down_is_not_called_once_per_rollout():
    calls = []

    def down(prompts, completions, metadata):
        calls.append(len(completions))
        raise RewardServerDown("reward server http://127.0.0.1:1/ is down")

    scoring = score_each(CompositeReward([RewardComponent("http", 1.0, down)]), grouped(["a"] * 6, 3), "scorer-0")
    assert calls == [6] and len(scoring.failures) == 6 and not scoring.results


def test_members_of_a_dropped_group_arriving_later_are_not_scored():
    dropped = DroppedGroups(limit=2)
    batch = grouped(["a", "b", "c", "d", "e", "f"], group_size=2)
    dropped.add("G1")
    keep, skipped = dropped.split(batch)
    assert [r.rollout_id for r in keep] == ["g-0", "g-1", "g-4", "g-5"]
    assert [r.rollout_id for r in skipped] == ["g-2", "g-3"]
    dropped.add("G0")
    dropped.add("G2")  # the oldest id is forgotten past the limit
    assert [r.group_id for r in dropped.split(batch)[0]] == ["G1", "G1"]
