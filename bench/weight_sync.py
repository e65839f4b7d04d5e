"""Weight-sync benchmark: learner publishes version v -> every one of N generators runs on v.

The learner side runs in this process exactly as ``services/learner`` does it: a
:class:`~streamrl.common.weights.WeightServer` with the learner's settings, and
:meth:`WeightServer.publish_state_dict` of the policy's ``state_dict`` (the caller
is blocked only while the tensors are copied into a pooled blob; a packer thread
hashes the chunks, the server thread announces on PUB and serves chunks on
ROUTER). Each generator is a separate OS process that loads the same model with
:func:`streamrl.common.models.load_causal_lm`, waits on a :class:`WeightClient` for
the announcement, fetches (each chunk received into a reused buffer and hashed as
it lands), checks the digest root, and ``load_state_dict``s the tensors, as
``services/generator`` does between batches. Phases of one sync (seconds, wall
clock of one machine):

* ``snapshot``: the learner's loop is blocked (copy and cast into the pooled blob);
* ``digest``: the packer thread hashes the chunks (XXH3-128) and seals the version;
* ``announce``: from the version being sealed until the generator has the announcement
  (``announce_wakeup``: until the server thread sent it; the rest is the PUB/SUB hop);
* ``transfer``: chunked fetch (credit-based requests, ``weight_chunk_bytes`` chunks),
  per-chunk hashing included (``hash``: the part of it spent hashing);
* ``verify``: comparing the digest root and building the tensor views;
* ``load``: the HF engine's ``load_fetched`` (zero-copy adoption of the receive buffer where it can,
  else a copy with a dtype cast; a LoRA adapter, ``bench/lora.py``: the merge into the base);
* ``total``: from the start of ``publish_state_dict`` until the *last* generator has loaded.

In the same run, with the same receiver processes, a raw ZeroMQ baseline sends the
same number of bytes in chunks of the same size from one PUSH socket per receiver
(no requests, no envelope, no copy, no hashing) to each receiver's PULL; our
effective bandwidth is reported as a ratio of that raw figure. Each measured sync
is followed by one raw push (interleaved, so both see the same background load);
every figure is the median over ``--repeats`` (after one warm-up of each).

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.weight_sync --max-seconds 900
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import time
from collections.abc import Iterator

import transformers
import zmq

from bench.report import (
    Deadline,
    command_line,
    environment,
    environment_line,
    markdown_table,
    median,
    output_arguments,
    write_results,
)
from streamrl.common.config import TransportSection
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import WeightDtype
from streamrl.common.weights import WeightClient, WeightServer, pack_state_dict

MODELS = {"tiny": "tiny-char-llama", "smollm2": "smollm2-135m-instruct"}
PHASES = ("snapshot", "digest", "announce", "announce_wakeup", "transfer", "hash", "verify", "load", "total")
WARMUP_SYNCS = 3
"""Unmeasured syncs per row: connections, and the learner's pool of keep_versions + 1 = 3 blobs, fill up."""
STARTUP_TIMEOUT_S = 180.0
SYNC_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------- generator process


def _receiver(index: int, control: str, announce: str, fetch: str, model_path: str, transport: dict) -> None:
    """One generator stand-in process: answers ``sync`` and ``raw`` commands from the bench's ROUTER."""
    from streamrl.common.models import configure_torch, load_causal_lm, load_tokenizer, select_device
    from streamrl.common.modes import Device
    from streamrl.services.generator.engine import HFEngine

    configure_torch(1)
    transformers.utils.logging.disable_progress_bar()
    t = TransportSection(**transport)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.setsockopt(zmq.ROUTING_ID, f"g{index}".encode())
    ctl.connect(control)
    model = load_causal_lm(model_path, device=select_device(Device.CPU)).eval()
    engine = HFEngine(model, load_tokenizer(model_path), path=model_path)  # the generator's engine
    client = WeightClient(
        ctx,
        announce_endpoint=announce,
        fetch_endpoint=fetch,
        inbox_metrics=ServiceMetrics("bench", f"bench-generator-{index}"),
        sender=f"bench-generator-{index}",
        credit=t.weight_credit,
        timeout_s=t.request_timeout_s,
        max_message_bytes=t.max_message_bytes,
        hwm=t.hwm,
    )
    ctl.send_json({"ready": index})
    try:
        while True:
            cmd = ctl.recv_json()
            if cmd["cmd"] == "stop":
                return
            if cmd["cmd"] == "sync":
                ctl.send_json({"armed": index})
                deadline = time.monotonic() + SYNC_TIMEOUT_S
                latest = None
                while latest is None or latest.version < cmd["version"]:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"version {cmd['version']} never announced")
                    latest = client.poll_announcements(timeout_s=0.5)
                got_announce = time.time()
                fetched = client.fetch(latest)
                received = time.time()
                loading = time.perf_counter()
                engine.load_fetched(client, fetched)  # as the generator loads them (a LoRA adapter: merged)
                load_s = time.perf_counter() - loading
                ctl.send_json(
                    {
                        "version": fetched.version,
                        "announce_sent": latest.sent_at,
                        "announce_received": got_announce,
                        "transfer": fetched.transfer_s,
                        "transfer_end": received - fetched.verify_s,
                        "hash": fetched.hash_s,
                        "verify": fetched.verify_s,
                        "load": load_s,
                        "loaded_at": time.time(),
                        "nbytes": fetched.nbytes,
                        "buffers_allocated": client.buffers_allocated,
                    }
                )
            elif cmd["cmd"] == "raw":
                pull = ctx.socket(zmq.PULL)
                pull.setsockopt(zmq.LINGER, 0)
                pull.setsockopt(zmq.RCVHWM, t.hwm)
                pull.setsockopt(zmq.MAXMSGSIZE, t.max_message_bytes)
                pull.connect(cmd["endpoint"])
                ctl.send_json({"armed": index})
                received = 0
                while received < cmd["nbytes"]:
                    received += len(pull.recv(copy=False).buffer)
                ctl.send_json({"done_at": time.time(), "nbytes": received})
                pull.close(0)
    finally:
        client.close()
        ctl.close(0)
        ctx.term()


# ---------------------------------------------------------------------- learner side


class Bench:
    """The learner side of one (model, N generators) case: weight server, receivers, control ROUTER."""

    def __init__(self, model_path: str, generators: int, transport: TransportSection):
        self.t = transport
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        control_port = self.control.bind_to_random_port("tcp://127.0.0.1")
        ports = [self._free_port() for _ in range(2)]
        announce, fetch = (f"tcp://127.0.0.1:{p}" for p in ports)
        self.server = WeightServer(
            self.ctx,
            announce_endpoint=announce,
            fetch_endpoint=fetch,
            metrics=ServiceMetrics("bench", "bench-learner"),
            sender="bench-learner",
            announce_interval_s=transport.announce_interval_s,
            max_message_bytes=transport.max_message_bytes,
            hwm=transport.hwm,
            dtype=transport.weight_dtype,
            chunk_bytes=transport.weight_chunk_bytes,
            peer_max_bytes=2 * transport.weight_credit * transport.weight_chunk_bytes,
        )
        spawn = mp.get_context("spawn")
        self.procs = [
            spawn.Process(
                target=_receiver,
                daemon=True,
                args=(
                    i,
                    f"tcp://127.0.0.1:{control_port}",
                    announce,
                    fetch,
                    model_path,
                    transport.model_dump(mode="json"),
                ),
            )
            for i in range(generators)
        ]
        for p in self.procs:
            p.start()
        self.routes = [self._recv(STARTUP_TIMEOUT_S)[0] for _ in self.procs]

    @staticmethod
    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def _recv(self, timeout_s: float) -> tuple[bytes, dict]:
        if not self.control.poll(int(timeout_s * 1000)):
            dead = [p.exitcode for p in self.procs if not p.is_alive()]
            raise TimeoutError(f"no answer from the generator processes in {timeout_s:.0f}s (exit codes {dead})")
        route, body = self.control.recv_multipart()
        return route, json.loads(body)

    def _broadcast(self, cmd: dict) -> None:
        for route in self.routes:
            self.control.send_multipart([route, json.dumps(cmd).encode()])
        for _ in self.routes:
            self._recv(SYNC_TIMEOUT_S)  # "armed"

    def sync(self, state_dict, version: int, dtype: WeightDtype) -> dict:
        """Publish ``version`` and wait until every generator has loaded it; returns the phases (seconds)."""
        self._broadcast({"cmd": "sync", "version": version})
        self.server.dtype = dtype
        started = time.time()
        self.server.publish_state_dict(state_dict, version)
        reports = [self._recv(SYNC_TIMEOUT_S)[1] for _ in self.routes]
        timing = self.server.timings[version]
        first_request = min(r["announce_received"] for r in reports)
        transfer_end = max(r["transfer_end"] for r in reports)
        n = len(reports)
        return {
            "nbytes": reports[0]["nbytes"],
            "snapshot": timing.snapshot_s,
            "digest": timing.digest_s,
            "announce": sum(r["announce_received"] - timing.sealed_at for r in reports) / n,
            "announce_wakeup": (timing.announced_at or timing.sealed_at) - timing.sealed_at,
            "transfer": sum(r["transfer"] for r in reports) / n,
            "hash": sum(r["hash"] for r in reports) / n,
            "verify": sum(r["verify"] for r in reports) / n,
            "load": sum(r["load"] for r in reports) / n,
            "total": max(r["loaded_at"] for r in reports) - started,
            "transfer_window": transfer_end - first_request,
            "receive_buffers": max(r["buffers_allocated"] for r in reports),
        }

    def raw(self, blob, chunk_bytes: int) -> float:
        """Raw ZeroMQ: push ``blob`` in ``chunk_bytes`` frames to every receiver; seconds until the last has all."""
        socks, endpoints = [], []
        for _ in self.routes:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, self.t.hwm)
            port = s.bind_to_random_port("tcp://127.0.0.1")
            socks.append(s)
            endpoints.append(f"tcp://127.0.0.1:{port}")
        for route, endpoint in zip(self.routes, endpoints):
            self.control.send_multipart(
                [route, json.dumps({"cmd": "raw", "endpoint": endpoint, "nbytes": int(blob.size)}).encode()]
            )
        for _ in self.routes:
            self._recv(SYNC_TIMEOUT_S)
        view = memoryview(blob)
        started = time.time()
        for offset in range(0, blob.size, chunk_bytes):
            chunk = view[offset : offset + chunk_bytes]
            for s in socks:
                s.send(chunk, copy=False)
        done = max(self._recv(SYNC_TIMEOUT_S)[1]["done_at"] for _ in self.routes)
        for s in socks:
            s.close(0)
        return done - started

    def close(self) -> None:
        for route in self.routes:
            self.control.send_multipart([route, json.dumps({"cmd": "stop"}).encode()])
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        self.server.close()
        self.control.close(0)
        self.ctx.term()


def run_case(
    model_key: str,
    model_path: str,
    generators: int,
    dtypes: list[WeightDtype],
    repeats: int,
    transport: TransportSection,
    deadline: Deadline,
) -> list[dict]:
    """All dtypes for one (model, N): ``WARMUP_SYNCS`` + ``repeats`` syncs each, each followed by a raw push."""
    from streamrl.common.config import LearnerSection
    from streamrl.common.models import configure_torch, load_causal_lm, select_device
    from streamrl.common.modes import Device

    configure_torch(LearnerSection().threads)  # the learner's thread budget (1 by default), as in the service
    model = load_causal_lm(model_path, device=select_device(Device.CPU))
    state = model.state_dict()
    bench = Bench(model_path, generators, transport)
    rows = []
    version = 0
    try:
        for dtype in dtypes:
            if deadline.expired():
                break
            packed = pack_state_dict(
                state, version=0, dtype=dtype, chunk_bytes=transport.weight_chunk_bytes, sender="bench-learner"
            )
            syncs, raws = [], []
            for i in range(WARMUP_SYNCS + repeats):
                if i > WARMUP_SYNCS and deadline.expired():
                    break
                version += 1
                if i == WARMUP_SYNCS:
                    blobs_before = bench.server._pool.allocated
                result = bench.sync(state, version, dtype)
                seconds = bench.raw(packed.blob, transport.weight_chunk_bytes)  # interleaved: the same load
                if i >= WARMUP_SYNCS:
                    syncs.append(result)
                    raws.append(seconds)
            nbytes = packed.announce.total_bytes
            del packed
            row = {
                "model": model_key,
                "dtype": dtype.value,
                "generators": generators,
                "nbytes": nbytes,
                "repeats": len(syncs),
                "syncs": syncs,
                "raw_seconds": raws,
            }
            for phase in (*PHASES, "transfer_window"):
                row[phase] = median(s[phase] for s in syncs)
            # allocations during the measured syncs (the warm-up filled the pools): 0 when buffers are reused
            row["receive_buffers_allocated"] = max(s["receive_buffers"] for s in syncs) - min(
                s["receive_buffers"] for s in syncs
            )
            row["learner_blobs_allocated"] = bench.server._pool.allocated - blobs_before
            row["raw"] = median(raws)
            total_bytes = nbytes * generators
            row["ours_transfer_MBps"] = total_bytes / row["transfer_window"] / 1e6
            row["ours_end_to_end_MBps"] = total_bytes / row["total"] / 1e6
            row["raw_MBps"] = total_bytes / row["raw"] / 1e6
            row["transfer_ratio"] = row["ours_transfer_MBps"] / row["raw_MBps"]
            row["end_to_end_ratio"] = row["ours_end_to_end_MBps"] / row["raw_MBps"]
            print(
                f"{model_key} {dtype.value} N={generators}: {nbytes / 1e6:.1f} MB, total {row['total']:.3f}s "
                f"(snapshot {row['snapshot']:.3f}, digest {row['digest']:.3f}, announce {row['announce']:.3f}, "
                f"transfer {row['transfer']:.3f} (hash {row['hash']:.3f}), verify {row['verify']:.3f}, "
                f"load {row['load']:.3f}); raw {row['raw']:.3f}s; "
                f"transfer {row['transfer_ratio']:.2f} x raw, end to end {row['end_to_end_ratio']:.2f} x raw",
                flush=True,
            )
            rows.append(row)
    finally:
        bench.close()
    return rows


def render(rows: list[dict], env: dict, command: str, transport: TransportSection, skipped: list[str]) -> str:
    """The RESULTS.md section."""
    header = [
        "model",
        "wire dtype",
        "N",
        "MB",
        "learner blocked s (snapshot)",
        "digest s",
        "announce s",
        "(of which wake-up)",
        "transfer s",
        "(of which hashing)",
        "verify s",
        "load s",
        "total s (last gen)",
        "ours MB/s (transfer)",
        "raw ZMQ MB/s",
        "transfer / raw",
        "end-to-end / raw",
    ]
    table = markdown_table(
        header,
        [
            [
                r["model"],
                r["dtype"],
                r["generators"],
                r["nbytes"] / 1e6,
                r["snapshot"],
                r["digest"],
                r["announce"],
                r["announce_wakeup"],
                r["transfer"],
                r["hash"],
                r["verify"],
                r["load"],
                r["total"],
                r["ours_transfer_MBps"],
                r["raw_MBps"],
                r["transfer_ratio"],
                r["end_to_end_ratio"],
            ]
            for r in rows
        ],
    )
    notes = [
        "## 1. Weight sync (learner publishes v -> N generators running on v)",
        "",
        f"Command: `{command}`",
        "",
        environment_line(env),
        "",
        table,
        "",
        f"Medians over {max((r['repeats'] for r in rows), default=0)} measured syncs per row ({WARMUP_SYNCS} "
        "warm-up syncs first: connections, and the learner's pool of 3 blobs), each followed by one raw push of "
        "the same bytes (interleaved, so both see the same background "
        f"load). Chunks of {transport.weight_chunk_bytes / 2**20:.0f} MiB, credit {transport.weight_credit}, "
        "tcp loopback. learner blocked = `publish_state_dict` on the learner's thread (copy and cast into a "
        "pooled blob); digest = the packer thread hashing the chunks (XXH3-128) and sealing the version while "
        "the learner already trains; announce = sealed -> the generator holding the announcement, its wake-up "
        "part = sealed -> sent by the server thread (woken by an inproc socket); transfer = the generator's "
        "chunked fetch, each chunk received into a reused buffer and hashed as it lands (hashing = the part of "
        "it spent hashing); verify = comparing the digest root and building tensor views. "
        "announce/transfer/verify/load are means over the N generators; total runs from the start of "
        "`publish_state_dict` to the last generator's `load_state_dict` returning. MB/s count N x blob bytes: "
        "ours over the window from the first generator receiving the announcement to the last generator's "
        "last chunk; raw ZeroMQ is one PUSH socket per receiver pushing the same chunks (no requests, "
        "envelope, copy or hashing) to the same receiver processes. end-to-end / raw = (N x bytes / total) / "
        "raw MB/s. Buffers allocated during the measured syncs (all rows): "
        f"{sum(r['receive_buffers_allocated'] for r in rows)} receive buffers on the generators, "
        f"{sum(r['learner_blobs_allocated'] for r in rows)} blobs on the learner (both reused across versions). "
        "Every generator is its own process with 1 torch thread; on 2 cores N = 4 receivers share the cores "
        "with the sender.",
    ]
    if skipped:
        notes += ["", "Skipped for the time bound: " + ", ".join(skipped) + "."]
    return "\n".join(notes)


def cases(models: str, generators: str, deadline: Deadline, skipped: list[str]) -> Iterator[tuple[str, str, int]]:
    """``(model key, model folder, N)`` for every model of ``models`` (comma-separated :data:`MODELS` keys) and
    every N of ``generators`` (comma-separated); a case reached after ``deadline`` is appended to ``skipped``."""
    from streamrl.common.models import resolve_model_path

    for key in models.split(","):
        path = resolve_model_path(MODELS[key])
        for n in (int(x) for x in generators.split(",")):
            if deadline.expired():
                skipped.append(f"{key} N={n}")
                continue
            yield key, path, n


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.weight_sync", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--generators", default="1,2,4", help="comma-separated N values")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="wire dtypes (transport.weight_dtype)")
    parser.add_argument("--repeats", type=int, default=5, help="measured syncs per row (median reported)")
    output_arguments(
        parser, max_seconds=900.0, bound="no new case starts after it (a started case finishes its minimum)"
    )
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    transformers.utils.logging.disable_progress_bar()
    transport = TransportSection()
    dtypes = [WeightDtype(d) for d in args.dtypes.split(",")]
    rows, skipped = [], []
    for key, path, n in cases(args.models, args.generators, deadline, skipped):
        rows += run_case(key, path, n, dtypes, args.repeats, transport, deadline)
    env = environment()
    command = command_line()
    results = {
        "command": command,
        "environment": env,
        "transport": transport.model_dump(mode="json"),
        "rows": rows,
        "skipped": skipped,
    }
    out = write_results(
        "weight_sync",
        results,
        render(rows, env, command, transport, skipped),
        results_dir=args.results_dir,
        results_md=args.results_md,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
