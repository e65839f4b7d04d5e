"""``streamrl status``: one table of the whole run, read from every service's metrics endpoint."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from streamrl.common.config import Config


@dataclass
class Target:
    """One service process to read: name and metrics port."""

    name: str
    service: str
    port: int


def targets(cfg: Config, generators: int) -> list[Target]:
    """The metrics endpoints of a run: learner, buffer, one per scorer endpoint, ``generators`` generators."""
    m = cfg.metrics
    out = [Target("learner-0", "learner", m.learner_port), Target("buffer-0", "buffer", m.buffer_port)]
    out += [Target(f"scorer-{i}", "scorer", m.scorer_port + i) for i in range(len(cfg.endpoints.scorers))]
    out += [Target(f"generator-{i}", "generator", m.generator_port + i) for i in range(generators)]
    return out


def read(host: str, port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """Unlabelled samples (plus ``name{k=v}`` for labelled ones) of one endpoint; None if it is down."""
    try:
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def describe(service: str, now: dict[str, float], before: dict[str, float] | None, dt: float) -> str:
    """A one-line summary of a service from two scrapes ``dt`` seconds apart."""
    def g(name: str) -> float:
        return now.get(f"streamrl_{service}_{name}", 0.0)

    def rate(name: str) -> float:
        if not before:
            return 0.0
        key = f"streamrl_{service}_{name}"
        return (now.get(key, 0.0) - before.get(key, 0.0)) / dt

    if service == "learner":
        return (f"step {g('step'):.0f}  v{g('policy_version'):.0f}  reward {g('reward_mean'):+.3f}  kl {g('kl'):.4f}  "
                f"ratio max {g('importance_ratio_max'):.2f}  ess {g('effective_sample_size_ratio'):.2f}  "
                f"{rate('samples_total'):.2f} samples/s")
    if service == "buffer":
        return (f"{g('groups'):.0f} groups ({g('rollouts'):.0f} rollouts, {g('incomplete_groups'):.0f} incomplete)  "
                f"in {rate('inserted_total'):.2f}/s  out {rate('sampled_total'):.2f}/s  "
                f"stale-dropped {g('dropped_stale_total'):.0f}  evicted {g('evicted_total'):.0f}")
    if service == "scorer":
        return f"{g('rollouts_scored_total'):.0f} scored  {rate('rollouts_scored_total'):.2f}/s  lost {g('rollouts_lost_total'):.0f}"
    return (f"v{g('policy_version'):.0f} (newest v{g('announced_version'):.0f})  {g('rollouts_total'):.0f} rollouts  "
            f"{rate('rollouts_total'):.2f}/s  {rate('tokens_total'):.1f} tok/s  "
            f"waiting for weights {g('weight_wait_seconds_total'):.0f}s")


def render(cfg: Config, generators: int, interval: float) -> str:
    """Scrape every target twice, ``interval`` seconds apart, and return the table."""
    host = cfg.metrics.host
    ts = targets(cfg, generators)
    first = {t.name: read(host, t.port) for t in ts}
    time.sleep(interval)
    lines = [f"{'process':<13} {'state':<5} {'port':<6} detail"]
    for t in ts:
        now = read(host, t.port)
        state = "up" if now is not None else "DOWN"
        detail = describe(t.service, now, first[t.name], interval) if now is not None else ""
        rejected = sum(v for k, v in (now or {}).items() if "messages_rejected_total{" in k)
        if rejected:
            detail += f"  rejected {rejected:.0f}"
        lines.append(f"{t.name:<13} {state:<5} {t.port:<6} {detail}")
    return "\n".join(lines)
