"""What a waiting process can learn about its peers from their Prometheus endpoints.

A learner that gets no batch cannot tell from its own socket why. The scorers say whether
their reward is failing (``streamrl_scorer_reward_failing``) or raises on some inputs
(``reward_failure_fraction``: those rollouts' groups are dropped), with the last error in
``reward_last_error{reason, error}`` (see ``streamrl.services.scorer.health``), so the
learner's wait message reads them (:func:`reward_troubles`) and names the cause instead of
guessing. The reads are short (0.5 s timeout each) and made only when a wait is logged.

Scorer ``i`` serves its metrics on ``metrics.scorer_port + k`` where ``k`` is its position
among the scorers listed for the same host in ``endpoints.scorers``, at that host (at
``metrics.host`` for loopback endpoints, the loopback address when that is a wildcard). A
scorer whose port is 0 (ephemeral) or whose metrics are off cannot be read.
"""

from __future__ import annotations

import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from streamrl.common.config import WILDCARD_HOSTS, Config, is_local_endpoint

__all__ = ["scrape", "scrape_url", "scorer_metrics_addresses", "last_reward_error", "reward_troubles"]


def scrape(host: str, port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """Samples of ``http://host:port/metrics`` (see :func:`scrape_url`); None when nothing answers."""
    address = f"[{host}]" if ":" in host else host
    return scrape_url(f"http://{address}:{port}/metrics", timeout)


def scrape_url(url: str, timeout: float = 2.0) -> dict[str, float] | None:
    """Samples of the Prometheus text at ``url`` as ``{"name": value, "name{k=v,...}": value}``
    (labels sorted); None when it cannot be read."""
    try:
        body = urllib.request.urlopen(url, timeout=timeout).read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def scorer_metrics_addresses(cfg: Config) -> list[tuple[str, str, int]]:
    """``(name, host, port)`` of each scorer's metrics endpoint (see the module docstring); [] when
    metrics are off or the scorers' port is ephemeral."""
    m = cfg.metrics
    if not m.enabled or not m.scorer_port:
        return []
    local_host = "127.0.0.1" if m.host in WILDCARD_HOSTS else m.host
    seen: Counter[str] = Counter()
    out = []
    for i, endpoint in enumerate(cfg.endpoints.scorers):
        host = (
            local_host if is_local_endpoint(endpoint) else endpoint.partition("://")[2].rpartition(":")[0].strip("[]")
        )
        out.append((f"scorer-{i}", host, m.scorer_port + seen[host]))
        seen[host] += 1
    return out


def last_reward_error(samples: dict[str, float]) -> str:
    """The scorer's last reward failure, ``"ValueError: message"``, from its scraped samples (``"unknown
    error"`` when none is labelled)."""
    errors = [key for key, value in samples.items() if key.startswith("streamrl_scorer_reward_last_error{") and value]
    return errors[0].partition("error=")[2].rpartition(",reason=")[0] if errors else "unknown error"


def reward_troubles(cfg: Config, timeout: float = 0.5) -> list[str]:
    """One line per scorer whose reward is failing or raises on some rollouts, e.g. ``the reward is
    failing in scorer-0 (12 micro-batches in a row raised ValueError: boom; no scored rollout reaches
    the buffer; see its log)`` or ``the reward raises on some inputs in scorer-0 (on 8% of its last
    100 rollouts, last ValueError: boom; their groups are dropped, so fewer reach the buffer; see its
    log)``; [] when none does, or none can be read."""
    troubles = []
    for name, host, port in scorer_metrics_addresses(cfg):
        samples = scrape(host, port, timeout=timeout)
        if not samples:
            continue
        failing = samples.get("streamrl_scorer_reward_failing", 0.0)
        fraction = samples.get("streamrl_scorer_reward_failure_fraction", 0.0)
        in_a_row = samples.get("streamrl_scorer_reward_consecutive_failures", 0.0)
        if not failing and not fraction:
            continue
        error = last_reward_error(samples)
        if failing and in_a_row >= cfg.scorer.failing_after:
            troubles.append(
                f"the reward is failing in {name} ({in_a_row:.0f} micro-batches in a row raised {error}; "
                "no scored rollout reaches the buffer; see its log)"
            )
            continue
        what = f"the reward is failing in {name}" if failing else f"the reward raises on some inputs in {name}"
        troubles.append(
            f"{what} (on {fraction:.0%} of its last {cfg.scorer.failing_window} rollouts, last {error}; "
            "their groups are dropped, so fewer reach the buffer; see its log)"
        )
    return troubles
