"""The stream the feedback service remembers: recent rollouts by id and group, rewards by version."""

from __future__ import annotations

from feedback_support import scored
from streamrl.services.feedback.state import RecentRollouts


def test_recent_rollouts_forget_the_oldest_and_page_by_seq():
    recent = RecentRollouts(3)
    for i in range(5):
        assert recent.add(scored(f"r{i}", group=f"g{i // 2}", version=i // 2, reward=float(i)), now=100.0 + i)
    assert recent.add(scored("r4"), now=200.0) is None  # a repeat is not shown twice
    assert [s.scored.rollout.rollout_id for s in recent.after(0, 10)] == ["r2", "r3", "r4"]
    assert [s.seq for s in recent.after(3, 10)] == [4, 5]
    assert [s.seq for s in recent.after(0, 2)] == [4, 5]  # the newest two, oldest first
    assert recent.get("r0") is None and recent.get("r3").seen_at == 103.0
    assert [s.scored.rollout.rollout_id for s in recent.group("g1")] == ["r2", "r3"]
    assert recent.group("g0") == []
    # every version seen keeps its mean reward, forgotten rollouts included
    assert recent.reward_series() == [
        {"version": 0, "reward_mean": 0.5, "rollouts": 2},
        {"version": 1, "reward_mean": 2.5, "rollouts": 2},
        {"version": 2, "reward_mean": 4.0, "rollouts": 1},
    ]
    page = recent.after(4, 1)[0].public()
    assert page["rollout_id"] == "r4" and page["completion"] == "good" and page["human"] is None


def test_the_rollouts_shown_within_a_reaction_delay_window():
    recent = RecentRollouts(10)
    for i in range(6):
        recent.add(scored(f"r{i}"), now=100.0 + i)  # r0 at 100 s ... r5 at 105 s
    # a label at 105.5 s with a 1-3 s delay: what streamed in between 102.5 and 104.5 s
    assert [s.scored.rollout.rollout_id for s in recent.shown_between(105.5 - 3, 105.5 - 1)] == ["r3", "r4"]
    assert [s.scored.rollout.rollout_id for s in recent.shown_between(101.0, 102.0)] == ["r1", "r2"]  # inclusive
    assert recent.shown_between(200.0, 300.0) == []
