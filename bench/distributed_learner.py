"""Learner step time: 2 data-parallel ranks (gloo, torchrun) against 1 rank, same batch, same model.

The batch is synthetic (``--groups`` groups of 4 completions of random characters, lengths 8..48,
random rewards) and the model the tiny char Llama at ``--hidden`` / ``--layers``; every variant
trains ``--steps`` timed steps after one warm-up step (median reported). Variants:

* ``1 rank, 1 thread``: the single-process learner;
* ``1 rank, 2 threads``: the same with both cores (what 2 ranks compete with on this machine);
* ``2 ranks, 1 thread each``: ``torchrun --nproc-per-node 2``, DDP over gloo.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.distributed_learner
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import command_line, environment, environment_line, markdown_table, median, write_results


def synthetic_batch(groups: int, seed: int = 0):
    """``groups`` x 4 scored rollouts of random printable characters (the char tokenizer's ids 4..98)."""
    from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout
    from streamrl.services.learner.batch import collate

    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        prompt = rng.integers(4, 99, size=int(rng.integers(8, 24)), dtype=np.int32)
        for k in range(4):
            n = int(rng.integers(8, 49))
            rows.append(
                ScoredRollout(
                    reward=float(rng.random()),
                    rollout=Rollout(
                        prompt_id=f"p{g}",
                        group_id=f"g{g}",
                        rollout_id=f"g{g}-{k}",
                        generator_id="bench",
                        group_size=4,
                        prompt_tokens=prompt,
                        completion_tokens=rng.integers(4, 99, size=n, dtype=np.int32),
                        behaviour_logprobs=np.full(n, -4.5, np.float32),
                        policy_version=0,
                        finish_reason=FinishReason.LENGTH,
                        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=48),
                    ),
                )
            )
    return collate(rows, pad_id=0)


def time_steps(args, make_trainer):
    """``(trainer, seconds of each timed step)`` (after one warm-up step)."""
    from streamrl.common.models import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    policy = build_tiny_model(tokenizer, seed=0, hidden_size=args.hidden, num_layers=args.layers)
    reference = build_tiny_model(tokenizer, seed=1, hidden_size=args.hidden, num_layers=args.layers)
    trainer = make_trainer(policy, reference)
    batch = synthetic_batch(args.groups)
    seconds = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        trainer.step(batch, current_version=step)
        seconds.append(time.perf_counter() - started)
    return trainer, seconds[1:]


def learner_config(args, world_size: int):
    from streamrl.common.config import LearnerSection

    return LearnerSection(device="cpu", world_size=world_size, minibatches=args.minibatches, lr=1e-4)


def rank_main(args) -> None:
    """A torchrun rank: time the steps (rank 0 writes them to ``--out``)."""
    from streamrl.services.learner.distributed import DistributedPPOTrainer, init_distributed

    torch.set_num_threads(1)
    cfg = learner_config(args, 2)
    dist, _ = init_distributed(cfg, torch.device("cpu"))
    if dist.rank == 0:  # rank 0 steps (broadcasting the batch), the other rank serves, as in the learner
        trainer, seconds = time_steps(args, lambda p, r: DistributedPPOTrainer(p, r, cfg, dist))
        Path(args.out).write_text(json.dumps(seconds))
    else:
        from streamrl.common.models import build_char_tokenizer, build_tiny_model

        tokenizer = build_char_tokenizer()
        trainer = DistributedPPOTrainer(
            *(build_tiny_model(tokenizer, seed=s, hidden_size=args.hidden, num_layers=args.layers) for s in (0, 1)),
            cfg,
            dist,
        )
        trainer.serve()
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    from streamrl.services.learner.trainer import PPOTrainer

    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        _, seconds = time_steps(args, lambda p, r: PPOTrainer(p, r, learner_config(args, 1)))
        results[f"1 rank, {threads} thread{'s' if threads > 1 else ''}"] = seconds
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                "bench.distributed_learner",
                "--rank",
                "--out",
                str(out),
                *sys.argv[1:],
            ],
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        results["2 ranks, 1 thread each"] = json.loads(out.read_text())
    base = median(results["1 rank, 1 thread"])
    rows = [[name, f"{median(s):.3f}", f"{base / median(s):.2f}x"] for name, s in results.items()]
    env = environment()
    rows_per_step = 4 * args.groups
    section = f"""## Data-parallel learner: 2 ranks against 1

`{command_line()}`; {environment_line(env)}.

One learner step on {rows_per_step} rollouts (completions of 8-48 tokens), tiny char Llama
(hidden {args.hidden}, {args.layers} layers), {args.minibatches} minibatches, median of {args.steps} steps after a
warm-up:

{markdown_table(["learner", "step (s)", "speed-up vs 1 rank, 1 thread"], rows)}

On this 2-core CPU machine 2 ranks cannot beat one process using both cores: each rank also repeats
the whole batch's no-grad pi_old/reference pass (the targets are computed on every rank so that all
hold the same advantages without more communication), gloo all-reduces the gradients through
loopback TCP, and other engineers' tests share the cores (a 2-thread row slower than the
1-thread row means the cores were busy during the run: read these as one noisy sample). On a multi-GPU host
(NCCL, one GPU per rank) the sharded forward and backward passes divide by the number of ranks N and DDP overlaps the
gradient all-reduce with the backward pass, but the no-grad pi_old pass (and the reference pass,
unless the scorers sent reference log-probs) stays replicated on every rank. Counting a backward as
two forwards, one epoch costs about R + 3 forward-equivalents on 1 GPU and R + 3/N on N GPUs (R = 1 or
2 replicated passes): for 2 GPUs expect 1.4-1.6x per step, more with several PPO epochs, and room for
N times the batch at about the same step time. Sharding the targets pass too (each rank computes
pi_old of its rows, all-gathered before the advantages) would remove R's share; not built. Not
measured here: no GPU host was available to this run.
"""
    write_results("distributed_learner", {"results_s": results, "args": vars(args), "environment": env}, section)
    print(section)


if __name__ == "__main__":
    main()
