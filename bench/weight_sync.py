"""Weight-sync benchmark: learner publishes version v -> every one of N generators runs on v.

The learner side runs in this process exactly as ``services/learner`` does it:
:func:`streamrl.common.weights.pack_state_dict` of the policy's ``state_dict`` (in the wire
dtype) and :meth:`WeightServer.publish` (its background thread announces on PUB
and serves chunks on ROUTER). Each generator is a separate OS process that loads
the same model with :func:`streamrl.common.models.load_causal_lm`, waits on a
:class:`WeightClient` for the announcement, fetches, verifies (sha256) and unpacks
the blob, and ``load_state_dict``s it into the model, as ``services/generator``
does between batches. Phases of one sync (seconds, wall clock of one machine):

* ``pack``: learner packs the state dict (dtype cast, concatenation, sha256);
* ``announce``: from ``publish`` returning until the generator has the announcement
  (``announce_wakeup``: until the server thread sent it; the rest is the PUB/SUB hop);
* ``transfer``: chunked fetch (credit-based requests, ``weight_chunk_bytes`` chunks);
* ``verify``: sha256 of the blob and unpacking into tensor views;
* ``load``: ``model.load_state_dict`` (a copy, with a dtype cast for bfloat16);
* ``total``: from the start of ``pack`` until the *last* generator has loaded.

In the same run, with the same receiver processes, a raw ZeroMQ baseline sends the
same number of bytes in chunks of the same size from one PUSH socket per receiver
(no requests, no envelope, no copy into a blob) to each receiver's PULL; our
effective bandwidth is reported as a ratio of that raw figure. Every figure is
the median over ``--repeats`` measured syncs (after one warm-up sync).

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
from pathlib import Path

import transformers
import zmq

from bench.report import Deadline, command_line, environment, environment_line, markdown_table, median, write_results
from streamrl.common.config import TransportSection
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import WeightDtype
from streamrl.common.weights import WeightClient, WeightServer, pack_state_dict, tied_duplicates

MODELS = {"tiny": "tiny-char-llama", "smollm2": "smollm2-135m-instruct"}
PHASES = ("pack", "announce", "announce_wakeup", "transfer", "verify", "load", "total")
STARTUP_TIMEOUT_S = 180.0
SYNC_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------- generator process


def _receiver(index: int, control: str, announce: str, fetch: str, model_path: str, transport: dict) -> None:
    """One generator stand-in process: answers ``sync`` and ``raw`` commands from the bench's ROUTER."""
    from streamrl.common.models import configure_torch, load_causal_lm, select_device
    from streamrl.common.modes import Device

    configure_torch(1)
    transformers.utils.logging.disable_progress_bar()
    t = TransportSection(**transport)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.setsockopt(zmq.ROUTING_ID, f"g{index}".encode())
    ctl.connect(control)
    model = load_causal_lm(model_path, device=select_device(Device.CPU)).eval()
    tied = tied_duplicates(model.state_dict())
    client = WeightClient(ctx, announce_endpoint=announce, fetch_endpoint=fetch,
                          inbox_metrics=ServiceMetrics("bench", f"bench-generator-{index}"),
                          sender=f"bench-generator-{index}", credit=t.weight_credit, timeout_s=t.request_timeout_s,
                          max_message_bytes=t.max_message_bytes, hwm=t.hwm)
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
                loading = time.perf_counter()
                missing, unexpected = model.load_state_dict(fetched.tensors, strict=False)
                if unexpected or set(missing) - tied:
                    raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
                load_s = time.perf_counter() - loading
                ctl.send_json({"version": fetched.version, "announce_sent": latest.sent_at,
                               "announce_received": got_announce, "transfer": fetched.transfer_s,
                               "verify": fetched.verify_s, "load": load_s, "loaded_at": time.time(),
                               "nbytes": fetched.nbytes})
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
        self.server = WeightServer(self.ctx, announce_endpoint=announce, fetch_endpoint=fetch,
                                   metrics=ServiceMetrics("bench", "bench-learner"), sender="bench-learner",
                                   announce_interval_s=transport.announce_interval_s,
                                   max_message_bytes=transport.max_message_bytes, hwm=transport.hwm)
        spawn = mp.get_context("spawn")
        self.procs = [
            spawn.Process(target=_receiver, daemon=True,
                          args=(i, f"tcp://127.0.0.1:{control_port}", announce, fetch, model_path,
                                transport.model_dump(mode="json")))
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
        started = time.time()
        packed = pack_state_dict(state_dict, version=version, dtype=dtype, chunk_bytes=self.t.weight_chunk_bytes,
                                 sender="bench-learner")
        packed_at = time.time()
        self.server.publish(packed)
        published = time.time()
        reports = [self._recv(SYNC_TIMEOUT_S)[1] for _ in self.routes]
        first_request = min(r["announce_received"] for r in reports)
        transfer_end = max(r["announce_received"] + r["transfer"] for r in reports)
        n = len(reports)
        return {
            "nbytes": packed.announce.total_bytes,
            "pack": packed_at - started,
            "announce": sum(r["announce_received"] - published for r in reports) / n,
            "announce_wakeup": sum(r["announce_sent"] - published for r in reports) / n,
            "transfer": sum(r["transfer"] for r in reports) / n,
            "verify": sum(r["verify"] for r in reports) / n,
            "load": sum(r["load"] for r in reports) / n,
            "total": max(r["loaded_at"] for r in reports) - started,
            "transfer_window": transfer_end - first_request,
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
            self.control.send_multipart([route, json.dumps({"cmd": "raw", "endpoint": endpoint,
                                                            "nbytes": int(blob.size)}).encode()])
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


def run_case(model_key: str, model_path: str, generators: int, dtypes: list[WeightDtype], repeats: int,
             transport: TransportSection, deadline: Deadline) -> list[dict]:
    """All dtypes for one (model, N): one warm-up and ``repeats`` measured syncs each, then the raw baseline."""
    from streamrl.common.models import load_causal_lm, select_device
    from streamrl.common.modes import Device

    model = load_causal_lm(model_path, device=select_device(Device.CPU))
    state = model.state_dict()
    bench = Bench(model_path, generators, transport)
    rows = []
    version = 0
    try:
        for dtype in dtypes:
            if deadline.expired():
                break
            syncs = []
            for i in range(repeats + 1):
                if i > 1 and deadline.expired():
                    break
                version += 1
                result = bench.sync(state, version, dtype)
                if i > 0:  # the first sync warms up connections and allocators
                    syncs.append(result)
            packed = pack_state_dict(state, version=0, dtype=dtype, chunk_bytes=transport.weight_chunk_bytes,
                                     sender="bench-learner")
            raws = []
            for i in range(len(syncs) + 1):
                seconds = bench.raw(packed.blob, transport.weight_chunk_bytes)
                if i > 0:
                    raws.append(seconds)
            nbytes = packed.announce.total_bytes
            row = {"model": model_key, "dtype": dtype.value, "generators": generators, "nbytes": nbytes,
                   "repeats": len(syncs), "syncs": syncs, "raw_seconds": raws}
            for phase in (*PHASES, "transfer_window"):
                row[phase] = median(s[phase] for s in syncs)
            row["raw"] = median(raws)
            total_bytes = nbytes * generators
            row["ours_transfer_MBps"] = total_bytes / row["transfer_window"] / 1e6
            row["ours_end_to_end_MBps"] = total_bytes / row["total"] / 1e6
            row["raw_MBps"] = total_bytes / row["raw"] / 1e6
            row["transfer_ratio"] = row["ours_transfer_MBps"] / row["raw_MBps"]
            row["end_to_end_ratio"] = row["ours_end_to_end_MBps"] / row["raw_MBps"]
            print(f"{model_key} {dtype.value} N={generators}: {nbytes / 1e6:.1f} MB, total {row['total']:.3f}s "
                  f"(pack {row['pack']:.3f}, announce {row['announce']:.3f}, transfer {row['transfer']:.3f}, "
                  f"verify {row['verify']:.3f}, load {row['load']:.3f}); raw {row['raw']:.3f}s; "
                  f"transfer {row['transfer_ratio']:.2f} x raw, end to end {row['end_to_end_ratio']:.2f} x raw",
                  flush=True)
            rows.append(row)
    finally:
        bench.close()
    return rows


def render(rows: list[dict], env: dict, command: str, transport: TransportSection, skipped: list[str]) -> str:
    """The RESULTS.md section."""
    header = ["model", "wire dtype", "N", "MB", "pack s", "announce s", "(of which wake-up)", "transfer s", "verify s", "load s",
              "total s (last gen)", "ours MB/s (transfer)", "raw ZMQ MB/s", "transfer / raw", "end-to-end / raw"]
    table = markdown_table(header, [
        [r["model"], r["dtype"], r["generators"], r["nbytes"] / 1e6, r["pack"], r["announce"], r["announce_wakeup"], r["transfer"],
         r["verify"], r["load"], r["total"], r["ours_transfer_MBps"], r["raw_MBps"], r["transfer_ratio"],
         r["end_to_end_ratio"]]
        for r in rows
    ])
    notes = [
        "## 1. Weight sync (learner publishes v -> N generators running on v)",
        "",
        f"Command: `{command}`",
        "",
        environment_line(env),
        "",
        table,
        "",
        f"Medians over {max((r['repeats'] for r in rows), default=0)} measured syncs per row (one warm-up sync "
        f"first). Chunks of {transport.weight_chunk_bytes / 2**20:.0f} MiB, credit {transport.weight_credit}, "
        "tcp loopback. announce = `publish` returning -> the generator holding the announcement; its wake-up "
        "part = until the weight server's thread sent it (that thread notices a new version only when its "
        "100 ms ROUTER poll returns). announce/transfer/verify/load are means over the N generators; total runs from the start of "
        "pack to the last generator's `load_state_dict` returning. MB/s count N x blob bytes: ours over the "
        "window from the first generator receiving the announcement to the last generator's last chunk; raw "
        "ZeroMQ is one PUSH socket per receiver pushing the same chunks (no requests, envelope or copy) to "
        "the same receiver processes. end-to-end / raw = (N x bytes / total) / raw MB/s. Every generator is "
        "its own process with 1 torch thread; on 2 cores N = 4 receivers share the cores with the sender.",
    ]
    if skipped:
        notes += ["", "Skipped for the time bound: " + ", ".join(skipped) + "."]
    return "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.weight_sync", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--generators", default="1,2,4", help="comma-separated N values")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="wire dtypes (transport.weight_dtype)")
    parser.add_argument("--repeats", type=int, default=5, help="measured syncs per row (median reported)")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="time bound: no new case starts after it (a started case finishes its minimum)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    parser.add_argument("--results-md", type=Path, default=None, help="default bench/RESULTS.md")
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    transformers.utils.logging.disable_progress_bar()
    transport = TransportSection()
    dtypes = [WeightDtype(d) for d in args.dtypes.split(",")]
    from streamrl.common.models import resolve_model_path

    rows, skipped = [], []
    for key in args.models.split(","):
        path = resolve_model_path(MODELS[key])
        for n in (int(x) for x in args.generators.split(",")):
            if deadline.expired():
                skipped.append(f"{key} N={n}")
                continue
            rows += run_case(key, path, n, dtypes, args.repeats, transport, deadline)
    env = environment()
    command = command_line()
    results = {"command": command, "environment": env, "transport": transport.model_dump(mode="json"),
               "rows": rows, "skipped": skipped}
    out = write_results("weight_sync", results, render(rows, env, command, transport, skipped),
                        results_dir=args.results_dir, results_md=args.results_md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
