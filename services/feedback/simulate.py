"""A simulated labeller: watches a running job through the feedback service's HTTP API only, and
labels rollouts by a preference of its own (one the environment reward ignores).

    python -m streamrl.services.feedback.simulate --url http://127.0.0.1:8080 --token TOKEN \\
        --likes char:a --mode both --labels-per-second 5 --duration 120

Preferences (``--likes``):

* ``char:X``: the fraction of characters of the completion equal to X (X one character);
* ``word:W``: how often the word W occurs in the completion (case-insensitive, whole words).

Ratings: with ``--threshold T``, +1 when the completion's score is above T, else -1 (a fixed
standard: the labeller never runs out of rollouts to rate); without it, +1 when the score is
above the median of the last 200 completions seen, -1 when below, none when equal (a person
would hesitate too). Preferences: of two completions of one group with different scores, the
higher is chosen.

A person, not an oracle (the run never sees the taste, only the labels):

* ``--attention F``: each rollout that streams in is looked at with probability F (sparse
  attention); the others are never labelled;
* ``--delay-min A --delay-max B``: a looked-at rollout is labelled A to B seconds (uniform)
  after it appeared on the page (the reaction delay TAMER's credit assignment spreads over);
* ``--noise F``: a fraction F of the labels is flipped (a -1 for a +1, the worse of two picked).

At the end one JSON line with what was done goes to standard output.
"""

from __future__ import annotations

import argparse
import heapq
import json
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import requests


def preference(spec: str) -> Callable[[str], float]:
    """The labeller's score of a completion text, from ``char:X`` or ``word:W``.

    Raises:
        ValueError: any other spec.
    """
    kind, _, arg = spec.partition(":")
    if kind == "char" and len(arg) == 1:
        return lambda text: text.count(arg) / max(1, len(text))
    if kind == "word" and arg.strip():
        pattern = re.compile(rf"\b{re.escape(arg.strip())}\b", re.IGNORECASE)
        return lambda text: float(len(pattern.findall(text)))
    raise ValueError(f"--likes {spec!r}: use char:X (one character) or word:W")


POLL_INTERVAL_S = 0.25
"""How often the simulated labeller reads the stream, seconds (it labels in between)."""


class SimulatedLabeller:
    """Labels through the API (see the module docstring).

    Args:
        url: the feedback service's base URL.
        token: a labeller token (``Authorization: Bearer``).
        likes: the score function (:func:`preference`).
        mode: ``rating``, ``preference`` or ``both`` (alternating when both are possible).
        labels_per_second: upper bound of the labelling rate.
        threshold: rate +1 above this score, -1 otherwise (None: against the running median).
        attention: probability a streamed rollout is looked at, in (0, 1].
        delay_s: ``(min, max)`` seconds between a rollout appearing and its label (uniform).
        noise: fraction of labels flipped, in [0, 1].
        seed: seed of the attention, delay and noise draws.

    Raises:
        ValueError: attention, delay or noise out of range.
    """

    def __init__(
        self,
        url: str,
        token: str,
        likes: Callable[[str], float],
        *,
        mode: str = "both",
        labels_per_second: float = 5.0,
        timeout_s: float = 10.0,
        threshold: float | None = None,
        attention: float = 1.0,
        delay_s: tuple[float, float] = (0.0, 0.0),
        noise: float = 0.0,
        seed: int = 0,
    ):
        if not 0 < attention <= 1 or not 0 <= delay_s[0] <= delay_s[1] or not 0 <= noise <= 1:
            raise ValueError(
                f"simulated labeller: need 0 < attention <= 1 (got {attention}), 0 <= delay min <= "
                f"delay max (got {delay_s}) and 0 <= noise <= 1 (got {noise})"
            )
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.likes, self.mode = likes, mode
        self.interval = 1.0 / labels_per_second
        self.timeout_s = timeout_s
        self.threshold, self.attention, self.delay_s, self.noise = threshold, attention, delay_s, noise
        self.rng = np.random.default_rng(seed)
        self.cursor = 0
        self.history: deque[float] = deque(maxlen=200)
        self.due: list[tuple[float, int, dict]] = []  # (when it is labelled, arrival number, rollout): a heap
        self.groups: dict[str, list[dict]] = {}
        self.counts = {
            "rating": 0,
            "preference": 0,
            "refused": 0,
            "seen": 0,
            "looked_at": 0,
            "flipped": 0,
            "rate_limited": 0,
        }
        self.turn = 0

    def _get(self, path: str) -> dict:
        response = self.session.get(self.url + path, timeout=self.timeout_s)
        response.raise_for_status()
        return response.json()

    def _post(self, path: str, body: dict) -> bool:
        response = self.session.post(self.url + path, json=body, timeout=self.timeout_s)
        if response.status_code == 201:
            return True
        if response.status_code == 429:  # over the labeller's rate: wait as told, as a person would
            self.counts["rate_limited"] += 1
            time.sleep(float(response.headers.get("retry-after", "1")))
            return False
        self.counts["refused"] += 1
        return False

    def poll(self) -> None:
        """Read the rollouts that streamed in since the last call; look at some, to label after a delay."""
        data = self._get(f"/api/rollouts?after={self.cursor}&limit=500")
        self.cursor = data["cursor"]
        now = time.monotonic()
        for item in data["rollouts"]:
            item["score"] = self.likes(item["completion"])
            self.history.append(item["score"])
            self.groups.setdefault(item["group_id"], []).append(item)
            self.counts["seen"] += 1
            if self.rng.random() < self.attention:
                self.counts["looked_at"] += 1
                heapq.heappush(self.due, (now + self.rng.uniform(*self.delay_s), item["seq"], item))
        while len(self.due) > 500:  # a backlog a person would never work through: forget the oldest
            self.due.remove(min(self.due, key=lambda entry: entry[1]))
            heapq.heapify(self.due)
        if len(self.groups) > 1000:
            for key in list(self.groups)[:500]:
                del self.groups[key]

    def _flip(self) -> bool:
        flipped = bool(self.rng.random() < self.noise)
        self.counts["flipped"] += flipped
        return flipped

    def label_one(self) -> bool:
        """Give one label (a rating or a pairwise pick) on a rollout whose delay has passed; False when
        nothing could be labelled."""
        want_pair = self.mode == "preference" or (self.mode == "both" and self.turn % 2 == 1)
        self.turn += 1
        while self.due and self.due[0][0] <= time.monotonic():
            item = heapq.heappop(self.due)[2]
            if want_pair:
                others = [
                    o
                    for o in self.groups.get(item["group_id"], [])
                    if o["rollout_id"] != item["rollout_id"] and o["score"] != item["score"]
                ]
                if others:
                    other = others[-1]
                    chosen, rejected = (
                        (item, other) if (item["score"] > other["score"]) != self._flip() else (other, item)
                    )
                    if self._post(
                        "/api/preferences", {"chosen": chosen["rollout_id"], "rejected": rejected["rollout_id"]}
                    ):
                        self.counts["preference"] += 1
                        return True
                    continue
                if self.mode == "preference":
                    continue
            reference = self.threshold if self.threshold is not None else statistics.median(self.history)
            if self.threshold is None and item["score"] == reference:
                continue
            good = (item["score"] > reference) != self._flip()
            if self._post("/api/ratings", {"rollout_id": item["rollout_id"], "value": 1 if good else -1}):
                self.counts["rating"] += 1
                return True
        return False

    def run(self, *, duration_s: float, max_labels: int | None = None) -> dict:
        """Poll and label until ``duration_s`` seconds passed or ``max_labels`` labels were given."""
        deadline = time.monotonic() + duration_s
        polled = 0.0
        while time.monotonic() < deadline:
            if max_labels is not None and self.counts["rating"] + self.counts["preference"] >= max_labels:
                break
            started = time.monotonic()
            try:
                if started - polled >= POLL_INTERVAL_S:
                    self.poll()
                    polled = started
                self.label_one()
            except requests.RequestException as err:
                print(f"simulated labeller: {err}", file=sys.stderr)
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        return dict(self.counts)


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m streamrl.services.feedback.simulate",
        description="a simulated labeller that uses only the feedback HTTP API",
    )
    parser.add_argument("--url", required=True, help="the feedback page, e.g. http://127.0.0.1:8080")
    parser.add_argument("--token", required=True, help="a labeller token (admin labeller add NAME)")
    parser.add_argument("--likes", default="char:a", help="char:X or word:W (default char:a)")
    parser.add_argument("--mode", choices=["rating", "preference", "both"], default="both")
    parser.add_argument("--labels-per-second", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    parser.add_argument("--max-labels", type=int, default=None)
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="rate +1 above this score, -1 otherwise (default: against the running median)",
    )
    parser.add_argument("--attention", type=float, default=1.0, help="fraction of rollouts looked at (default 1)")
    parser.add_argument(
        "--delay-min",
        type=float,
        default=0.0,
        help="seconds from a rollout appearing to its label, at least (default 0)",
    )
    parser.add_argument("--delay-max", type=float, default=0.0, help="... at most (default 0)")
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of labels flipped (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        likes = preference(args.likes)
        labeller = SimulatedLabeller(
            args.url,
            args.token,
            likes,
            mode=args.mode,
            labels_per_second=args.labels_per_second,
            threshold=args.threshold,
            attention=args.attention,
            delay_s=(args.delay_min, args.delay_max),
            noise=args.noise,
            seed=args.seed,
        )
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(labeller.run(duration_s=args.duration, max_labels=args.max_labels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
