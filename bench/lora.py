"""LoRA benchmark: bytes and seconds per policy version, whole model vs adapter only (``learner.lora``),
for N generators; and the learner's step time and peak RSS with each.

The machinery is :mod:`bench.weight_sync`'s (:class:`~bench.weight_sync.Bench`): the learner's
:class:`~streamrl.common.weights.WeightServer` in this process, each generator a separate OS process
that fetches, verifies and loads every version with the HF engine (``load_fetched``), as the
generator service does. A *full* version is the policy's ``state_dict`` (loaded zero-copy where it
can be); an *adapter* version is the LoRA adapter of a PEFT policy with ``[learner.lora]``'s defaults
(rank 4, alpha 8, every attention and MLP projection), announced with its ``AdapterSpec`` and merged
into the generator's base (``W0 + (alpha / r) B A`` for every adapted layer). Per row: the median over
``--repeats`` syncs (after warm-up syncs) of the learner's blocked time (snapshot), the generator's
transfer and load (the merge, for an adapter), and the total from publishing until the last generator
has loaded.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.lora --max-seconds 600
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import transformers

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
from bench.weight_sync import MODELS, WARMUP_SYNCS, Bench, cases
from streamrl.common.config import LearnerSection, LoraSection, TransportSection
from streamrl.common.lora import adapter_spec, adapter_tensors, apply_lora
from streamrl.common.modes import WeightDtype

PHASES = ("snapshot", "transfer", "load", "total")


def run_case(
    model_key: str, model_path: str, generators: int, repeats: int, transport: TransportSection, deadline: Deadline
) -> list[dict]:
    """The full-model row and the adapter row for one (model, N)."""
    import torch

    from streamrl.common.models import configure_torch, load_causal_lm

    configure_torch(LearnerSection().threads)  # the learner's thread budget, as in the service
    full = load_causal_lm(model_path, device=torch.device("cpu")).state_dict()
    lora = apply_lora(load_causal_lm(model_path, device=torch.device("cpu")), LoraSection())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapters, not B = 0
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    cases = (("full", full, None), ("adapter", adapter_tensors(lora), adapter_spec(lora)))
    bench = Bench(model_path, generators, transport)
    rows, version = [], 0
    try:
        for mode, state, spec in cases:
            if deadline.expired():
                break
            bench.server.adapter = spec
            syncs = []
            for i in range(WARMUP_SYNCS + repeats):
                if i > WARMUP_SYNCS and deadline.expired():
                    break
                version += 1
                result = bench.sync(state, version, transport.weight_dtype)
                if i >= WARMUP_SYNCS:
                    syncs.append(result)
            row = {"model": model_key, "version": mode, "generators": generators, "repeats": len(syncs)}
            row["nbytes"] = syncs[0]["nbytes"]
            row.update({phase: median(s[phase] for s in syncs) for phase in PHASES})
            row["syncs"] = syncs
            print(
                f"{model_key} {mode} N={generators}: {row['nbytes'] / 1e6:.2f} MB, total {row['total']:.3f}s "
                f"(snapshot {row['snapshot']:.3f}, transfer {row['transfer']:.3f}, load {row['load']:.3f})",
                flush=True,
            )
            rows.append(row)
    finally:
        bench.close()
    return rows


def _learner(model_path: str, lora: bool, steps: int, groups: int, conn) -> None:
    """One learner process: build the trainer as the learner service does (``build_trainer``; LoRA: PEFT
    policy, no reference copy), time ``steps`` steps after a warm-up one, report its peak RSS."""
    import resource

    import torch

    from bench.distributed_learner import synthetic_batch
    from streamrl.common.config import Config
    from streamrl.services.learner.build import build_trainer

    torch.set_num_threads(LearnerSection().threads)
    learner = {"device": "cpu", "lr": 1e-4, "lora": LoraSection().model_dump() if lora else None}
    config = Config(model={"path": model_path}, learner=learner)
    trainer, _, _ = build_trainer(config, torch.device("cpu"), None)
    batch = synthetic_batch(groups)
    seconds = []
    for step in range(steps + 1):
        started = time.perf_counter()
        trainer.step(batch, current_version=step)
        seconds.append(time.perf_counter() - started)
    trained = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    conn.send({"step_seconds": seconds[1:], "peak_rss_mb": peak_mb, "trained_parameters": trained})


def learner_rows(model_key: str, model_path: str, steps: int, groups: int) -> list[dict]:
    """Learner step time and peak RSS, whole policy vs LoRA, each in a fresh process."""
    rows = []
    spawn = mp.get_context("spawn")
    for mode in ("full", "adapter"):
        parent, child = spawn.Pipe()
        proc = spawn.Process(target=_learner, args=(model_path, mode == "adapter", steps, groups, child))
        proc.start()
        result = parent.recv()
        proc.join()
        row = {"model": model_key, "version": mode, "groups": groups, **result}
        row["step"] = median(result["step_seconds"])
        print(
            f"{model_key} learner {mode}: step {row['step']:.2f}s, peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"{row['trained_parameters']} trained parameters",
            flush=True,
        )
        rows.append(row)
    return rows


def render(
    rows: list[dict], learner: list[dict], env: dict, command: str, transport: TransportSection, skipped: list[str]
) -> str:
    """The RESULTS.md section."""
    full = {(r["model"], r["generators"]): r for r in rows if r["version"] == "full"}
    table = markdown_table(
        ["model", "version", "N", "MB", "% of full", "learner blocked s", "transfer s", "load s", "total s"],
        [
            [
                r["model"],
                r["version"],
                r["generators"],
                r["nbytes"] / 1e6,
                100 * r["nbytes"] / full[(r["model"], r["generators"])]["nbytes"]
                if (r["model"], r["generators"]) in full
                else float("nan"),
                r["snapshot"],
                r["transfer"],
                r["load"],
                r["total"],
            ]
            for r in rows
        ],
    )
    notes = [
        "## LoRA: weight sync of the whole model vs the adapter only",
        "",
        f"Command: `{command}`",
        "",
        environment_line(env),
        "",
        table,
        "",
        f"Medians over {max((r['repeats'] for r in rows), default=0)} syncs per row after {WARMUP_SYNCS} warm-up "
        f"syncs; wire dtype {transport.weight_dtype.value}, chunks of {transport.weight_chunk_bytes / 2**20:.0f} "
        "MiB, tcp loopback, each generator its own process with 1 torch thread. adapter = `[learner.lora]` "
        "defaults (rank 4, alpha 8, q/k/v/o/gate/up/down_proj); its load is the merge W0 + (alpha/r) B A of "
        "every adapted layer from the generator's base. total = publish until the last generator has loaded.",
    ]
    if learner:
        notes += [
            "",
            markdown_table(
                ["model", "policy", "trained parameters", "learner step s", "peak RSS MB"],
                [[r["model"], r["version"], r["trained_parameters"], r["step"], r["peak_rss_mb"]] for r in learner],
            ),
            "",
            f"Learner: `build_trainer` as the service builds it (LoRA: the PEFT policy and no reference copy), "
            f"median of {len(learner[0]['step_seconds'])} steps after a warm-up step on {learner[0]['groups']} "
            "groups x 4 synthetic rollouts (8-48 tokens), one process per row, its peak RSS.",
        ]
    if skipped:
        notes += ["", "Skipped for the time bound: " + ", ".join(skipped) + "."]
    return "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--generators", default="1,2,4", help="comma-separated N values")
    parser.add_argument("--dtype", default="float32", help="wire dtype (transport.weight_dtype)")
    parser.add_argument("--repeats", type=int, default=5, help="measured syncs per row (median reported)")
    parser.add_argument("--learner-steps", type=int, default=3, help="timed learner steps per policy (0: none)")
    parser.add_argument("--learner-groups", type=int, default=4, help="groups (x 4 rollouts) per learner step")
    output_arguments(parser, max_seconds=600.0, bound="no new case starts after it")
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    transformers.utils.logging.disable_progress_bar()
    transport = TransportSection(weight_dtype=WeightDtype(args.dtype))
    rows, skipped = [], []
    for key, path, n in cases(args.models, args.generators, deadline, skipped):
        rows += run_case(key, path, n, args.repeats, transport, deadline)
    learner = []
    if args.learner_steps:
        from streamrl.common.models import resolve_model_path

        for key in args.models.split(","):
            if deadline.expired():
                skipped.append(f"{key} learner")
                continue
            learner += learner_rows(key, resolve_model_path(MODELS[key]), args.learner_steps, args.learner_groups)
    env = environment()
    command = command_line()
    results = {"command": command, "environment": env, "rows": rows, "learner": learner, "skipped": skipped}
    out = write_results(
        "lora",
        results,
        render(rows, learner, env, command, transport, skipped),
        results_dir=args.results_dir,
        results_md=args.results_md,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
