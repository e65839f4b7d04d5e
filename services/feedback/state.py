"""What the feedback service remembers of the stream: recent rollouts for the page and the run's
reward by policy version. Pure (no sockets, no threads); the service guards it with a lock."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from streamrl.common.messages import ScoredRollout

SERIES_VERSIONS = 200
"""Policy versions kept in the reward series."""


@dataclass
class Seen:
    """A streamed rollout as the page shows it.

    Attributes:
        seq: arrival number (1, 2, ...): the page asks for rollouts after the last one it has.
        scored: the scored rollout.
        seen_at: Unix seconds of arrival.
    """

    seq: int
    scored: ScoredRollout
    seen_at: float

    def public(self) -> dict:
        """The JSON the page and the API get."""
        r, s = self.scored.rollout, self.scored
        out = {
            "seq": self.seq,
            "rollout_id": r.rollout_id,
            "group_id": r.group_id,
            "prompt_id": r.prompt_id,
            "prompt": r.prompt_text,
            "completion": r.completion_text,
            "reward": s.reward,
            "reward_parts": s.reward_parts,
            "policy_version": r.policy_version,
            "generator": r.generator_id,
            "group_size": r.group_size,
            "finish_reason": r.finish_reason.value,
            "seen_at": self.seen_at,
            "human": None,
            "selection": None,
        }
        if s.human is not None:
            out["human"] = {
                "value": s.human.value,
                "eligibility": s.human.eligibility,
                "model_version": s.human.model_version,
                "active": s.human.active,
            }
        if r.selection is not None:
            out["selection"] = {
                "candidates": r.selection.candidates,
                "by_model": r.selection.by_model,
                "probability": r.selection.probability,
            }
        return out


class RecentRollouts:
    """The newest ``capacity`` rollouts by id and group, and the mean reward of every policy version seen.

    Args:
        capacity: rollouts kept (the oldest are forgotten first).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items: OrderedDict[str, Seen] = OrderedDict()
        self.groups: dict[str, list[str]] = {}
        self.seq = 0
        self.series: OrderedDict[int, list[float]] = OrderedDict()  # version -> [reward sum, count]

    def add(self, scored: ScoredRollout, now: float) -> Seen | None:
        """Remember a streamed rollout; None when its id was already seen (a repeat is not shown twice)."""
        rid = scored.rollout.rollout_id
        if rid in self.items:
            return None
        self.seq += 1
        seen = Seen(self.seq, scored, now)
        self.items[rid] = seen
        self.groups.setdefault(scored.rollout.group_id, []).append(rid)
        while len(self.items) > self.capacity:
            old_id, old = self.items.popitem(last=False)
            members = self.groups.get(old.scored.rollout.group_id, [])
            if old_id in members:
                members.remove(old_id)
            if not members:
                self.groups.pop(old.scored.rollout.group_id, None)
        version = scored.rollout.policy_version
        entry = self.series.setdefault(version, [0.0, 0])
        entry[0] += scored.reward
        entry[1] += 1
        while len(self.series) > SERIES_VERSIONS:
            self.series.popitem(last=False)
        return seen

    def get(self, rollout_id: str) -> Seen | None:
        """A remembered rollout, or None."""
        return self.items.get(rollout_id)

    def after(self, seq: int, limit: int) -> list[Seen]:
        """The newest ``limit`` rollouts that arrived after ``seq``, oldest first."""
        out: list[Seen] = []
        for seen in reversed(self.items.values()):
            if seen.seq <= seq or len(out) >= limit:
                break
            out.append(seen)
        return out[::-1]

    def shown_between(self, start: float, end: float) -> list[Seen]:
        """The remembered rollouts that streamed in at Unix seconds in ``[start, end]``, oldest first."""
        out: list[Seen] = []
        for seen in reversed(self.items.values()):
            if seen.seen_at < start:
                break
            if seen.seen_at <= end:
                out.append(seen)
        return out[::-1]

    def group(self, group_id: str) -> list[Seen]:
        """The remembered members of a group, in arrival order."""
        return [self.items[rid] for rid in self.groups.get(group_id, [])]

    def reward_series(self) -> list[dict]:
        """``[{"version", "reward_mean", "rollouts"}]`` by increasing policy version."""
        return [{"version": v, "reward_mean": s / n, "rollouts": n} for v, (s, n) in sorted(self.series.items())]
