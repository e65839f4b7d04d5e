"""A reward computed by a remote HTTP server (``[[scorer.rewards]] url = "http://..."``).

Protocol (docs/data-and-reward.md, "A reward server over HTTP"). Each request is ``POST <url>`` with the JSON body
``{"prompts": [str], "completions": [str], "metadata": [object]}`` (at most ``batch_size``
items, the reward function contract's three lists) and the server answers ``200`` with
``{"rewards": [number]}``, one finite number per completion, in order. Any language or
framework can serve it; the test suite runs a real ``http.server`` on loopback.

Failures. Connection errors, timeouts (``timeout_s`` for connect, write and read) and
HTTP 429 / 5xx are transient: the request is tried again up to ``retries`` times, waiting
``backoff_s``, then twice that, and so on (exponential backoff with up to 10% jitter,
:mod:`tenacity`). Anything else (another 4xx, a body that is not ``{"rewards": [...]}``
with the right count of finite numbers) is the server's answer and is not retried. Either
way the call raises :class:`RewardServerError` (:class:`RewardServerDown` when nothing
listens) whose message names the URL, what happened, the tries and the fix; the scorer
counts it by reason like any failing reward (``reward_failures_total{reason}``).

Before a run. ``streamrl check`` and ``streamrl run`` send each reward server one request
(:func:`probe_problems`; ``--no-probe`` skips it), so a server that cannot answer (nothing
listening, HTTP 5xx after every retry, an answer of the wrong shape) stops the command at once
with the server's message instead of a run whose learner waits ``learner.batch_timeout_s``.

The HTTP client is ``httpx2`` (pydantic's maintained continuation of ``httpx``, already
installed with ``huggingface_hub``): one connection pool per component, kept alive.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2 as httpx
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

__all__ = ["HttpReward", "RewardServerError", "RewardServerDown", "probe_problems", "probe_report"]

_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


class RewardServerError(RuntimeError):
    """The reward server did not give usable rewards; the message says what, and the fix."""


class RewardServerDown(RewardServerError):
    """Nothing answers at the reward server's address (connection refused or unreachable)."""


class _Transient(Exception):
    """A failure worth another try (wraps the cause)."""

    def __init__(self, what: str, cause: BaseException | None = None):
        super().__init__(what)
        self.what = what
        self.cause = cause


def expand_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with ``$VAR`` / ``${VAR}`` replaced from the environment.

    Raises:
        ValueError: a named variable is not set (the message names it and the header).
    """
    out = {}
    for name, value in headers.items():
        expanded = os.path.expandvars(value)
        missing = [m.group(1) for m in _UNSET_VAR.finditer(expanded) if m.group(1) not in os.environ]
        if missing:
            raise ValueError(
                f"reward server header {name!r} uses ${missing[0]}, which is not set in the scorer's "
                f"environment; fix: export {missing[0]}=... before starting the scorer"
            )
        out[name] = expanded
    return out


class HttpReward:
    """Reward function (the contract of :mod:`streamrl.services.scorer.rewards`) served over HTTP.

    Args:
        url: ``http://`` or ``https://`` address the batches are POSTed to.
        batch_size: completions per request (>= 1); a call sends ``ceil(n / batch_size)`` requests in order.
        timeout_s: seconds for each of connect, write and read of one request.
        retries: extra tries of a request after a transient failure (>= 0).
        backoff_s: wait before the first retry, seconds; doubled for each further one.
        headers: sent with every request (``${VAR}`` expanded from the environment).
        transport: an ``httpx`` transport (tests); None = the network.
        stop: the scorer's stop request (``ServiceContext.stop``): once set, no further try is made and
            a wait between tries ends at once (the call raises the last failure); None = never.

    Raises:
        ValueError: a non-positive batch size or timeout, negative retries, or a header naming
            an unset environment variable.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 8,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        headers: Mapping[str, str] | None = None,
        transport: Any = None,
        stop: threading.Event | None = None,
    ) -> None:
        if batch_size < 1 or timeout_s <= 0 or retries < 0 or backoff_s <= 0:
            raise ValueError(
                f"HttpReward: batch_size >= 1, timeout_s > 0, retries >= 0, backoff_s > 0 (got "
                f"{batch_size}, {timeout_s}, {retries}, {backoff_s})"
            )
        self.url = url
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.stop = stop
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout_s), headers=expand_headers(headers or {}), transport=transport
        )
        self.__name__ = "http_reward"

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
        """One reward per completion, from ``ceil(n / batch_size)`` requests.

        Raises:
            ValueError: the three lists differ in length.
            RewardServerDown: nothing listens at ``url`` (after every retry).
            RewardServerError: timeouts or HTTP 429/5xx after every retry, another HTTP error,
                or an answer that is not ``{"rewards": [...]}`` with one finite number per completion.
        """
        n = len(completions)
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(
                f"HttpReward: lengths differ: {len(prompts)} prompts, {n} completions, {len(metadata)} metadata"
            )
        rewards: list[float] = []
        for start in range(0, n, self.batch_size):
            end = min(n, start + self.batch_size)
            rewards += self._request(
                {"prompts": prompts[start:end], "completions": completions[start:end], "metadata": metadata[start:end]}
            )
        return rewards

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def _request(self, body: dict) -> list[float]:
        started = time.monotonic()
        attempts = 0
        give_up = stop_after_attempt(self.retries + 1)
        stop = self.stop

        def pause(seconds: float) -> None:  # the back-off, cut short when the service stops
            if stop is None:
                time.sleep(seconds)
            else:
                stop.wait(seconds)

        retrying = Retrying(
            stop=give_up if stop is None else give_up | stop_when_event_set(stop),
            sleep=pause,
            wait=wait_exponential(multiplier=self.backoff_s, exp_base=2) + wait_random(0, 0.1 * self.backoff_s),
            retry=retry_if_exception(lambda e: isinstance(e, _Transient)),
            reraise=True,
        )
        last: _Transient | None = None
        try:
            for attempt in retrying:
                with attempt:
                    if last is not None and self.stop is not None and self.stop.is_set():
                        raise last  # stopped while waiting to try again: no further try
                    attempts = attempt.retry_state.attempt_number
                    try:
                        return self._post_once(body)
                    except _Transient as exc:
                        last = exc
                        raise
        except _Transient as failure:
            tries = f"{attempts} tries over {time.monotonic() - started:.1f}s"
            if isinstance(failure.cause, httpx.ConnectError):
                raise RewardServerDown(
                    f"reward server {self.url} is down: {failure.what} ({tries}); fix: start the reward server, or "
                    "correct scorer.rewards[].url"
                ) from failure.cause
            raise RewardServerError(
                f"reward server {self.url}: {failure.what} ({tries}); fix: check the server's "
                "log and load, or raise timeout_s / retries"
            ) from failure.cause
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    def _post_once(self, body: dict) -> list[float]:
        n = len(body["completions"])
        try:
            response = self.client.post(self.url, json=body)
        except httpx.ConnectError as exc:
            raise _Transient(f"cannot connect ({exc})", exc) from exc
        except httpx.TimeoutException as exc:
            raise _Transient(f"no answer within timeout_s = {self.timeout_s:g}s ({type(exc).__name__})", exc) from exc
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}", exc) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"HTTP {response.status_code} {response.reason_phrase}: {response.text[:200]!r}")
        if response.status_code != 200:
            raise RewardServerError(
                f"reward server {self.url} refused the request: HTTP {response.status_code} "
                f"{response.reason_phrase}: {response.text[:300]!r}; fix: the server must accept "
                "POST {prompts, completions, metadata} as JSON"
            )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or len(rewards) != n:
            got = f"{len(rewards)} rewards" if isinstance(rewards, list) else repr(response.text[:200])
            raise RewardServerError(
                f"reward server {self.url} answered {got} for {n} completions; fix: answer "
                f'{{"rewards": [...]}} with one number per completion, in order'
            )
        for i, value in enumerate(rewards):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardServerError(
                    f"reward server {self.url} answered reward {value!r} at index {i}; fix: answer finite numbers"
                )
        return [float(v) for v in rewards]


PROBE_BODY: dict[str, Any] = {
    "prompts": ["streamrl check"],
    "completions": ["a probe of the reward server"],
    "metadata": [{}],
}
"""The one request :func:`probe_problems` sends (the contract's three lists, one item each)."""


def probe_problems(specs: Sequence[Any]) -> list[str]:
    """Send each HTTP reward of ``specs`` (``scorer.rewards``; other sources are skipped) one request,
    with its ``timeout_s``, ``retries``, ``backoff_s`` and ``headers``, as the scorer would.

    Returns:
        One line per reward that did not answer with one finite reward, naming its key, what
        happened and the fix (``RewardServerError``'s message); [] when every one answered.
    """
    problems = []
    for i, spec in enumerate(specs):
        if getattr(spec, "url", None) is None:
            continue
        key = f"scorer.rewards[{i}].url"
        try:
            reward = HttpReward(
                spec.url,
                batch_size=1,
                timeout_s=spec.timeout_s,
                retries=spec.retries,
                backoff_s=spec.backoff_s,
                headers=spec.headers,
            )
        except ValueError as err:  # a header naming an unset variable
            problems.append(f"{key}: {err}")
            continue
        try:
            reward(**PROBE_BODY)
        except RewardServerError as err:
            problems.append(f"{key}: {err}")
        finally:
            reward.close()
    return problems


def probe_report(specs: Sequence[Any]) -> str | None:
    """:func:`probe_problems` as one message for ``streamrl check`` and ``streamrl run`` (None when
    every HTTP reward answered, or there is none)."""
    if not any(getattr(spec, "url", None) for spec in specs):
        return None
    problems = probe_problems(specs)
    if not problems:
        return None
    return (
        f"{len(problems)} reward server(s) did not answer one request\n"
        + "\n".join(f"  - {p}" for p in problems)
        + "\n(--no-probe skips this check, e.g. for a server that starts after the run)"
    )
