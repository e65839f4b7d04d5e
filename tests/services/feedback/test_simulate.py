"""The simulated person against a real HTTP server (the feedback web app on loopback): a fixed
threshold, sparse attention, a reaction delay and flipped labels, each as configured."""

from __future__ import annotations

import time

import pytest

from feedback_support import serving
from streamrl.services.feedback.simulate import SimulatedLabeller, preference
from streamrl.services.feedback.web import create_app

TOKEN = "sim-token"
N = 40


class Stream:
    """N rollouts, all streamed in before the labeller starts; completion i holds i % 4 letters 'a' in 4."""

    def __init__(self):
        self.items = [
            {
                "seq": i + 1,
                "rollout_id": f"r{i}",
                "group_id": f"g{i // 2}",
                "completion": "a" * (i % 4) + "b" * (4 - i % 4),
            }
            for i in range(N)
        ]
        self.ratings: list[tuple[str, int, float]] = []  # (rollout, value, monotonic time)

    def labeller_for_token(self, token):
        return "sim" if token == TOKEN else None

    def labeller_enabled(self, name):
        return True

    def recent(self, after, limit):
        return [item for item in self.items if item["seq"] > after][:limit]

    def rate(self, labeller, rollout_id, value):
        self.ratings.append((rollout_id, value, time.monotonic()))
        return {"label_id": len(self.ratings)}

    def refused(self, reason):
        pass


@pytest.fixture
def stream():
    backend = Stream()
    with serving(
        create_app(backend, session_ttl_s=60, secure_cookies=False, label_rate_per_s=1000.0, label_burst=1000)
    ) as url:
        yield url, backend


def run(url, **person) -> tuple[SimulatedLabeller, float]:
    labeller = SimulatedLabeller(
        url, TOKEN, preference("char:a"), mode="rating", labels_per_second=100.0, threshold=0.3, seed=1, **person
    )
    started = time.monotonic()
    labeller.run(duration_s=8.0)
    return labeller, started


def truth(rollout_id: str) -> int:
    """+1 when the fraction of 'a' is above 0.3 (2 or 3 of 4), else -1."""
    return 1 if int(rollout_id[1:]) % 4 >= 2 else -1


def test_a_fixed_threshold_rates_every_rollout_looked_at(stream):
    url, backend = stream
    labeller, _ = run(url)
    assert sorted(r for r, _, _ in backend.ratings) == sorted(f"r{i}" for i in range(N))  # none skipped
    assert all(value == truth(r) for r, value, _ in backend.ratings)


def test_sparse_attention_delay_and_noise(stream):
    url, backend = stream
    labeller, started = run(url, attention=0.5, delay_s=(1.0, 2.0), noise=0.25)
    counts = labeller.counts
    looked = counts["looked_at"]
    assert 8 <= looked <= 32 and counts["seen"] == N  # about half of the 40, as seeded
    assert counts["rating"] == looked == len(backend.ratings)
    delays = [at - started for _, _, at in backend.ratings]
    assert min(delays) >= 1.0 and max(delays) < 2.0 + 3.0  # 1-2 s after they appeared (+ a loaded machine)
    wrong = sum(value != truth(r) for r, value, _ in backend.ratings)
    assert wrong == counts["flipped"] and 0 < wrong < looked  # about a quarter flipped
    with pytest.raises(ValueError, match="attention"):
        SimulatedLabeller(url, TOKEN, preference("char:a"), attention=0.0)
