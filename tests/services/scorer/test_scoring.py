"""The scorer's pure logic: the endpoint a replica binds and scoring one micro-batch."""

from __future__ import annotations

import dataclasses

import pytest

from streamrl.common.messages import ScoredRollout, decode, encode
from streamrl.services.scorer.rewards import CompositeReward, RewardComponent
from streamrl.services.scorer.scoring import score_batch, scorer_endpoint
from support import scored_item


def rollouts(texts: list[tuple[str, str, dict]]):
    base = scored_item("g", 0).rollout
    return [dataclasses.replace(base, rollout_id=f"g-{i}", prompt_text=p, completion_text=c, metadata=meta)
            for i, (p, c, meta) in enumerate(texts)]


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
    assert [s.reward_parts for s in scored] == [{"length": 4.0, "exact": 1.0}, {"length": 2.0, "exact": 0.0},
                                               {"length": 0.0, "exact": 0.0}]
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
