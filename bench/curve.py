"""Cost of CURVE encryption on the weight push: the same fetch with and without ``security.keys_dir``.

The learner side (:class:`streamrl.common.weights.WeightServer`) runs in this process; the
generator side (:class:`streamrl.common.weights.WeightClient`) in a spawned process, as in
a real run, on tcp loopback. Each size is a random float32 state dict; every
measured sync publishes a new version and times the client's fetch (transfer:
request to last chunk; verify: sha256 + unpack).

``python -m bench.curve [--sizes-mb 64 538] [--repeats 3]`` writes
``bench/results/curve.json`` and the ``curve`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile

import torch
import zmq

from bench.report import command_line, environment, environment_line, markdown_table, median, write_results
from streamrl.common.config import TransportSection
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.security import Security, generate_keys
from streamrl.common.weights import WeightClient, WeightServer, pack_state_dict


def _receiver(keys_dir: str | None, announce: str, fetch: str, repeats: int, transport: dict, conn) -> None:
    t = TransportSection(**transport)
    ctx = zmq.Context()
    metrics = ServiceMetrics("generator", "generator-0")
    security = Security(ctx, keys_dir, "generator", metrics) if keys_dir else None
    client = WeightClient(
        ctx,
        announce_endpoint=announce,
        fetch_endpoint=fetch,
        inbox_metrics=metrics,
        sender="generator-0",
        credit=t.weight_credit,
        timeout_s=30.0,
        max_message_bytes=t.max_message_bytes,
        hwm=t.hwm,
        security=security,
    )
    seen = -1
    try:
        while seen < repeats:
            latest = client.poll_announcements(timeout_s=1.0)
            if latest is None or latest.version <= seen:
                continue
            fetched = client.fetch(latest)
            seen = fetched.version
            conn.send((fetched.version, fetched.nbytes, fetched.transfer_s, fetched.verify_s))
    finally:
        client.close()
        if security is not None:
            security.close()
        ctx.term()


def measure(size_mb: int, keys_dir: str | None, repeats: int, t: TransportSection) -> list[tuple]:
    """``repeats + 1`` syncs of a ``size_mb`` MB state dict (the first is a warm-up, not returned)."""
    ports = []
    for _ in range(2):
        with zmq.Context.instance().socket(zmq.REP) as s:
            ports.append(s.bind_to_random_port("tcp://127.0.0.1"))
    announce, fetch = (f"tcp://127.0.0.1:{p}" for p in ports)
    ctx = zmq.Context()
    metrics = ServiceMetrics("learner", "learner-0")
    security = Security(ctx, keys_dir, "learner", metrics) if keys_dir else None
    server = WeightServer(
        ctx,
        announce_endpoint=announce,
        fetch_endpoint=fetch,
        metrics=metrics,
        sender="learner-0",
        announce_interval_s=t.announce_interval_s,
        max_message_bytes=t.max_message_bytes,
        hwm=t.hwm,
        security=security,
    )
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(
        target=_receiver, args=(keys_dir, announce, fetch, repeats, t.model_dump(mode="json"), child)
    )
    proc.start()
    state = {"w": torch.randn(size_mb * 1_000_000 // 4, generator=torch.Generator().manual_seed(size_mb))}
    rows = []
    try:
        for version in range(repeats + 1):
            server.publish(
                pack_state_dict(
                    state, version=version, dtype=t.weight_dtype, chunk_bytes=t.weight_chunk_bytes, sender="learner-0"
                )
            )
            if not parent.poll(600):
                raise RuntimeError("the receiver reported nothing for 600 s")
            rows.append(parent.recv())
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
        server.close()
        if security is not None:
            security.close()
        ctx.term()
    return rows[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.curve", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 538])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    t = TransportSection()
    results = []
    with tempfile.TemporaryDirectory() as keys_dir:
        generate_keys(keys_dir, ["generator", "learner"])
        for size in args.sizes_mb:
            for mode, keys in (("none", None), ("curve", keys_dir)):
                syncs = measure(size, keys, args.repeats, t)
                nbytes = syncs[0][1]
                transfer = median(s[2] for s in syncs)
                results.append(
                    {
                        "size_mb": nbytes / 1e6,
                        "security": mode,
                        "syncs": syncs,
                        "transfer_s": transfer,
                        "verify_s": median(s[3] for s in syncs),
                        "mb_per_s": nbytes / 1e6 / transfer,
                    }
                )
                print(f"{size} MB {mode}: transfer {transfer:.3f}s ({nbytes / 1e6 / transfer:.0f} MB/s)", flush=True)
    env = environment()
    rows = []
    for plain, curve in zip(results[::2], results[1::2]):
        rows.append(
            [
                f"{plain['size_mb']:.0f}",
                plain["transfer_s"],
                curve["transfer_s"],
                plain["mb_per_s"],
                curve["mb_per_s"],
                curve["transfer_s"] / plain["transfer_s"],
            ]
        )
    section = "\n\n".join(
        [
            "## CURVE cost on the weight push (security.keys_dir set vs unset)",
            f"Command: `{command_line()}`",
            environment_line(env),
            markdown_table(
                [
                    "MB (float32)",
                    "transfer s, no keys",
                    "transfer s, CURVE",
                    "MB/s, no keys",
                    "MB/s, CURVE",
                    "CURVE / no keys",
                ],
                rows,
            ),
            f"Medians over {args.repeats} syncs per row after one warm-up; one WeightServer (this process) and one "
            "WeightClient (a spawned process) on tcp loopback, chunks of "
            f"{t.weight_chunk_bytes // 2**20} MiB, credit {t.weight_credit}. Transfer = first request to last chunk "
            "(CURVE encrypts and authenticates every frame in libzmq's I/O threads with libsodium's "
            "XSalsa20-Poly1305; the handshake happens once per connection, before the first sync).",
        ]
    )
    write_results("curve", {"results": results, "environment": env}, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
