"""Generator engines side by side: tokens/s of Hugging Face ``generate`` and vLLM, and each engine's
behaviour-policy mismatch with the learner at staleness 0.

Both engines hold the config's model (SmolLM2-135M-Instruct by default) in one process, in the
same precision (``--dtype``), on the same number of torch threads, and sample the same prompts:
``groups_per_step`` training prompts x ``group_size`` completions of up to ``max_new_tokens``
tokens (the default job's generator batch). Batches alternate HF, vLLM, HF, vLLM, ... ``--repeats``
times, so drift of a shared machine hits both; the first batch of each engine (warm-up: oneDNN
kernel selection, vLLM's first-call set-up) is timed apart and left out of the rate.

Mismatch at staleness 0 (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"): for every sampled token, log pi_old - log mu, with mu the engine's
recorded behaviour log-prob and pi_old the learner's log-prob of the same token under the same
weights (``forward_completions``, fp32), reported as mean |.|, p99 |.| and max |.| per token, and
the effective sample size of the sequence ratios pi_old / mu (ESS = (sum w)^2 / sum w^2, as a
fraction of the completions).

Usage (from the repository root, nothing else running)::

    .venv/bin/python -m bench.engines --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.report import command_line, environment, environment_line, markdown_table, median, write_results
from streamrl.common.config import load_config
from streamrl.common.messages import SamplingParams
from streamrl.common.models import configure_torch, load_causal_lm, load_tokenizer, resolve_model_path
from streamrl.common.modes import Engine
from streamrl.common.prompts import Prompt, run_split
from streamrl.evaluation import scored_group
from streamrl.services.generator.engine import build_engine
from streamrl.services.generator.sampling import prepare_run_prompts
from streamrl.services.learner.batch import collate, forward_completions

DEFAULT_CONFIG = "deploy/configs/default.toml"


def learner_logprobs(model, completions, sampling: SamplingParams) -> list[np.ndarray]:
    """The learner's log-probs (``forward_completions``: temperature and top-p applied, nats) of each
    engine-sampled completion's tokens under ``model``, ``[T]`` float64 each."""
    rewards = [0.0] * len(completions)
    scored = scored_group(
        Prompt("p", ""), completions, rewards, sampling=sampling, generator_id="bench", group_number=0
    )
    with torch.no_grad():
        out = forward_completions(model, collate(scored, pad_id=0))
    return [out.logprobs[i, : len(c.completion_tokens)].double().numpy() for i, c in enumerate(completions)]


def mismatch(policy, completions, sampling: SamplingParams) -> dict:
    """Per-token |log pi_old - log mu| (mean, p99, max, nats) and the ESS fraction of sequence ratios."""
    gaps = [
        pi_old - c.logprobs.astype(np.float64)
        for c, pi_old in zip(completions, learner_logprobs(policy, completions, sampling))
    ]
    log_w = [gap.sum() for gap in gaps]
    gap = np.abs(np.concatenate(gaps))
    w = np.exp(np.array(log_w) - max(log_w))
    return {
        "tokens": int(gap.size),
        "abs_mean": float(gap.mean()),
        "abs_p99": float(np.quantile(gap, 0.99)),
        "abs_max": float(gap.max()),
        "ess_fraction": float(w.sum() ** 2 / (w**2).sum() / len(w)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per engine (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the generator's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    gen = cfg.generator
    configure_torch(args.threads, seed=cfg.run.seed)
    path = resolve_model_path(cfg.model.path, cfg.model.cache_path)
    tokenizer = load_tokenizer(path)
    device = torch.device("cpu")
    max_new = args.max_new_tokens or gen.max_new_tokens
    sampling = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=max_new)
    train, _ = run_split(gen.prompts, cfg.run.seed)
    batches = [
        train[i * cfg.learner.groups_per_step : (i + 1) * cfg.learner.groups_per_step] for i in range(args.repeats + 1)
    ]
    bf16 = args.dtype == "bf16"
    engines, start_s = {}, {}
    for engine in (Engine.HF, Engine.VLLM):
        t = time.perf_counter()
        engines[engine.value] = build_engine(
            engine,
            path,
            tokenizer,
            device=device,
            autocast_bf16=bf16,
            max_model_len=gen.max_prompt_tokens + max_new,
            kv_cache_gib=1.0,
            threads=args.threads,
            seed=cfg.run.seed,
        )
        start_s[engine.value] = time.perf_counter() - t
    policy = load_causal_lm(path, device=device).eval()  # the learner's fp32 pi_old, same weights
    rows = {name: {"seconds": [], "tokens": [], "completions": []} for name in engines}
    warmup = {}
    for b, prompts in enumerate(batches):
        _, ids = prepare_run_prompts(tokenizer, prompts, cfg)
        for name, engine in engines.items():
            t = time.perf_counter()
            groups = engine.sample(ids, group_size=gen.group_size, sampling=sampling)
            seconds = time.perf_counter() - t
            completions = [c for g in groups for c in g]
            tokens = sum(len(c.completion_tokens) for c in completions)
            print(f"batch {b} {name}: {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)", flush=True)
            if b == 0:
                warmup[name] = seconds
                continue
            rows[name]["seconds"].append(seconds)
            rows[name]["tokens"].append(tokens)
            rows[name]["completions"] += completions
    results = {
        "command": command_line(),
        "dtype": args.dtype,
        "threads": args.threads,
        "batch": {"prompts": cfg.learner.groups_per_step, "group_size": gen.group_size, "max_new_tokens": max_new},
        "engines": {},
    }
    table = []
    for name, r in rows.items():
        rate = sum(r["tokens"]) / sum(r["seconds"])
        gap = mismatch(policy, r["completions"], sampling)
        results["engines"][name] = {
            "start_s": start_s[name],
            "warmup_batch_s": warmup[name],
            "batch_s": r["seconds"],
            "tokens": r["tokens"],
            "tokens_per_s": rate,
            "median_batch_s": median(r["seconds"]),
            "mismatch": gap,
        }
        table.append(
            [
                name,
                start_s[name],
                warmup[name],
                median(r["seconds"]),
                rate,
                gap["abs_mean"],
                gap["abs_p99"],
                gap["abs_max"],
                gap["ess_fraction"],
            ]
        )
    results["vllm_over_hf"] = results["engines"]["vllm"]["tokens_per_s"] / results["engines"]["hf"]["tokens_per_s"]
    for engine in engines.values():
        engine.close()
    env = results["environment"] = environment()
    section = "\n".join(
        [
            f"## Generator engines: Hugging Face generate vs vLLM ({args.dtype})",
            "",
            f"`{command_line()}`: {cfg.learner.groups_per_step} prompts x {gen.group_size} completions of up to "
            f"{max_new} tokens per batch, {args.dtype}, {args.threads} torch thread(s), "
            "batches alternating HF and vLLM "
            f"({args.repeats} timed each, after one warm-up).",
            "",
            markdown_table(
                [
                    "engine",
                    "start s",
                    "warm-up batch s",
                    "median batch s",
                    "tokens/s",
                    "|log pi_old - log mu| mean",
                    "p99",
                    "max",
                    "ESS fraction",
                ],
                table,
            ),
            "",
            f"vLLM / HF: **{results['vllm_over_hf']:.2f}x** tokens/s. Mismatch at staleness 0, same weights: the "
            "learner's fp32 log-prob of each sampled token minus the engine's recorded behaviour log-prob.",
            "",
            environment_line(env),
        ]
    )
    print(section)
    if not args.no_write:
        write_results("engines" if args.dtype == "fp32" else "engines_bf16", results, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
