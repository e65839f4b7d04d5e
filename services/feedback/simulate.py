"""A simulated labeller: watches a running job through the feedback service's HTTP API only, and
labels rollouts by a preference of its own (one the environment reward ignores).

    python -m streamrl.services.feedback.simulate --url http://127.0.0.1:8080 --token TOKEN \\
        --likes char:a --mode both --labels-per-second 5 --duration 120

Preferences (``--likes``):

* ``char:X``: the fraction of characters of the completion equal to X (X one character);
* ``word:W``: how often the word W occurs in the completion (case-insensitive, whole words).

Ratings: +1 when the completion's score is above the median of the last 200 completions seen,
-1 when below, none when equal (a person would hesitate too). Preferences: of two completions
of one group with different scores, the higher is chosen. At the end one JSON line with what
was done goes to standard output.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable

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


class SimulatedLabeller:
    """Labels through the API (see the module docstring).

    Args:
        url: the feedback service's base URL.
        token: a labeller token (``Authorization: Bearer``).
        likes: the score function (:func:`preference`).
        mode: ``rating``, ``preference`` or ``both`` (alternating when both are possible).
        labels_per_second: upper bound of the labelling rate.
    """

    def __init__(self, url: str, token: str, likes: Callable[[str], float], *, mode: str = "both",
                 labels_per_second: float = 5.0, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.likes, self.mode = likes, mode
        self.interval = 1.0 / labels_per_second
        self.timeout_s = timeout_s
        self.cursor = 0
        self.history: deque[float] = deque(maxlen=200)
        self.queue: deque[dict] = deque(maxlen=500)
        self.groups: dict[str, list[dict]] = {}
        self.counts = {"rating": 0, "preference": 0, "refused": 0, "seen": 0}
        self.turn = 0

    def _get(self, path: str) -> dict:
        response = self.session.get(self.url + path, timeout=self.timeout_s)
        response.raise_for_status()
        return response.json()

    def _post(self, path: str, body: dict) -> bool:
        response = self.session.post(self.url + path, json=body, timeout=self.timeout_s)
        if response.status_code == 201:
            return True
        self.counts["refused"] += 1
        return False

    def poll(self) -> None:
        """Read the rollouts that streamed in since the last call."""
        data = self._get(f"/api/rollouts?after={self.cursor}&limit=500")
        self.cursor = data["cursor"]
        for item in data["rollouts"]:
            item["score"] = self.likes(item["completion"])
            self.history.append(item["score"])
            self.queue.append(item)
            self.groups.setdefault(item["group_id"], []).append(item)
            self.counts["seen"] += 1
        if len(self.groups) > 1000:
            for key in list(self.groups)[:500]:
                del self.groups[key]

    def label_one(self) -> bool:
        """Give one label (a rating or a pairwise pick); False when nothing could be labelled."""
        want_pair = self.mode == "preference" or (self.mode == "both" and self.turn % 2 == 1)
        self.turn += 1
        while self.queue:
            item = self.queue.pop()  # the newest first: feedback on what the policy does now
            if want_pair:
                others = [o for o in self.groups.get(item["group_id"], [])
                          if o["rollout_id"] != item["rollout_id"] and o["score"] != item["score"]]
                if others:
                    other = others[-1]
                    chosen, rejected = (item, other) if item["score"] > other["score"] else (other, item)
                    if self._post("/api/preferences", {"chosen": chosen["rollout_id"],
                                                       "rejected": rejected["rollout_id"]}):
                        self.counts["preference"] += 1
                        return True
                    continue
                if self.mode == "preference":
                    continue
            median = statistics.median(self.history)
            if item["score"] == median:
                continue
            if self._post("/api/ratings", {"rollout_id": item["rollout_id"],
                                           "value": 1 if item["score"] > median else -1}):
                self.counts["rating"] += 1
                return True
        return False

    def run(self, *, duration_s: float, max_labels: int | None = None) -> dict:
        """Poll and label until ``duration_s`` seconds passed or ``max_labels`` labels were given."""
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            if max_labels is not None and self.counts["rating"] + self.counts["preference"] >= max_labels:
                break
            started = time.monotonic()
            try:
                self.poll()
                self.label_one()
            except requests.RequestException as err:
                print(f"simulated labeller: {err}", file=sys.stderr)
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        return dict(self.counts)


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m streamrl.services.feedback.simulate",
                                     description="a simulated labeller that uses only the feedback HTTP API")
    parser.add_argument("--url", required=True, help="the feedback page, e.g. http://127.0.0.1:8080")
    parser.add_argument("--token", required=True, help="a labeller token (admin labeller add NAME)")
    parser.add_argument("--likes", default="char:a", help="char:X or word:W (default char:a)")
    parser.add_argument("--mode", choices=["rating", "preference", "both"], default="both")
    parser.add_argument("--labels-per-second", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    parser.add_argument("--max-labels", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        likes = preference(args.likes)
    except ValueError as err:
        parser.error(str(err))
    labeller = SimulatedLabeller(args.url, args.token, likes, mode=args.mode,
                                 labels_per_second=args.labels_per_second)
    print(json.dumps(labeller.run(duration_s=args.duration, max_labels=args.max_labels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
