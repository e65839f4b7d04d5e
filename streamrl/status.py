"""``streamrl status``: one table of the whole run, read from every service's metrics endpoint.

Where the endpoints are comes from one of three places, the same ones Prometheus uses:

* the run config (:func:`targets`): the learner's metrics on the host of ``endpoints.weights``,
  the buffer's on the host of ``endpoints.buffer``, scorer i on the host of ``endpoints.scorers[i]``
  (port = base + its position among the scorers of that host), generators on the hosts given
  (``--generator-hosts gen-a:2,gen-b:2``; default: ``--generators N`` on this machine). Loopback
  endpoints mean this machine at ``metrics.host``. :func:`file_sd` writes these targets as a
  Prometheus ``file_sd_configs`` file (``streamrl targets``);
* such a file (:func:`read_file_sd`), e.g. one a generator host added for itself;
* a Kubernetes namespace (:func:`kubernetes_targets`), through ``kubectl proxy``: every pod with
  the annotation ``prometheus.io/scrape: "true"`` (what ``deploy/k8s`` sets), read through the API
  server's pod proxy, so it works from outside the cluster network.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from streamrl.common.config import Config
from streamrl.common.peers import last_reward_error, scrape_url

SERVICES = ("learner", "buffer", "scorer", "generator", "feedback")
"""Services with a metrics endpoint, in table order."""
COMPONENT_LABEL = "app.kubernetes.io/component"
"""Pod label naming the service (``deploy/k8s`` sets it on every pod)."""


@dataclass
class Target:
    """One service process to read: its name (``process`` label), service, host and metrics port.

    ``url`` overrides ``http://host:port/metrics`` (e.g. the Kubernetes API server's pod proxy).
    """

    name: str
    service: str
    port: int
    host: str = "127.0.0.1"
    url: str = ""

    @property
    def address(self) -> str:
        """``host:port`` as Prometheus writes a target (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return self.url or f"http://{self.address}/metrics"


def _is_local(host: str) -> bool:
    if host in ("localhost", "*", ""):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _endpoint_host(endpoint: str) -> str:
    transport, _, address = endpoint.partition("://")
    return address.rpartition(":")[0].strip("[]") if transport == "tcp" else ""


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """``"gen-a:2,gen-b"`` -> ``[("gen-a", 2), ("gen-b", 1)]`` (host, replicas on it).

    Raises:
        ValueError: an empty host or a count that is not a positive integer.
    """
    out = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        host, colon, count = item.rpartition(":") if item.count(":") == 1 else (item, "", "1")
        if not host or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{item!r}: expected HOST or HOST:COUNT (COUNT >= 1), e.g. gen-a:2")
        out.append((host, int(count)))
    return out


def targets(cfg: Config, generators: int, generator_hosts: list[tuple[str, int]] | None = None) -> list[Target]:
    """The metrics endpoints of a run from its config (see the module docstring).

    Args:
        cfg: the run config.
        generators: generators on this machine (ports ``generator_port + i``), when ``generator_hosts`` is None.
        generator_hosts: ``(host, count)`` per generator host: ``count`` generators on ``host`` with the
            local indices 0..count-1.
    """
    m, e = cfg.metrics, cfg.endpoints
    local = "127.0.0.1" if _is_local(m.host) else m.host

    def where(endpoint: str) -> str:
        host = _endpoint_host(endpoint)
        return local if _is_local(host) else host

    out = [
        Target("learner-0", "learner", m.learner_port, where(e.weights)),
        Target("buffer-0", "buffer", m.buffer_port, where(e.buffer)),
    ]
    seen: dict[str, int] = {}
    for i, endpoint in enumerate(e.scorers):
        host = where(endpoint)
        position = seen[host] = seen.get(host, -1) + 1
        out.append(Target(f"scorer-{i}", "scorer", m.scorer_port + position, host))
    hosts = generator_hosts if generator_hosts is not None else [(local, generators)]
    number = 0
    for host, count in hosts:
        for position in range(count):
            name = f"generator-{number}" if generator_hosts is None else f"generator-{host}-{position}"
            out.append(Target(name, "generator", m.generator_port + position, host))
            number += 1
    if cfg.feedback.enabled:
        out.append(Target("feedback-0", "feedback", m.feedback_port, where(e.feedback)))
    return out


def file_sd(ts: list[Target]) -> list[dict]:
    """Prometheus ``file_sd_configs`` content: one group per target, labelled ``service`` and ``process``."""
    return [{"targets": [t.address], "labels": {"service": t.service, "process": t.name}} for t in ts]


def read_file_sd(path: str | Path) -> list[Target]:
    """The targets of a Prometheus ``file_sd`` file (JSON or YAML) that carry a ``service`` label.

    Raises:
        ValueError: the file is not a list of ``{targets, labels}`` groups or a target is not ``host:port``.
        OSError: the file cannot be read.
    """
    groups = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    if not isinstance(groups, list):
        raise ValueError(f"{path}: expected a list of {{targets: [...], labels: {{...}}}} groups")
    out = []
    for group in groups:
        labels = group.get("labels") or {}
        if labels.get("service") not in SERVICES:
            continue
        for address in group.get("targets", []):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{path}: target {address!r} is not host:port")
            out.append(Target(labels.get("process", address), labels["service"], int(port), host.strip("[]")))
    return out


def kubernetes_targets(
    api: str, namespace: str, selector: str = "app.kubernetes.io/part-of=streamrl", timeout: float = 5.0
) -> list[Target]:
    """Every scrapable streamrl pod of ``namespace``, read through the API server (e.g. ``kubectl proxy``).

    Args:
        api: base URL of the Kubernetes API, e.g. ``http://127.0.0.1:8001`` from ``kubectl proxy``.
        namespace: the run's namespace.
        selector: label selector of the run's pods.

    A pod counts when it is annotated ``prometheus.io/scrape: "true"`` with a ``prometheus.io/port``;
    its service is its ``app.kubernetes.io/component`` label and its name the pod name. Metrics are
    read at ``/api/v1/namespaces/NS/pods/NAME:PORT/proxy/metrics``.

    Raises:
        OSError: the API cannot be reached (the message names the URL).
    """
    base = api.rstrip("/")
    url = f"{base}/api/v1/namespaces/{namespace}/pods?" + urllib.parse.urlencode({"labelSelector": selector})
    try:
        pods = json.loads(urllib.request.urlopen(url, timeout=timeout).read())
    except (OSError, ValueError) as err:
        raise OSError(f"cannot list pods at {url}: {err}; fix: run `kubectl proxy` and pass its URL") from None
    out = []
    for pod in pods.get("items", []):
        meta = pod.get("metadata", {})
        notes, labels = meta.get("annotations") or {}, meta.get("labels") or {}
        service, port = labels.get(COMPONENT_LABEL), notes.get("prometheus.io/port", "")
        if notes.get("prometheus.io/scrape") != "true" or service not in SERVICES or not port.isdigit():
            continue
        name = meta["name"]
        out.append(
            Target(
                name,
                service,
                int(port),
                pod.get("status", {}).get("podIP") or name,
                url=f"{base}/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy/metrics",
            )
        )
    return sorted(out, key=lambda t: (SERVICES.index(t.service), t.name))


def read(host: str, port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """Unlabelled samples (plus ``name{k=v}`` for labelled ones) of ``http://host:port/metrics``; None if it is down."""
    return read_url(Target("", "", port, host).metrics_url, timeout)


def read_url(url: str, timeout: float = 2.0) -> dict[str, float] | None:
    """Samples of the Prometheus text at ``url`` (see :func:`read`); None if it cannot be read."""
    return scrape_url(url, timeout)


DISCOVER_GENERATORS = 32
"""Ports ``generator_port + 0 .. 31`` are probed when ``--generators`` is not given."""


def discover_generators(cfg: Config, limit: int = DISCOVER_GENERATORS, timeout: float = 0.5) -> int:
    """How many generators this machine's metrics ports show: the highest index whose port
    ``generator_port + i`` answers as a streamrl generator, plus one (0 when none does). Indices
    below it that do not answer are generators that died: they are listed as DOWN."""
    local = "127.0.0.1" if _is_local(cfg.metrics.host) else cfg.metrics.host
    found = 0
    for i in range(limit):
        samples = read(local, cfg.metrics.generator_port + i, timeout)
        if samples is not None and any(key.startswith("streamrl_generator_info") for key in samples):
            found = i + 1
    return found


def step_seconds(cfg: Config, learner: dict[str, float] | None) -> float | None:
    """Seconds of the learner's last step (a batch over its samples/s, which counts waiting and
    training); None before the first step."""
    rate = (learner or {}).get("streamrl_learner_samples_per_second", 0.0)
    return cfg.learner.groups_per_step * cfg.generator.group_size / rate if rate > 0 else None


class ScrapeHistory:
    """Timestamped scrapes of every target, so rates span a window long enough to include a learner
    step (between steps the learner's and the buffer's counters stand still: a 2 s window shows 0/s)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[str, dict[str, float] | None]]] = []

    def add(self, when: float, scrapes: dict[str, dict[str, float] | None], keep_s: float = 300.0) -> None:
        self.samples.append((when, scrapes))
        self.samples = [(t, s) for t, s in self.samples if t >= when - keep_s]

    def before(self, now: float, window: float) -> tuple[float, dict[str, dict[str, float] | None]]:
        """The newest scrape at least ``window`` seconds old (else the oldest kept)."""
        older = [(t, s) for t, s in self.samples if t <= now - window]
        return older[-1] if older else self.samples[0]


def describe(service: str, now: dict[str, float], before: dict[str, float] | None, dt: float) -> str:
    """A one-line summary of a service from two scrapes ``dt`` seconds apart."""

    def g(name: str) -> float:
        return now.get(f"streamrl_{service}_{name}", 0.0)

    def rate(name: str) -> float:
        if not before or dt <= 0:
            return 0.0
        key = f"streamrl_{service}_{name}"
        return (now.get(key, 0.0) - before.get(key, 0.0)) / dt

    if service == "learner":
        return (
            f"step {g('step'):.0f}  v{g('policy_version'):.0f}  reward {g('reward_mean'):+.3f}  kl {g('kl'):.4f}  "
            f"ratio max {g('importance_ratio_max'):.2f}  ess {g('effective_sample_size_ratio'):.2f}  "
            f"{g('samples_per_second'):.2f} samples/s  busy {g('busy_ratio'):.0%}"
        )  # its own rate over the last step
    if service == "buffer":
        return (
            f"{g('groups'):.0f} groups ({g('rollouts'):.0f} rollouts, {g('incomplete_groups'):.0f} incomplete)  "
            f"in {rate('inserted_total'):.2f}/s  out {rate('sampled_total'):.2f}/s  "
            f"stale-dropped {g('dropped_stale_total'):.0f}  evicted {g('evicted_total'):.0f}  "
            f"credits out {g('credits_outstanding'):.0f}"
        )
    if service == "scorer":
        line = (
            f"{g('rollouts_scored_total'):.0f} scored  {rate('rollouts_scored_total'):.2f}/s"
            f"  lost {g('rollouts_lost_total'):.0f}"
        )
        in_a_row, fraction = g("reward_consecutive_failures"), g("reward_failure_fraction")
        if g("reward_failing") and in_a_row:
            line += f"  REWARD FAILING ({in_a_row:.0f} micro-batches in a row: {last_reward_error(now)})"
        elif fraction:
            line += (
                f"  {'REWARD FAILING' if g('reward_failing') else 'reward raises'} on {fraction:.0%} of recent "
                f"rollouts ({last_reward_error(now)}; their groups dropped)"
            )
        return line
    if service == "feedback":
        return (
            f"{g('labels_total{kind=rating}') + g('labels_total{kind=preference}'):.0f} labels  H-hat "
            f"v{g('human_model_version'):.0f}  influence {'on' if g('influence_active') else 'paused'}  "
            f"feed {rate('rollouts_received_total'):.2f}/s"
        )
    return (
        f"v{g('policy_version'):.0f} (newest v{g('announced_version'):.0f})  {g('rollouts_total'):.0f} rollouts  "
        f"{rate('rollouts_total'):.2f}/s  {rate('tokens_total'):.1f} tok/s  "
        f"waiting for weights {g('weight_wait_seconds_total'):.0f}s, credits {g('credit_wait_seconds_total'):.0f}s  "
        f"useful {g('useful_ratio'):.0%}"
    )


def render(
    cfg: Config,
    generators: int,
    interval: float | None,
    ts: list[Target] | None = None,
    history: ScrapeHistory | None = None,
    max_window: float = 60.0,
) -> str:
    """Scrape every target, wait, scrape again, and return the table.

    Rates span ``max(interval, the learner's last step)`` seconds (at most ``max_window``), so a
    learner step falls inside the window. ``interval`` None waits one learner step before the second
    scrape (2 s before the first step); with a ``history`` (``--watch``) earlier scrapes are reused
    and each refresh waits ``interval`` (2 s when None). ``ts`` (from :func:`read_file_sd` or
    :func:`kubernetes_targets`) replaces the targets of the config.
    """
    ts = targets(cfg, generators) if ts is None else ts
    history = ScrapeHistory() if history is None else history
    learner = next((t for t in ts if t.service == "learner"), None)

    def window(scrapes) -> float:
        step = step_seconds(cfg, scrapes.get(learner.name) if learner else None) or 0.0
        return min(max_window, max(interval or 2.0, step * 1.05))

    if not history.samples:
        history.add(time.monotonic(), {t.name: read_url(t.metrics_url) for t in ts})
        time.sleep(window(history.samples[-1][1]) if interval is None else interval)
    else:
        time.sleep(interval or 2.0)
    scrapes = {t.name: read_url(t.metrics_url) for t in ts}
    now_t = time.monotonic()
    history.add(now_t, scrapes)
    then, earlier = history.before(now_t, window(scrapes))
    width = max([13, *(len(t.name) + 1 for t in ts)])
    step = step_seconds(cfg, scrapes.get(learner.name) if learner else None)
    note = f"  (rates over the last {now_t - then:.1f}s; a learner step takes {step:.1f}s)" if step else ""
    lines = [f"{'process':<{width}} {'state':<5} {'address':<21} detail{note}"]
    for t in ts:
        now = scrapes[t.name]
        state = "up" if now is not None else "DOWN"
        detail = (
            describe(t.service, now, earlier.get(t.name), now_t - then)
            if now is not None
            else (
                "optional: training goes on without new H-hat versions; `streamrl run` restarts it"
                if t.service == "feedback"
                else ""
            )
        )
        rejected = sum(v for k, v in (now or {}).items() if "messages_rejected_total{" in k)
        if rejected:
            detail += f"  rejected {rejected:.0f}"
        lines.append(f"{t.name:<{width}} {state:<5} {t.address:<21} {detail}")
    return "\n".join(lines)
