"""Transport benchmark: rollouts/s through generator -> scorer -> buffer -> learner with
generation and training replaced by trivial stand-ins; per-message overhead; buffer rates.

1. Pipeline: the real scorer and buffer services (``python -m streamrl.services.scorer`` /
   ``streamrl.services.buffer``, started like the test suite does, with the trivial reward
   ``streamrl.services.scorer.rewards:count_char``) between a stand-in generator process
   (builds :class:`~streamrl.common.messages.Rollout` messages of real size, 64 prompt and 32
   completion int32 tokens, 32 float32 behaviour log-probs, prompt and completion
   texts, and pushes them with the generator's ``send_when_ready``) and a stand-in
   learner process (the learner's DEALER ``batch_request`` / ``batch`` exchange,
   decoding every batch through an :class:`~streamrl.common.transport.Inbox`, no training).
   The rate is rollouts received by the learner per second after a warm-up.
2. Per-message overhead: one process, PUSH -> PULL on tcp loopback, ``send``
   (encode + send) then ``recv_multipart`` + ``decode`` (validation included), for
   a rollout, a scored rollout and a batch of 16; encode and decode alone too.
3. :class:`streamrl.services.buffer.store.ReplayBuffer` in-process: ``add`` rate (rollouts/s)
   and ``sample`` rate (batches of 4 groups x 4 per second).

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.transport --max-seconds 240
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from bench.report import Deadline, command_line, environment, environment_line, markdown_table, median, write_results
from streamrl.common.config import load_config
from streamrl.common.messages import (
    Batch,
    BatchRequest,
    FinishReason,
    Rollout,
    SamplingParams,
    ScoredRollout,
    decode,
    encode,
)
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import OverflowPolicy
from streamrl.common.transport import Inbox, make_socket, send, send_when_ready
from streamrl.services.buffer.store import ReplayBuffer

PROMPT_TOKENS = 64
COMPLETION_TOKENS = 32
GROUP_SIZE = 4
GROUPS_PER_STEP = 4
PROMPT_TEXT = (
    "I went into this film expecting a quiet character study, and what I got instead was a "
    "sprawling, noisy, occasionally brilliant mess that I have not stopped thinking about since. "
    "The first thing you notice about this movie is"
)
COMPLETION_TEXT = (
    " how much care went into every frame. The performances are uniformly strong, the score "
    "never overstays its welcome, and the ending"
)


def make_rollout(
    i: int, *, generator_id: str = "bench-generator", version: int = 0, rng: np.random.Generator | None = None
) -> Rollout:
    """A rollout of real size: ``[64]`` int32 prompt, ``[32]`` int32 completion and float32 log-probs.

    Rollout ``i`` belongs to group ``i // 4`` (group size 4).
    """
    rng = rng or np.random.default_rng(i)
    group = f"{generator_id}:{i // GROUP_SIZE}"
    return Rollout(
        sender=generator_id,
        prompt_id=f"p{i // GROUP_SIZE}",
        group_id=group,
        rollout_id=f"{group}:{i % GROUP_SIZE}",
        generator_id=generator_id,
        group_size=GROUP_SIZE,
        prompt_tokens=rng.integers(0, 49152, PROMPT_TOKENS, dtype=np.int32),
        completion_tokens=rng.integers(0, 49152, COMPLETION_TOKENS, dtype=np.int32),
        behaviour_logprobs=-rng.exponential(2.0, COMPLETION_TOKENS).astype(np.float32),
        policy_version=version,
        finish_reason=FinishReason.LENGTH,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=COMPLETION_TOKENS),
        prompt_text=PROMPT_TEXT,
        completion_text=COMPLETION_TEXT,
        metadata={"id": f"p{i // GROUP_SIZE}"},
    )


def make_scored(i: int, **kwargs) -> ScoredRollout:
    """:func:`make_rollout` with a reward, as the scorer sends it."""
    return ScoredRollout(
        sender="bench-scorer",
        rollout=make_rollout(i, **kwargs),
        reward=0.25,
        reward_parts={"count_char": 0.25},
        scorer_id="bench-scorer",
    )


# ---------------------------------------------------------------------- stand-in processes


def _stand_in_generator(config_path: str, seconds: float, out: str) -> None:
    """Push rollouts to the scorers for ``seconds`` (new Rollout objects, as a generator builds them)."""
    cfg = load_config(config_path)
    t = cfg.transport
    ctx = zmq.Context()
    push = make_socket(ctx, zmq.PUSH, connect=cfg.endpoints.scorers, max_message_bytes=t.max_message_bytes, hwm=t.hwm)
    metrics = ServiceMetrics("bench", "bench-generator")
    blocked = metrics.counter("send_blocked_seconds_total", "Seconds blocked sending")
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    rng = np.random.default_rng(0)
    sent = 0
    while not stop.is_set():
        rollout = make_rollout(sent, rng=rng)
        if not send_when_ready(push, rollout, stop=stop, blocked_seconds=blocked, warn_after_s=60, peer="scorers"):
            break
        sent += 1
    timer.cancel()
    blocked_s = metrics.registry.get_sample_value("streamrl_bench_send_blocked_seconds_total")
    Path(out).write_text(json.dumps({"sent": sent, "blocked_s": blocked_s}))
    push.close(0)
    ctx.term()


def _stand_in_learner(config_path: str, seconds: float, warmup_s: float, out: str) -> None:
    """Request batches of 4 groups for ``seconds``, one version per batch as the learner does (the
    buffer serves a batch again when asked for the same version); record rollouts after ``warmup_s``
    and any rollout id received twice."""
    cfg = load_config(config_path)
    t = cfg.transport
    ctx = zmq.Context()
    dealer = make_socket(
        ctx, zmq.DEALER, connect=[cfg.endpoints.batches], max_message_bytes=t.max_message_bytes, hwm=t.hwm
    )
    inbox = Inbox(
        ServiceMetrics("bench", "bench-learner"), [Batch], max_bytes=t.max_message_bytes, socket_name="batches"
    )
    start = time.monotonic()
    end = start + seconds
    measured, first, last, batches, wait_s, version = 0, None, None, 0, 0.0, 0
    seen: set[str] = set()
    duplicates = 0
    while time.monotonic() < end:
        asked = time.perf_counter()
        send(dealer, BatchRequest(sender="bench-learner", learner_version=version, num_groups=GROUPS_PER_STEP))
        msg = None
        while msg is None and time.monotonic() < end:
            if dealer.poll(200):
                msg = inbox.decode(dealer.recv_multipart(copy=False))
        if msg is None:
            break
        version += 1  # "trained": the next request acknowledges this batch
        ids = {s.rollout.rollout_id for s in msg.rollouts}
        duplicates += len(msg.rollouts) - len(ids - seen)
        seen |= ids
        now = time.monotonic()
        if now - start >= warmup_s:
            if first is None:
                first = now  # rollouts of this first batch are not counted: the window starts here
            else:
                measured += len(msg.rollouts)
                batches += 1
                wait_s += time.perf_counter() - asked
            last = now
    window = (last - first) if first is not None and last is not None else 0.0
    Path(out).write_text(
        json.dumps(
            {
                "rollouts": measured,
                "batches": batches,
                "window_s": window,
                "wait_s": wait_s,
                "rejected": inbox.rejected_counts,
                "duplicates": duplicates,
                "versions": version,
            }
        )
    )
    dealer.close(0)
    ctx.term()


def pipeline(seconds: float, warmup_s: float, workdir: Path) -> dict:
    """Run the real scorer and buffer between the stand-ins; returns the learner's rollouts/s."""
    from bench.stand_ins import join_stand_ins, stand_in_sections, start_scorer_and_buffer

    # The stand-in generator never loads weights (its rollouts stay version 0) while the stand-in
    # learner moves one version per batch, so the staleness bound is lifted.
    sections = stand_in_sections(
        workdir,
        run={"max_staleness": 1_000_000},
        buffer={"capacity_groups": 16},
        learner={"groups_per_step": GROUPS_PER_STEP},
        generator={"group_size": GROUP_SIZE},
    )
    sections["transport"] = {}
    config, services = start_scorer_and_buffer(workdir, sections, "transport")
    try:
        time.sleep(0.5)
        spawn = mp.get_context("spawn")
        gen_out, learner_out = workdir / "generator.json", workdir / "learner.json"
        procs = [
            spawn.Process(target=_stand_in_generator, args=(str(config), seconds + 2, str(gen_out))),
            spawn.Process(target=_stand_in_learner, args=(str(config), seconds, warmup_s, str(learner_out))),
        ]
        for p in procs:
            p.start()
        join_stand_ins(procs, seconds + 60, services)
        learner = json.loads(learner_out.read_text())
        generator = json.loads(gen_out.read_text())
    finally:
        services.close()
    window = learner["window_s"]
    return {
        "rollouts": learner["rollouts"],
        "batches": learner["batches"],
        "window_s": window,
        "rollouts_per_s": learner["rollouts"] / window if window > 0 else float("nan"),
        "learner_wait_s_per_batch": learner["wait_s"] / max(learner["batches"], 1),
        "generator_sent": generator["sent"],
        "generator_blocked_s": generator["blocked_s"],
        "rejected": learner["rejected"],
        "duplicates": learner["duplicates"],
    }


# ---------------------------------------------------------------------- in-process figures


def message_overhead(message, iterations: int) -> dict:
    """Microseconds per message: encode, decode, and encode+send+recv+decode over tcp loopback."""
    cls = type(message)
    ctx = zmq.Context()
    pull = make_socket(ctx, zmq.PULL, bind="tcp://127.0.0.1:*", max_message_bytes=2**28, hwm=1000)
    push = make_socket(
        ctx, zmq.PUSH, connect=[pull.getsockopt(zmq.LAST_ENDPOINT).decode()], max_message_bytes=2**28, hwm=1000
    )
    frames = [bytes(f) for f in encode(message)]
    size = sum(len(f) for f in frames)
    out = {"kind": cls.KIND, "bytes": size, "frames": len(frames)}
    start = time.perf_counter()
    for _ in range(iterations):
        encode(message)
    out["encode_us"] = (time.perf_counter() - start) / iterations * 1e6
    start = time.perf_counter()
    for _ in range(iterations):
        decode(frames, expected=[cls])
    out["decode_us"] = (time.perf_counter() - start) / iterations * 1e6
    for _ in range(20):  # connect and warm up
        send(push, message)
        decode(pull.recv_multipart(copy=False), expected=[cls])
    start = time.perf_counter()
    for _ in range(iterations):
        send(push, message)
        decode(pull.recv_multipart(copy=False), expected=[cls])
    out["round_trip_us"] = (time.perf_counter() - start) / iterations * 1e6
    push.close(0)
    pull.close(0)
    ctx.term()
    return out


def buffer_rates(n_rollouts: int) -> dict:
    """ReplayBuffer ``add`` rate (rollouts/s) and ``sample`` rate (batches of 4 groups / s)."""
    items = [make_scored(i) for i in range(n_rollouts)]
    groups = n_rollouts // GROUP_SIZE
    store = ReplayBuffer(
        capacity_groups=groups, overflow=OverflowPolicy.BLOCK, max_reuse=1, max_staleness=2, group_timeout_s=600.0
    )
    start = time.perf_counter()
    for item in items:
        store.add(item)
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    batches = 0
    while store.sample(GROUPS_PER_STEP, 0) is not None:
        batches += 1
    sample_s = time.perf_counter() - start
    return {
        "rollouts": n_rollouts,
        "add_per_s": n_rollouts / add_s,
        "add_us": add_s / n_rollouts * 1e6,
        "sample_batches": batches,
        "sample_per_s": batches / sample_s,
        "sample_us": sample_s / max(batches, 1) * 1e6,
    }


def render(result: dict, env: dict, command: str) -> str:
    """The RESULTS.md section."""
    p = result["pipeline"]
    pipe = markdown_table(
        [
            "runs",
            "rollouts/s (median)",
            "per run",
            "learner wait per batch of 16 (s)",
            "generator blocked s",
            "rollouts received twice",
        ],
        [
            [
                len(result["pipeline_runs"]),
                p["rollouts_per_s"],
                ", ".join(f"{r['rollouts_per_s']:.0f}" for r in result["pipeline_runs"]),
                p["learner_wait_s_per_batch"],
                p["generator_blocked_s"],
                sum(r["duplicates"] for r in result["pipeline_runs"]),
            ]
        ],
    )
    msgs = markdown_table(
        ["message", "bytes", "frames", "encode us", "decode us", "encode+send+recv+decode us"],
        [
            [m["kind"], m["bytes"], m["frames"], m["encode_us"], m["decode_us"], m["round_trip_us"]]
            for m in result["messages"]
        ],
    )
    b = result["buffer"]
    buf = markdown_table(
        ["operation", "rate", "per call"],
        [
            ["ReplayBuffer.add", f"{b['add_per_s']:.0f} rollouts/s", f"{b['add_us']:.1f} us"],
            ["ReplayBuffer.sample(4 groups x 4)", f"{b['sample_per_s']:.0f} batches/s", f"{b['sample_us']:.1f} us"],
        ],
    )
    return "\n".join(
        [
            "## 2. Transport overhead (generation and training replaced by stand-ins)",
            "",
            f"Command: `{command}`",
            "",
            environment_line(env),
            "",
            f"Pipeline: stand-in generator -> real scorer (reward `count_char`) -> real buffer -> stand-in learner, "
            f"rollouts of real size ({PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} completion int32 tokens, "
            f"{COMPLETION_TOKENS} float32 log-probs, {len(PROMPT_TEXT)}+{len(COMPLETION_TEXT)} characters of text), "
            f"batches of {GROUPS_PER_STEP} groups x {GROUP_SIZE}; {result['seconds']:.0f} s per run after "
            f"{result['warmup_s']:.0f} s warm-up, median over runs. Four processes on 2 cores. The buffer runs "
            "with its default config (journal on, `fsync = always`); the stand-in learner asks for version v+1 "
            "after each batch (acknowledging it, as the learner does) and the staleness bound is lifted because the "
            "stand-in generator never loads weights. Generator blocked s = seconds the generator waited on "
            "backpressure "
            "over its whole run (the pipeline, not the producer, is the limit).",
            "",
            pipe,
            "",
            f"Per message, one process, PUSH -> PULL on tcp loopback, median of {result['repeats']} runs of "
            f"{result['iterations']} messages (decode includes validation):",
            "",
            msgs,
            "",
            f"Replay buffer in-process ({b['rollouts']} rollouts, median of {result['repeats']} runs):",
            "",
            buf,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per pipeline run")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per pipeline run")
    parser.add_argument("--runs", type=int, default=3, help="pipeline runs (median reported)")
    parser.add_argument("--iterations", type=int, default=2000, help="messages per overhead measurement")
    parser.add_argument("--buffer-rollouts", type=int, default=8192, help="rollouts for the buffer rates")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the in-process figures")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="time bound: no pipeline run starts after it (at least one always runs)",
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)

    samples = [
        make_rollout(0),
        make_scored(0),
        Batch(
            sender="bench-buffer",
            learner_version=0,
            rollouts=[make_scored(i) for i in range(GROUP_SIZE * GROUPS_PER_STEP)],
        ),
    ]
    messages = []
    for message in samples:
        runs = [message_overhead(message, args.iterations) for _ in range(args.repeats)]
        row = dict(runs[0])
        for key in ("encode_us", "decode_us", "round_trip_us"):
            row[key] = median(r[key] for r in runs)
        messages.append(row)
        print(
            f"{row['kind']}: {row['bytes']} B, encode {row['encode_us']:.1f} us, decode {row['decode_us']:.1f} us, "
            f"round trip {row['round_trip_us']:.1f} us",
            flush=True,
        )
    buffers = [buffer_rates(args.buffer_rollouts) for _ in range(args.repeats)]
    buffer = dict(buffers[0])
    for key in ("add_per_s", "add_us", "sample_per_s", "sample_us"):
        buffer[key] = median(b[key] for b in buffers)
    print(f"buffer: add {buffer['add_per_s']:.0f}/s, sample {buffer['sample_per_s']:.0f} batches/s", flush=True)

    pipeline_runs = []
    for i in range(args.runs):
        if i > 0 and deadline.left() < args.seconds + args.warmup + 15:
            break
        with tempfile.TemporaryDirectory(prefix="streamrl-bench-") as tmp:
            run = pipeline(args.seconds + args.warmup, args.warmup, Path(tmp))
        pipeline_runs.append(run)
        print(
            f"pipeline run {i + 1}: {run['rollouts_per_s']:.0f} rollouts/s "
            f"({run['rollouts']} in {run['window_s']:.1f}s)",
            flush=True,
        )
    summary = {
        key: median(r[key] for r in pipeline_runs)
        for key in ("rollouts_per_s", "learner_wait_s_per_batch", "generator_blocked_s")
    }
    env = environment()
    command = command_line()
    result = {
        "command": command,
        "environment": env,
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "pipeline": summary,
        "pipeline_runs": pipeline_runs,
        "messages": messages,
        "buffer": buffer,
    }
    out = write_results(
        "transport", result, render(result, env, command), results_dir=args.results_dir, results_md=args.results_md
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
