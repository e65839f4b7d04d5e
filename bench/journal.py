"""Buffer journal benchmark: the cost of each fsync policy on this machine's disk.

Appends real scored rollouts (64 prompt + 32 completion int32 tokens, 32
float32 behaviour log-probs, texts: the wire frames the buffer journals) with
:class:`streamrl.services.buffer.journal.Journal`, committing after every ``burst``
rollouts the way the buffer service does after each read burst, for each
policy (``always``, ``interval``, ``never``) and burst size (1 = a commit per
rollout, the worst case; 16 = one learner batch). Reports rollouts/s,
microseconds per rollout and fsyncs; also recovery time of the written
journal.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.journal --rollouts 3000 --max-seconds 120
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import Deadline, command_line, environment, environment_line, markdown_table, median, write_results
from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout, encode
from streamrl.common.modes import FsyncPolicy
from streamrl.services.buffer.journal import Journal


def rollout_frames(n: int) -> list[list]:
    """Encoded frames of ``n`` distinct scored rollouts of real size (4 per group)."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        r = Rollout(
            sender="bench",
            prompt_id=f"p{i // 4}",
            group_id=f"g{i // 4}",
            rollout_id=f"r{i}",
            generator_id="bench",
            group_size=4,
            prompt_tokens=rng.integers(0, 49152, 64, dtype=np.int32),
            completion_tokens=rng.integers(0, 49152, 32, dtype=np.int32),
            behaviour_logprobs=-rng.random(32, dtype=np.float32),
            policy_version=0,
            finish_reason=FinishReason.LENGTH,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32),
            prompt_text="x" * 300,
            completion_text="y" * 150,
        )
        frames.append([bytes(f) for f in encode(ScoredRollout(rollout=r, reward=0.5, scorer_id="bench"))])
    return frames


def measure(frames: list[list], policy: FsyncPolicy, burst: int, directory: Path) -> dict:
    """Append every rollout, committing every ``burst``; returns rates and fsync counts."""
    journal = Journal(directory, fsync=policy, fsync_interval_s=1.0)
    start = time.perf_counter()
    for i, f in enumerate(frames, 1):
        journal.accept(f)
        if i % burst == 0:
            journal.commit()
    journal.commit()
    seconds = time.perf_counter() - start
    journal.close()
    recover_start = time.perf_counter()
    recovered = Journal(directory, fsync=FsyncPolicy.NEVER).recover()
    recover_s = time.perf_counter() - recover_start
    assert recovered.rollouts == len(frames)
    return {
        "rollouts_per_s": len(frames) / seconds,
        "us_per_rollout": seconds / len(frames) * 1e6,
        "fsyncs": journal.fsyncs,
        "fsync_s": journal.fsync_seconds,
        "bytes": journal.bytes_written,
        "recover_s": recover_s,
    }


def render(result: dict, env: dict, command: str) -> str:
    rows = [
        [
            r["policy"],
            r["burst"],
            r["rollouts_per_s"],
            r["us_per_rollout"],
            r["fsyncs"],
            r["bytes"] / r["rollouts"],
            r["recover_s"],
        ]
        for r in result["rows"]
    ]
    table = markdown_table(
        [
            "fsync policy",
            "commit every (rollouts)",
            "rollouts/s",
            "µs per rollout",
            "fsyncs",
            "bytes per rollout",
            "recovery s",
        ],
        rows,
    )
    return (
        f"## Buffer journal: cost of the fsync policy\n\n`{command}`\n\n{environment_line(env)}\n\n"
        f"{result['rollouts']} rollouts per cell, median of {result['repeats']} runs, on the disk that "
        f"holds {result['directory']}.\n\n{table}\n\n"
        "The buffer service commits once per read burst (up to 256 rollouts) and before every batch, "
        "so `always` costs one fsync per burst, not per rollout."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bursts", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    frames = rollout_frames(args.rollouts)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for policy in FsyncPolicy:
            for burst in args.bursts:
                runs = []
                for k in range(args.repeats):
                    if deadline.expired():
                        print("time budget spent; stopping early", file=sys.stderr)
                        break
                    runs.append(measure(frames, policy, burst, Path(tmp) / f"{policy.value}-{burst}-{k}"))
                if runs:
                    row = {key: median([r[key] for r in runs]) for key in runs[0]}
                    rows.append({"policy": policy.value, "burst": burst, "rollouts": args.rollouts, **row})
                    print(rows[-1])
        result = {"rollouts": args.rollouts, "repeats": args.repeats, "rows": rows, "directory": tmp}
    env = environment()
    result["environment"] = env
    write_results(
        "journal", result, render(result, env, command_line()), results_dir=args.results_dir, results_md=args.results_md
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
