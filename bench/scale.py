"""Scaling simulation: N stand-in generators -> the real scorer and buffer -> a stand-in learner.

How the streaming pipeline behaves as generators are added, without a model: where
throughput stops growing, how stale the trained rollouts are, how much generation is
wasted, and which stage saturates first. This is how we plan past one box.

* **Stand-in generators** (``--generator-processes`` processes, N threads in all; a
  thread costs a PUSH socket and a few hundred microseconds per group, so N = 64 fits
  on 2 cores) follow the real generator's loop
  (``streamrl.services.generator.loop``): take the newest announced policy version
  (one :class:`~streamrl.common.weights.WeightClient` per process listens to the
  stand-in learner's announcements; the weights themselves are not fetched, as
  ``bench.weight_sync`` measures that), ask the buffer for generation credits when
  ``generator.credits`` is on (``streamrl.services.generator.credits``, the same
  client), "sample" ``prompts_per_batch`` groups of 4 completions of 32 tokens by
  sleeping ``tokens / --tokens-per-s``, and push one real
  :class:`~streamrl.common.messages.Rollout` per completion (64 prompt tokens, 32
  completion tokens and log-probs, texts; ``bench.transport.make_rollout``) with the
  generator's ``send_when_ready`` (backpressure).
* **The real scorer and buffer** (``python -m streamrl.services.scorer`` /
  ``streamrl.services.buffer``, reward ``count_char``, the buffer's default
  capacity, journal on with ``fsync = always``).
* **A stand-in learner** (one process) asks for batches of ``--groups-per-step``
  groups as the learner does (a request for version v + 1 acknowledges batch v),
  "trains" by sleeping ``--step-s``, then publishes version v + 1 through a real
  :class:`~streamrl.common.weights.WeightServer` (a 16-byte state dict). It records
  the staleness of every trained rollout (the version trained minus the rollout's
  behaviour version, as the learner's ``staleness`` histogram does) and the buffer's
  stale drops.

Two sweeps: **learner-bound** (N = 1, 2, 4, ..., 64 at ``--tokens-per-s`` each, the
learner's step time fixed, for every ``--max-staleness`` and credit mode) and
**ceiling** (a learner that never sleeps, no staleness bound, fast generators: where
the single scorer and buffer saturate). Each point runs ``--warmup`` + ``--seconds``
seconds; figures cover the window after the warm-up. CPU use of the scorer, buffer,
learner and generator processes over the window (from ``/proc``) names the stage
that saturates.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.scale
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import zmq

from bench.report import (
    RESULTS_DIR,
    Deadline,
    command_line,
    environment,
    environment_line,
    markdown_table,
    output_arguments,
    write_results,
)
from bench.stand_ins import join_stand_ins, stand_in_sections, start_scorer_and_buffer
from bench.transport import COMPLETION_TOKENS, GROUP_SIZE, make_rollout
from streamrl.common.config import BufferSection, GeneratorSection, load_config
from streamrl.common.messages import Batch, BatchRequest
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.transport import Inbox, make_socket, send_when_ready, try_send
from streamrl.common.weights import WeightClient, WeightServer

STALENESS_SHOWN = 8
"""Staleness values 0..min(max_staleness, STALENESS_SHOWN) are plotted apart, larger ones together."""
LEARNER_BOUND = 0.85
"""A point is learner-bound when the learner trains (sleeps) this fraction of the window or more."""
PROCESS_BOUND = 0.85
"""...scorer- or buffer-bound when that process used this fraction of one core or more."""
MACHINE_BOUND = 0.9
"""...CPU-bound when the simulation's processes together used this fraction of the machine's cores or more."""
WASTE_BOUND = 0.25
"""...waste-bound when the buffer dropped this fraction of the generated rollouts or more."""
START_TIMEOUT_S = 120.0
"""Seconds the stand-ins of a point may take to set up."""


def credits_available() -> bool:
    """True when this tree has generation credits (``generator.credits`` and its client)."""
    import importlib.util

    return (
        "credits" in GeneratorSection.model_fields
        and importlib.util.find_spec("streamrl.services.generator.credits") is not None
    )


# ---------------------------------------------------------------------- stand-in processes


class _Seconds:
    """What ``send_when_ready`` needs of a counter: ``inc``."""

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


def _generator_thread(
    ctx: zmq.Context,
    cfg,
    index: int,
    tag: str,
    latest: list,
    stop: threading.Event,
    tokens_per_s: float,
    use_credits: bool,
    stats: dict,
) -> None:
    """One stand-in generator: newest version, credits, sleep for the tokens, send every rollout."""
    t = cfg.transport
    generator_id = f"sim-{tag}-{index}"
    push = make_socket(ctx, zmq.PUSH, connect=cfg.endpoints.scorers, max_message_bytes=t.max_message_bytes, hwm=t.hwm)
    credits = None
    if use_credits:
        from streamrl.services.generator.credits import CreditClient

        credits = CreditClient(
            ctx,
            endpoint=cfg.endpoints.batches,
            sender=generator_id,
            instance=f"sim-generator-{index}",
            metrics=ServiceMetrics("bench", generator_id),
            timeout_s=t.request_timeout_s,
            max_message_bytes=t.max_message_bytes,
            hwm=t.hwm,
            security=None,
        )
    blocked = _Seconds()
    rng = np.random.default_rng(index)
    want = cfg.generator.prompts_per_batch
    try:
        while not stop.is_set():
            version = latest[0]
            if version is None:
                stop.wait(0.05)
                continue
            groups = want
            if credits is not None:
                asked = time.perf_counter()
                grant = credits.request(policy_version=version, groups_sent=stats["groups"], want=want)
                groups = min(grant.credits, want) if grant is not None else 0
                if groups == 0:
                    stop.wait(0.1)  # as the generator pauses without a credit
                stats["credit_wait_s"] += time.perf_counter() - asked
                if groups == 0:
                    continue
            if stop.wait(groups * GROUP_SIZE * COMPLETION_TOKENS / tokens_per_s):  # "sampling"
                break
            for _ in range(groups):
                first = stats["groups"] * GROUP_SIZE
                for k in range(GROUP_SIZE):
                    rollout = make_rollout(first + k, generator_id=generator_id, version=version, rng=rng)
                    if not send_when_ready(
                        push, rollout, stop=stop, blocked_seconds=blocked, warn_after_s=600, peer="the scorers"
                    ):
                        return
                    stats["rollouts"] += 1
                stats["groups"] += 1
            stats["blocked_s"] = blocked.value
    finally:
        stats["blocked_s"] = blocked.value
        push.close(0)
        if credits is not None:
            credits.close()


def _generators(
    config_path: str,
    indices: list[int],
    tag: str,
    tokens_per_s: float,
    use_credits: bool,
    warmup_s: float,
    seconds: float,
    out: str,
    start,
) -> None:
    """A process hosting the stand-in generators ``indices`` (threads) and one announcement listener;
    they start when every process of the point has passed the ``start`` barrier."""
    cfg = load_config(config_path)
    t = cfg.transport
    ctx = zmq.Context()
    stop = threading.Event()
    latest: list = [None]

    def listen() -> None:
        client = WeightClient(
            ctx,
            announce_endpoint=cfg.endpoints.weights_announce,
            fetch_endpoint=cfg.endpoints.weights,
            inbox_metrics=ServiceMetrics("bench", f"sim-{tag}"),
            sender=f"sim-{tag}",
            credit=1,
            timeout_s=t.request_timeout_s,
            max_message_bytes=t.max_message_bytes,
            hwm=t.hwm,
        )
        try:
            while not stop.is_set():
                announce = client.poll_announcements(timeout_s=0.05)
                if announce is not None:
                    latest[0] = announce.version
        finally:
            client.close()

    stats = {i: {"groups": 0, "rollouts": 0, "blocked_s": 0.0, "credit_wait_s": 0.0} for i in indices}
    threads = [threading.Thread(target=listen, daemon=True)]
    threads += [
        threading.Thread(
            target=_generator_thread,
            daemon=True,
            args=(ctx, cfg, i, tag, latest, stop, tokens_per_s, use_credits, stats[i]),
        )
        for i in indices
    ]
    start.wait(START_TIMEOUT_S)
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    at_warmup = {i: dict(s) for i, s in stats.items()}
    time.sleep(seconds)
    at_end = {i: dict(s) for i, s in stats.items()}
    stop.set()
    for thread in threads:
        thread.join(5)
    window = {
        key: sum(at_end[i][key] - at_warmup[i][key] for i in indices)
        for key in ("groups", "rollouts", "blocked_s", "credit_wait_s")
    }
    Path(out).write_text(json.dumps(window))
    ctx.term()


def _learner(
    config_path: str,
    start_version: int,
    groups_per_step: int,
    step_s: float,
    warmup_s: float,
    seconds: float,
    out: str,
    start_barrier,
) -> None:
    """The stand-in learner: batches of ``groups_per_step`` groups, ``step_s`` of "training", publish v + 1;
    it starts when every process of the point has passed ``start_barrier``."""
    torch.set_num_threads(1)
    cfg = load_config(config_path)
    t = cfg.transport
    ctx = zmq.Context()
    metrics = ServiceMetrics("bench", "sim-learner")
    server = WeightServer(
        ctx,
        announce_endpoint=cfg.endpoints.weights_announce,
        fetch_endpoint=cfg.endpoints.weights,
        metrics=metrics,
        sender="sim-learner",
        announce_interval_s=t.announce_interval_s,
        max_message_bytes=t.max_message_bytes,
        hwm=t.hwm,
    )
    dealer = make_socket(
        ctx, zmq.DEALER, connect=[cfg.endpoints.batches], max_message_bytes=t.max_message_bytes, hwm=t.hwm
    )
    inbox = Inbox(metrics, [Batch], max_bytes=t.max_message_bytes, socket_name="batches")
    weights = {"w": torch.zeros(4)}
    version = start_version
    start_barrier.wait(START_TIMEOUT_S)
    server.publish_state_dict(weights, version)
    start = time.monotonic()
    measure_from, end = start + warmup_s, start + warmup_s + seconds
    staleness: Counter = Counter()
    rec = {"rollouts": 0, "leftover_rollouts": 0, "steps": 0, "wait_s": 0.0, "train_s": 0.0}
    while time.monotonic() < end:
        asked = time.monotonic()
        request = BatchRequest(sender="sim-learner", learner_version=version, num_groups=groups_per_step)
        sent_at = -1e9
        batch = None
        while batch is None and time.monotonic() < end:
            if time.monotonic() - sent_at > 1.0:  # not connected yet, or the buffer restarted: ask again
                try_send(dealer, request)
                sent_at = time.monotonic()
            if dealer.poll(100):
                msg = inbox.decode(dealer.recv_multipart(copy=False))
                if msg is not None and msg.learner_version == version and msg.rollouts:
                    batch = msg
        if batch is None:
            break
        got = time.monotonic()
        time.sleep(step_s)  # "training"
        measured = asked >= measure_from
        if measured:
            # rollouts of an earlier point's generators (left in the buffer or its queues) take their
            # share of the learner's steps but are not this point's throughput
            own = [s for s in batch.rollouts if s.rollout.generator_id.startswith(f"sim-{start_version}-")]
            rec["steps"] += 1
            rec["rollouts"] += len(own)
            rec["leftover_rollouts"] += len(batch.rollouts) - len(own)
            rec["wait_s"] += got - asked
            rec["train_s"] += step_s
            staleness.update(version - s.rollout.policy_version for s in own)
        version += 1
        server.publish_state_dict(weights, version)
    rec["window_s"] = seconds
    rec["staleness"] = {str(k): v for k, v in sorted(staleness.items())}
    rec["next_version"] = version + 1
    Path(out).write_text(json.dumps(rec))
    dealer.close(0)
    server.close()
    ctx.term()


# ---------------------------------------------------------------------- one point


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVICE_COUNTERS = {
    "inserted": ("buffer", "streamrl_buffer_inserted_total"),
    "dropped_stale": ("buffer", "streamrl_buffer_dropped_stale_total"),
    "evicted": ("buffer", "streamrl_buffer_evicted_total"),
    "discarded": ("buffer", "streamrl_buffer_messages_rejected_total{reason=group_discarded}"),
    "fsync_s": ("buffer", "streamrl_buffer_journal_fsync_seconds_total"),
    "scorer_blocked_s": ("scorer", "streamrl_scorer_send_blocked_seconds_total"),
}
"""Counters of the scorer and buffer read over a point's window (``discarded``: rollouts of a group the
buffer had already dropped; ``fsync_s``: the journal's fsyncs; ``scorer_blocked_s``: the scorer waiting
for the buffer to read)."""


def _service_counters(ports: dict[str, int]) -> dict[str, float]:
    from streamrl.testing import scrape

    samples = {service: scrape(port) for service, port in ports.items()}
    return {key: samples[service].get(name, 0.0) for key, (service, name) in SERVICE_COUNTERS.items()}


def _machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, every process included (``/proc/stat``)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def run_point(
    config: Path,
    services,
    *,
    n: int,
    tokens_per_s: float,
    step_s: float,
    groups_per_step: int,
    use_credits: bool,
    start_version: int,
    warmup_s: float,
    seconds: float,
    processes: int,
    workdir: Path,
    ports: dict[str, int],
) -> dict:
    """One (N, settings) point; returns its measurements (see ``summarise``)."""
    # fork: the children start with this process's imports (torch, zmq) instead of importing them again
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    tag = f"{start_version}"
    learner_out = workdir / f"learner-{tag}.json"
    groups = [list(range(n))[p::processes] for p in range(min(processes, n))]
    gen_outs = [workdir / f"generators-{tag}-{p}.json" for p in range(len(groups))]
    start = context.Barrier(len(groups) + 2)  # the learner, the generator processes and this one
    procs = [
        context.Process(
            target=_learner,
            daemon=True,
            args=(str(config), start_version, groups_per_step, step_s, warmup_s, seconds, str(learner_out), start),
        )
    ]
    procs += [
        context.Process(
            target=_generators,
            daemon=True,
            args=(str(config), indices, f"{tag}-{p}", tokens_per_s, use_credits, warmup_s, seconds, str(out), start),
        )
        for p, (indices, out) in enumerate(zip(groups, gen_outs))
    ]
    for p in procs:
        p.start()
    watched = {
        "scorer": services.procs["scorer-0"].pid,
        "buffer": services.procs["buffer-0"].pid,
        "learner": procs[0].pid,
        **{f"generators-{i}": p.pid for i, p in enumerate(procs[1:])},
    }
    start.wait(START_TIMEOUT_S)  # every stand-in is set up: the clocks start together
    time.sleep(warmup_s)
    cpu0 = {name: _cpu_seconds(pid) for name, pid in watched.items()}
    counters0, machine0 = _service_counters(ports), _machine_busy_ticks()
    time.sleep(seconds)
    cpu1 = {name: _cpu_seconds(pid) for name, pid in watched.items()}
    counters1, machine1 = _service_counters(ports), _machine_busy_ticks()
    join_stand_ins(procs, seconds + 60, services)
    learner = json.loads(learner_out.read_text())
    gens = [json.loads(out.read_text()) for out in gen_outs]
    cpu = {name: max(0.0, cpu1[name] - cpu0[name]) / seconds for name in watched}
    point = summarise(
        n=n,
        tokens_per_s=tokens_per_s,
        step_s=step_s,
        groups_per_step=groups_per_step,
        use_credits=use_credits,
        learner=learner,
        generators=gens,
        cpu=cpu,
        services={key: counters1[key] - counters0[key] for key in SERVICE_COUNTERS},
        machine_busy=(machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1]),
    )
    point["next_version"] = learner["next_version"]  # the next point's learner goes on from here
    return point


def summarise(
    *,
    n: int,
    tokens_per_s: float,
    step_s: float,
    groups_per_step: int,
    use_credits: bool,
    learner: dict,
    generators: list[dict],
    cpu: dict,
    services: dict,
    machine_busy: float,
) -> dict:
    """Rates, waste, staleness and the saturated stage of one point from the stand-ins' records,
    the scorer's and buffer's counters over the window (``services``: :data:`SERVICE_COUNTERS`
    deltas) and the machine's busy fraction (all cores, every process).

    Returns:
        offered/generated/trained rollouts per second, the learner's capacity (rollouts/s; None
        when it never sleeps), busy fraction and wait per step, the waste fraction (rollouts the
        buffer dropped as stale, evicted or discarded with their group / generated), generator
        blocked and credit-wait fractions, staleness histogram, mean and 90th percentile, CPU
        fraction of a core per process, the buffer's fsync and the scorer's blocked share of the
        window, the machine's busy fraction, and ``bound`` (:func:`bound`).
    """
    window = learner["window_s"]
    generated = sum(g["rollouts"] for g in generators)
    staleness = {int(k): v for k, v in learner["staleness"].items()}
    trained = learner["rollouts"]
    values = sorted(k for k, c in staleness.items() for _ in range(c))
    capacity = groups_per_step * GROUP_SIZE / step_s if step_s > 0 else None
    point = {
        "n": n,
        "tokens_per_s": tokens_per_s,
        "step_s": step_s,
        "credits": use_credits,
        "offered_per_s": n * tokens_per_s / COMPLETION_TOKENS,
        "generated_per_s": generated / window,
        "trained_per_s": trained / window,
        "learner_capacity_per_s": capacity,
        "learner_busy": learner["train_s"] / window,
        "learner_wait_per_step_s": learner["wait_s"] / max(learner["steps"], 1),
        "steps": learner["steps"],
        "leftover_trained": learner["leftover_rollouts"],
        "services": services,
        "waste": (
            (services["dropped_stale"] + services["evicted"] + services["discarded"]) / generated if generated else 0.0
        ),
        "buffer_fsync": services["fsync_s"] / window,
        "scorer_blocked": services["scorer_blocked_s"] / window,
        "machine_busy": machine_busy,
        "generator_blocked": sum(g["blocked_s"] for g in generators) / (n * window),
        "generator_credit_wait": sum(g["credit_wait_s"] for g in generators) / (n * window),
        "staleness": staleness,
        "staleness_mean": float(np.mean(values)) if values else float("nan"),
        "staleness_p90": float(np.percentile(values, 90)) if values else float("nan"),
        "cpu": cpu,
    }
    point["bound"] = bound(point)
    return point


def bound(point: dict) -> str:
    """The stage that limits a point: ``learner`` (it trains >= ``LEARNER_BOUND`` of the window),
    ``buffer`` (its CPU plus fsync share >= ``PROCESS_BOUND`` of a core, or the scorer blocked on
    it half the window), ``scorer`` (its CPU), ``cpu`` (the simulation's processes together use
    >= ``MACHINE_BOUND`` of the machine's cores), ``waste`` (the buffer dropped >= ``WASTE_BOUND`` of
    what was generated: the learner waits for fresh rollouts), ``admission`` (generators held back by credits or
    backpressure a quarter of the time with nothing saturated) or ``generators``."""
    cpu = point["cpu"]
    if point["step_s"] > 0 and point["learner_busy"] >= LEARNER_BOUND:
        return "learner"
    # the buffer is busy computing or in fsync; the scorer waiting on it says the same
    if cpu.get("buffer", 0.0) + point["buffer_fsync"] >= PROCESS_BOUND or point["scorer_blocked"] >= 0.5:
        return "buffer"
    if cpu.get("scorer", 0.0) >= PROCESS_BOUND:
        return "scorer"
    if sum(cpu.values()) >= MACHINE_BOUND * (os.cpu_count() or 1):
        return "cpu"
    if point["waste"] >= WASTE_BOUND:
        return "waste"
    if point["generator_blocked"] + point["generator_credit_wait"] > 0.25:
        return "admission"
    return "generators"


# ---------------------------------------------------------------------- sweeps


def sweep(
    name: str,
    *,
    ns: list[int],
    max_staleness: int,
    modes: list[bool],
    tokens_per_s: float,
    step_s: float,
    groups_per_step: int,
    warmup_s: float,
    seconds: float,
    processes: int,
    deadline: Deadline,
    skipped: list[str],
) -> list[dict]:
    """Start the scorer and buffer with ``max_staleness`` and run every N in ``ns`` through them, for each
    credit mode in ``modes`` (the generators ask for credits or not; the services stay up)."""
    points: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="streamrl-scale-") as tmp:
        workdir = Path(tmp)
        buffer = {"capacity_groups": BufferSection().capacity_groups}
        if "credit_ttl_s" in BufferSection.model_fields:
            buffer["credit_ttl_s"] = 2.0  # stand-ins of the previous point leave unspent credits: expire them fast
        sections = stand_in_sections(
            workdir,
            run={"max_staleness": max_staleness},
            buffer=buffer,
            learner={"groups_per_step": groups_per_step},
            generator={"group_size": GROUP_SIZE},
        )
        config, services = start_scorer_and_buffer(workdir, sections, "scale")
        try:
            ports = {service: sections["metrics"][f"{service}_port"] for service in ("buffer", "scorer")}
            version = 0
            for use_credits, n in ((mode, n) for mode in modes for n in ns):
                label = f"{name} N={n} max_staleness={max_staleness} credits={'on' if use_credits else 'off'}"
                if points and deadline.left() < warmup_s + seconds + 5:
                    skipped.append(label)
                    continue
                point = run_point(
                    config,
                    services,
                    n=n,
                    tokens_per_s=tokens_per_s,
                    step_s=step_s,
                    groups_per_step=groups_per_step,
                    use_credits=use_credits,
                    start_version=version,
                    warmup_s=warmup_s,
                    seconds=seconds,
                    processes=processes,
                    workdir=workdir,
                    ports=ports,
                )
                version = point.pop("next_version")
                point.update(sweep=name, max_staleness=max_staleness)
                points.append(point)
                print(
                    f"{label}: trained {point['trained_per_s']:.1f}/s, generated {point['generated_per_s']:.1f}/s "
                    f"(offered {point['offered_per_s']:.0f}), waste {point['waste']:.0%}, staleness mean "
                    f"{point['staleness_mean']:.2f} p90 {point['staleness_p90']:.0f}, bound: {point['bound']} "
                    f"(cpu {', '.join(f'{k} {v:.0%}' for k, v in point['cpu'].items())})",
                    flush=True,
                )
        finally:
            services.close()
    return points


# ---------------------------------------------------------------------- report


def saturation(points: list[dict]) -> list[str]:
    """One line per configuration: where adding generators stopped adding throughput, and why."""
    lines = []
    configs = sorted({(p["sweep"], p["max_staleness"], p["credits"]) for p in points})
    for sweep_name, eta, credits in configs:
        same = (sweep_name, eta, credits)
        rows = sorted(
            (p for p in points if (p["sweep"], p["max_staleness"], p["credits"]) == same), key=lambda p: p["n"]
        )
        best = max(rows, key=lambda p: p["trained_per_s"])
        first = next((p for p in rows if p["trained_per_s"] >= 0.9 * best["trained_per_s"]), best)
        what = (
            f"{sweep_name}, max_staleness {eta}, credits {'on' if credits else 'off'}: "
            f"throughput reaches {first['trained_per_s']:.1f} rollouts/s at N = {first['n']} "
            f"(90% of the best, {best['trained_per_s']:.1f}/s at N = {best['n']}), bound there: {first['bound']}"
        )
        if first["learner_capacity_per_s"]:
            what += f"; learner capacity {first['learner_capacity_per_s']:.0f}/s"
        last = rows[-1]
        what += (
            f"; at N = {last['n']}: waste {last['waste']:.0%}, staleness mean {last['staleness_mean']:.2f}, "
            f"scorer {last['cpu'].get('scorer', 0):.0%} / buffer {last['cpu'].get('buffer', 0):.0%} of a core"
        )
        lines.append(what)
    return lines


def plot(points: list[dict], path: Path) -> None:
    """Throughput, waste, ceiling and staleness distributions in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learner = [p for p in points if p["sweep"] == "learner-bound"]
    ceiling = [p for p in points if p["sweep"] == "ceiling"]
    etas = sorted({p["max_staleness"] for p in learner})
    fig, axes = plt.subplots(2, max(3, len(etas)), figsize=(5 * max(3, len(etas)), 8.5), squeeze=False)
    configs = sorted({(p["max_staleness"], p["credits"]) for p in learner})
    ax_rate, ax_waste, ax_ceiling = axes[0][0], axes[0][1], axes[0][2]
    for eta, credits in configs:
        rows = sorted(
            (p for p in learner if (p["max_staleness"], p["credits"]) == (eta, credits)), key=lambda p: p["n"]
        )
        label = f"eta={eta}, credits {'on' if credits else 'off'}"
        (line,) = ax_rate.plot([p["n"] for p in rows], [p["trained_per_s"] for p in rows], "o-", label=label)
        ax_rate.plot([p["n"] for p in rows], [p["generated_per_s"] for p in rows], ":", color=line.get_color())
        ax_waste.plot(
            [p["n"] for p in rows], [100 * p["waste"] for p in rows], "o-", color=line.get_color(), label=label
        )
    if learner:
        capacity = learner[0]["learner_capacity_per_s"]
        ns = sorted({p["n"] for p in learner})
        if capacity:
            ax_rate.axhline(capacity, color="gray", ls="--", label="learner capacity")
        ax_rate.plot(
            ns, [n * learner[0]["tokens_per_s"] / COMPLETION_TOKENS for n in ns], color="gray", ls="-.", label="offered"
        )
    ax_rate.set(
        xscale="log",
        yscale="log",
        xlabel="generators N",
        ylabel="rollouts/s",
        title="trained (solid) and generated (dotted)",
    )
    ax_rate.legend(fontsize=7)
    ax_waste.set(
        xscale="log",
        xlabel="generators N",
        ylabel="% of generated rollouts dropped",
        title="wasted generation (stale, evicted, discarded)",
    )
    ax_waste.legend(fontsize=7)
    for ax in (ax_rate, ax_waste):
        ns = sorted({p["n"] for p in learner})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    if ceiling:
        rows = sorted(ceiling, key=lambda p: p["n"])
        offered = [p["offered_per_s"] for p in rows]
        ax_ceiling.plot(offered, [p["trained_per_s"] for p in rows], "o-", label="trained")
        ax_ceiling.plot(offered, offered, color="gray", ls="--", label="offered")
        for p in rows:
            ax_ceiling.annotate(
                f"N={p['n']}\nscorer {p['cpu'].get('scorer', 0):.0%}\nbuffer {p['cpu'].get('buffer', 0):.0%}",
                (p["offered_per_s"], p["trained_per_s"]),
                fontsize=6,
                textcoords="offset points",
                xytext=(-12, 8),
            )
        ax_ceiling.set(
            xscale="log",
            yscale="log",
            xlabel="offered rollouts/s",
            ylabel="trained rollouts/s",
            title="ceiling: learner never waits, no staleness bound",
        )
        ax_ceiling.legend(fontsize=7)
    else:
        ax_ceiling.set_visible(False)
    for ax in axes[0][3:]:
        ax.set_visible(False)
    credit_modes = sorted({p["credits"] for p in learner}, reverse=True)
    for col, ax in enumerate(axes[1]):
        if col >= len(etas):
            ax.set_visible(False)
            continue
        eta = etas[col]
        rows = sorted(
            (p for p in learner if p["max_staleness"] == eta and p["credits"] == credit_modes[0]), key=lambda p: p["n"]
        )
        bottom = np.zeros(len(rows))
        top = min(eta, STALENESS_SHOWN) + 1  # 0 .. top - 1 apart, the rest together
        colors = plt.cm.viridis(np.linspace(0, 1, top + 1))
        for s in range(top + 1):
            share = np.array(
                [
                    (
                        sum(c for k, c in p["staleness"].items() if (int(k) == s if s < top else int(k) >= s))
                        / max(1, sum(p["staleness"].values()))
                    )
                    for p in rows
                ]
            )
            if share.any():
                ax.bar(
                    [str(p["n"]) for p in rows],
                    share,
                    bottom=bottom,
                    color=colors[s],
                    label=str(s) if s < top else f">={s}",
                )
            bottom += share
        ax.set(
            xlabel="generators N",
            ylabel="share of trained rollouts",
            title=f"staleness, eta={eta}, credits {'on' if credit_modes[0] else 'off'}",
        )
        ax.legend(title="staleness", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(result: dict, env: dict, command: str, plot_name: str) -> str:
    """The RESULTS.md section."""
    s = result["settings"]
    rows = [
        [
            p["sweep"],
            p["max_staleness"],
            "on" if p["credits"] else "off",
            p["n"],
            p["offered_per_s"],
            p["generated_per_s"],
            p["trained_per_s"],
            p["learner_busy"],
            f"{100 * p['waste']:.0f}%",
            p["staleness_mean"],
            p["staleness_p90"],
            f"{100 * p['generator_blocked']:.0f}%",
            f"{100 * p['generator_credit_wait']:.0f}%",
            f"{100 * p['cpu'].get('scorer', 0):.0f}%",
            f"{100 * p['scorer_blocked']:.0f}%",
            f"{100 * p['cpu'].get('buffer', 0):.0f}%",
            f"{100 * p['buffer_fsync']:.0f}%",
            f"{100 * p['machine_busy']:.0f}%",
            p["bound"],
        ]
        for p in result["points"]
    ]
    table = markdown_table(
        [
            "sweep",
            "max_staleness",
            "credits",
            "N",
            "offered/s",
            "generated/s",
            "trained/s",
            "learner busy",
            "waste",
            "staleness mean",
            "p90",
            "gen. blocked",
            "gen. credit wait",
            "scorer CPU",
            "scorer blocked",
            "buffer CPU",
            "buffer fsync",
            "machine busy",
            "bound",
        ],
        rows,
    )
    notes = [
        "## Scaling simulation (stand-in generators and learner, real scorer and buffer)",
        "",
        f"Command: `{command}`",
        "",
        environment_line(env),
        "",
        f"![throughput, waste, ceiling and staleness against N and max_staleness]({plot_name})",
        "",
        "Where it saturates:",
        "",
        *[f"* {line}" for line in result["saturation"]],
        "",
        table,
        "",
        f"Learner-bound sweep: each generator offers {s['tokens_per_s']:.0f} tokens/s "
        f"({s['tokens_per_s'] / COMPLETION_TOKENS:.0f} rollouts/s: groups of {GROUP_SIZE} completions of "
        f"{COMPLETION_TOKENS} tokens, {s['prompts_per_batch']} groups per batch); "
        f"the learner takes {s['groups_per_step']} groups per step and sleeps {s['step_s']} s per step "
        f"(capacity {s['groups_per_step'] * GROUP_SIZE / s['step_s']:.0f} rollouts/s). Ceiling sweep: "
        f"{s['ceiling_tokens_per_s']:.0f} tokens/s per generator, a learner that never sleeps, max_staleness "
        f"{s['ceiling_max_staleness']}. Every point: {s['warmup_s']:.0f} s warm-up then {s['seconds']:.0f} s measured; "
        f"N generator threads in {s['processes']} processes. waste = rollouts the buffer dropped as stale, "
        "evicted or discarded with their group / generated (the buffer's counters over the window, which can "
        "include a previous point's leftovers; trained leftovers are left out of trained/s and reported as "
        "`leftover_trained` in the JSON); staleness = version trained - behaviour version of each trained rollout; "
        "gen. blocked = share of the generators' time spent waiting on backpressure, gen. credit wait = asking "
        "for or waiting on credits; CPU = share of one core over the window; scorer blocked = share of the "
        "window the scorer waited for the buffer to read; buffer fsync = share spent in the journal's fsyncs; "
        "machine busy = all cores, every process on the machine (other people's too). bound: `learner` when the "
        f"learner trained >= {LEARNER_BOUND:.0%} of the window, `buffer` when its CPU + fsync share reached "
        f"{PROCESS_BOUND:.0%} or the scorer was blocked on it half the window, `scorer` when its CPU reached "
        f"{PROCESS_BOUND:.0%}, `cpu` when the simulation's processes used >= {MACHINE_BOUND:.0%} of the machine's "
        f"cores, `waste` when the buffer dropped >= {WASTE_BOUND:.0%} of what was generated (the learner waits "
        "for fresh rollouts), `admission` when "
        "generators were held back (credits, backpressure) with nothing saturated, else `generators`. All "
        "processes share this machine's cores, so the ceiling is this box's, not the buffer's alone.",
    ]
    if result["skipped"]:
        notes += ["", "Skipped for the time bound: " + "; ".join(result["skipped"]) + "."]
    if not result["credits_available"]:
        notes += ["", "This tree has no generation credits: every point ran without them."]
    return "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--generators", default="1,2,4,8,16,32,64", help="N values, comma-separated")
    parser.add_argument("--max-staleness", default="0,2,8", help="max_staleness values of the learner-bound sweep")
    parser.add_argument(
        "--credits",
        default="auto",
        choices=["auto", "on", "off", "both"],
        help="generation credits in the learner-bound sweep (auto: both when this tree has them)",
    )
    parser.add_argument("--tokens-per-s", type=float, default=256.0, help="per generator, learner-bound sweep")
    parser.add_argument("--step-s", type=float, default=0.5, help="stand-in learner's seconds per step")
    parser.add_argument("--groups-per-step", type=int, default=4)
    parser.add_argument("--ceiling-generators", default="1,4,16,64", help="N values of the ceiling sweep ('' = none)")
    parser.add_argument("--ceiling-tokens-per-s", type=float, default=2048.0, help="per generator, ceiling sweep")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per point")
    parser.add_argument("--processes", type=int, default=2, help="processes hosting the generator threads")
    output_arguments(parser, max_seconds=600.0, bound="no new point starts after it (each sweep runs at least one)")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="redraw the plot and rewrite the section from an earlier run's results (no measuring)",
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        return publish(json.loads(args.replot.read_text()), args.results_dir, args.results_md)
    deadline = Deadline(args.max_seconds)
    available = credits_available()
    modes = {"auto": [True, False] if available else [False], "on": [True], "off": [False], "both": [True, False]}[
        args.credits
    ]
    if True in modes and not available:
        parser.error("--credits on/both: this tree has no generation credits (generator.credits)")
    ns = [int(x) for x in args.generators.split(",")]
    common = dict(
        groups_per_step=args.groups_per_step,
        warmup_s=args.warmup,
        seconds=args.seconds,
        processes=args.processes,
        deadline=deadline,
    )
    points: list[dict] = []
    skipped: list[str] = []
    for eta in (int(x) for x in args.max_staleness.split(",")):
        points += sweep(
            "learner-bound",
            ns=ns,
            max_staleness=eta,
            modes=modes,
            tokens_per_s=args.tokens_per_s,
            step_s=args.step_s,
            skipped=skipped,
            **common,
        )
    ceiling_ns = [int(x) for x in args.ceiling_generators.split(",") if x]
    ceiling_eta = 1_000_000
    if ceiling_ns:
        points += sweep(
            "ceiling",
            ns=ceiling_ns,
            max_staleness=ceiling_eta,
            modes=modes[:1],
            tokens_per_s=args.ceiling_tokens_per_s,
            step_s=0.0,
            skipped=skipped,
            **common,
        )
    result = {
        "command": command_line(),
        "environment": environment(),
        "credits_available": available,
        "settings": {
            "tokens_per_s": args.tokens_per_s,
            "step_s": args.step_s,
            "groups_per_step": args.groups_per_step,
            "prompts_per_batch": GeneratorSection().prompts_per_batch,
            "ceiling_tokens_per_s": args.ceiling_tokens_per_s,
            "ceiling_max_staleness": ceiling_eta,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "processes": args.processes,
        },
        "points": points,
        "saturation": saturation(points),
        "skipped": skipped,
        "plot": "scale.png",
    }
    return publish(result, args.results_dir, args.results_md)


def publish(result: dict, results_dir: Path | None, results_md: Path | None) -> int:
    """Draw ``<results_dir>/scale.png`` and write ``scale.json`` and the RESULTS.md section of ``result``."""
    results_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_path = results_dir / "scale.png"
    plot(result["points"], plot_path)
    md_dir = (Path(results_md) if results_md is not None else RESULTS_DIR.parent / "RESULTS.md").parent
    section = render(result, result["environment"], result["command"], os.path.relpath(plot_path, md_dir))
    out = write_results("scale", result, section, results_dir=results_dir, results_md=results_md)
    for line in result["saturation"]:
        print(line)
    print(f"wrote {out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
