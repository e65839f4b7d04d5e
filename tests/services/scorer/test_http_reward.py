"""The HTTP reward client against a real reward server on loopback."""

from __future__ import annotations

import threading
import time

import pytest

from streamrl.common.config import RewardSpec
from streamrl.services.scorer.http_reward import HttpReward, RewardServerDown, RewardServerError
from streamrl.services.scorer.rewards import build_reward
from streamrl.testing import free_port
from support import RewardServer

PROMPTS = [f"p{i}" for i in range(7)]
COMPLETIONS = ["a", "aa", "b", "aaa", "", "ba", "aaaa"]
METADATA = [{"bonus": 10 * (i % 2)} for i in range(7)]
EXPECTED = [1.0, 12.0, 0.0, 13.0, 0.0, 11.0, 4.0]


def test_batches_go_in_order_and_rewards_come_back_in_order():
    with RewardServer() as server:
        reward = HttpReward(server.url, batch_size=3, timeout_s=5)
        assert reward(PROMPTS, COMPLETIONS, METADATA) == EXPECTED
    assert [len(r["completions"]) for r in server.requests] == [3, 3, 1]
    assert [p for r in server.requests for p in r["prompts"]] == PROMPTS
    assert [m for r in server.requests for m in r["metadata"]] == METADATA


def test_transient_failures_are_retried_with_exponential_backoff():
    with RewardServer(script=[503, 429, "ok"]) as server:
        reward = HttpReward(server.url, batch_size=8, timeout_s=5, retries=3, backoff_s=0.2)
        assert reward(PROMPTS, COMPLETIONS, METADATA) == EXPECTED
    assert len(server.requests) == 3
    first_wait, second_wait = server.times[1] - server.times[0], server.times[2] - server.times[1]
    assert 0.2 <= first_wait < 0.2 * 1.1 + 0.15  # backoff_s, plus jitter <= 10%
    assert 0.4 <= second_wait < 0.4 + 0.02 + 0.15  # doubled


def test_retries_run_out_with_the_status_tries_and_fix():
    with RewardServer(script=[500, 500, 500]) as server:
        reward = HttpReward(server.url, timeout_s=5, retries=2, backoff_s=0.05)
        with pytest.raises(
            RewardServerError,
            match=r"HTTP 500 Internal Server Error: .*\(3 tries over "
            r"[0-9.]+s\); fix: check the server's log",
        ):
            reward(PROMPTS, COMPLETIONS, METADATA)
    assert len(server.requests) == 3


def test_a_slow_server_times_out_on_every_try():
    with RewardServer(script=["sleep", "sleep"], sleep_s=1.0) as server:
        reward = HttpReward(server.url, timeout_s=0.3, retries=1, backoff_s=0.05)
        started = time.monotonic()
        with pytest.raises(RewardServerError, match=r"no answer within timeout_s = 0.3s \(ReadTimeout\) \(2 tries"):
            reward(PROMPTS[:2], COMPLETIONS[:2], METADATA[:2])
        assert time.monotonic() - started < 2 * 0.3 + 0.05 + 0.8
        assert reward(PROMPTS[:2], COMPLETIONS[:2], METADATA[:2]) == EXPECTED[:2]  # the server is fine again


def test_a_server_that_is_down_says_so():
    url = f"http://127.0.0.1:{free_port()}/score"
    reward = HttpReward(url, retries=2, backoff_s=0.05)
    with pytest.raises(RewardServerDown) as info:
        reward(PROMPTS, COMPLETIONS, METADATA)
    message = str(info.value)
    assert message.startswith(f"reward server {url} is down: cannot connect (")
    assert "(3 tries over" in message and message.endswith(
        "fix: start the reward server, or correct scorer.rewards[].url"
    )


def test_a_stop_request_ends_the_retries_at_once():
    """The scorer got SIGTERM while its reward server is down: no further try, no backoff wait left
    (here 5 + 10 + 20 s); the call raises the failure so far."""
    stop = threading.Event()
    reward = HttpReward(f"http://127.0.0.1:{free_port()}/score", retries=3, backoff_s=5.0, stop=stop)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RewardServerDown, match=r"\(1 tries over"):
        reward(PROMPTS, COMPLETIONS, METADATA)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    "action, pattern",
    [
        (422, r"refused the request: HTTP 422 Unprocessable (Entity|Content): .*scripted failure"),
        ("short", r"answered 6 rewards for 7 completions; fix: answer \{\"rewards\": \[...\]\}"),
        ("nan", r"answered reward 'NaN' at index 0; fix: answer finite numbers"),
    ],
)
def test_answers_that_are_not_rewards_are_not_retried(action, pattern):
    with RewardServer(script=[action]) as server:
        reward = HttpReward(server.url, batch_size=8, retries=3, backoff_s=0.05)
        with pytest.raises(RewardServerError, match=pattern):
            reward(PROMPTS, COMPLETIONS, METADATA)
    assert len(server.requests) == 1


def test_headers_read_the_environment(monkeypatch):
    monkeypatch.setenv("REWARD_TOKEN", "s3cret")
    with RewardServer() as server:
        HttpReward(server.url, headers={"Authorization": "Bearer ${REWARD_TOKEN}"})(["p"], ["a"], [{}])
    assert server.headers[0]["Authorization"] == "Bearer s3cret"
    monkeypatch.delenv("REWARD_TOKEN")
    with pytest.raises(
        ValueError,
        match=r"header 'Authorization' uses \$REWARD_TOKEN, which is not set .* fix: "
        r"export REWARD_TOKEN=",
    ):
        HttpReward("http://127.0.0.1:1/", headers={"Authorization": "Bearer ${REWARD_TOKEN}"})


def test_a_url_reward_spec_builds_a_weighted_component():
    with RewardServer() as server:
        spec = RewardSpec(url=server.url, weight=0.5, batch_size=2, timeout_s=5.0, retries=0)
        reward = build_reward([spec, RewardSpec(function="count_char", kwargs={"char": "b"})], device="cpu")
        totals, parts = reward(PROMPTS, COMPLETIONS, METADATA)
    assert reward.names == ["http_reward", "count_char"]
    assert [p["http_reward"] for p in parts] == EXPECTED
    assert totals[2] == pytest.approx(0.5 * 0.0 + 1.0) and totals[5] == pytest.approx(0.5 * 11.0 + 0.5)
    assert len(server.requests) == 4
