"""Learner step cost with the cheaper passes (reference log-probs from the scorers, the first pass reused),
side by side, and bf16's policy mismatch.

One step's batch (``groups_per_step`` prompts x ``group_size`` completions of the config's
model, sampled in fp32 by the generators' sampler, scored by its reward) is trained by fresh
copies of the same policy in each variant, alternating variants ``--repeats`` times so drift of
a shared machine hits all of them:

* ``baseline``: the learner's own reference pass and a full pi_old pass;
* ``ref_from_scorers``: the reference log-probs arrive with the rollouts (``scorer.reference_logprobs``);
* ``+reuse_first_pass``: pi_old of the first minibatch's rows from its own forward pass (``learner.reuse_first_pass``);
* ``+bucket_by_length``: minibatches of similar lengths;
* ``+autocast_bf16``: the learner's passes under bf16 autocast (opt-in).

the generator's batch is timed in fp32 and under bf16 autocast (``generator.autocast_bf16``), and
so is the scorers' reference pass (``scorer.autocast_bf16``), with the bf16 - fp32 difference of its
log-probs (the noise it adds to the KL penalty).

bf16 mismatch at staleness 0: the raw importance ratio pi_old / mu of the sampled tokens, mu
the generator's fp32 behaviour log-probs, pi_old the learner's fp32 and bf16 passes over the
same weights (fp32 should give ratios of 1 up to float noise; bf16 shows its own error).

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.learner_passes --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from bench.report import command_line, environment, environment_line, markdown_table, median, write_results
from streamrl.common.config import add_config_arguments, load_config

VARIANTS = {
    "baseline": dict(reuse_first_pass=False, bucket_by_length=False, autocast_bf16=False, ref=False),
    "ref_from_scorers": dict(reuse_first_pass=False, bucket_by_length=False, autocast_bf16=False, ref=True),
    "+reuse_first_pass": dict(reuse_first_pass=True, bucket_by_length=False, autocast_bf16=False, ref=True),
    "+bucket_by_length": dict(reuse_first_pass=True, bucket_by_length=True, autocast_bf16=False, ref=True),
    "+autocast_bf16": dict(reuse_first_pass=True, bucket_by_length=True, autocast_bf16=True, ref=True),
}


def sample_batch(cfg, policy, tokenizer, reference):
    """One step's scored rollouts, sampled in fp32 (behaviour log-probs mu), with and without the
    reference log-probs the scorers would attach."""
    from streamrl.common.messages import SamplingParams
    from streamrl.common.prompts import run_split
    from streamrl.evaluation import scored_group
    from streamrl.services.generator.sampling import prepare_run_prompts, sample_completions
    from streamrl.services.scorer.rewards import build_reward

    gen, lc = cfg.generator, cfg.learner
    train, _ = run_split(gen.prompts, cfg.run.seed)
    sampling = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)
    reward = build_reward(cfg.scorer.rewards, device=next(policy.parameters()).device)
    prompts = train[: lc.groups_per_step]
    texts, ids = prepare_run_prompts(tokenizer, prompts, cfg)
    policy.eval()
    started = time.perf_counter()
    groups = sample_completions(policy, tokenizer, ids, group_size=gen.group_size, sampling=sampling)
    generate_s = time.perf_counter() - started
    scored = []
    for p, text, group in zip(prompts, texts, groups):
        values, _ = reward([text] * len(group), [c.text for c in group], [p.metadata] * len(group))
        scored += scored_group(p, group, values, sampling=sampling, generator_id="bench", group_number=len(scored))
    with_ref = copy.deepcopy(scored)
    reference_s, values = time_reference(reference, with_ref, tokenizer.pad_token_id, autocast_bf16=False)
    for s, v in zip(with_ref, values):
        s.reference_logprobs = v
    return scored, with_ref, generate_s, reference_s


def time_sampling(cfg, policy, tokenizer, *, autocast_bf16: bool) -> float:
    """Seconds one generator batch (``prompts_per_batch`` prompts x ``group_size``) takes to sample."""
    from streamrl.common.messages import SamplingParams
    from streamrl.common.prompts import run_split
    from streamrl.services.generator.sampling import prepare_run_prompts, sample_completions

    gen = cfg.generator
    train, _ = run_split(gen.prompts, cfg.run.seed)
    _, ids = prepare_run_prompts(tokenizer, train[: gen.prompts_per_batch], cfg)
    sampling = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)
    started = time.perf_counter()
    sample_completions(
        policy, tokenizer, ids, group_size=gen.group_size, sampling=sampling, autocast_bf16=autocast_bf16
    )
    return time.perf_counter() - started


def time_reference(reference, scored, pad_id: int, *, autocast_bf16: bool):
    """Seconds the scorers' reference pass (``scorer.autocast_bf16`` on or off) takes over ``scored``,
    and its per-rollout ``[T]`` log-probs."""
    from streamrl.common.reference import reference_logprobs

    started = time.perf_counter()
    values = reference_logprobs(reference, [s.rollout for s in scored], pad_id=pad_id, autocast_bf16=autocast_bf16)
    return time.perf_counter() - started, values


def reference_mismatch(fp32: list, bf16: list) -> dict:
    """bf16 minus fp32 reference log-probs (nats): per token (signed mean, mean abs, max abs) and summed
    over each completion (what the k1 KL penalty of a rollout moves by)."""
    import numpy as np

    diff = np.concatenate([b - f for b, f in zip(bf16, fp32)]).astype(np.float64)
    per_completion = np.array([float((b - f).sum()) for b, f in zip(bf16, fp32)])
    return {
        "token_mean": float(diff.mean()),
        "token_abs_mean": float(np.abs(diff).mean()),
        "token_abs_max": float(np.abs(diff).max()),
        "completion_mean": float(per_completion.mean()),
        "completion_std": float(per_completion.std(ddof=1)) if len(per_completion) > 1 else 0.0,
    }


def ratio_mismatch(policy, batch, bf16: bool) -> dict:
    """Raw pi_old / mu over the sampled tokens at staleness 0 (same weights sampled them)."""
    import torch

    from streamrl.services.learner.batch import forward_completions

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logp = forward_completions(policy, batch).logprobs
    mask = batch.mask.bool()
    log_ratio = (logp - batch.behaviour_logprobs)[mask].double()
    ratio = log_ratio.exp()
    return {
        "abs_log_ratio_mean": float(log_ratio.abs().mean()),
        "abs_log_ratio_max": float(log_ratio.abs().max()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "outside_0.8_1.25": float(((ratio < 0.8) | (ratio > 1.25)).double().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default="deploy/configs/default.toml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from streamrl.common.models import configure_torch, load_causal_lm, load_tokenizer, resolve_model_path
    from streamrl.services.learner.batch import collate
    from streamrl.services.learner.trainer import PPOTrainer

    cfg = load_config(args.config, args.overrides)
    configure_torch(cfg.learner.threads, seed=cfg.run.seed)
    path = resolve_model_path(cfg.model.path, cfg.model.cache_path)
    tokenizer = load_tokenizer(path)
    base = load_causal_lm(path, device=torch.device("cpu"))
    reference = load_causal_lm(path, device=torch.device("cpu")).eval()
    scored, with_ref, generate_s, scorer_ref_s = sample_batch(cfg, base, tokenizer, reference)
    pad = tokenizer.pad_token_id
    mismatch = {
        "fp32": ratio_mismatch(base, collate(scored, pad_id=pad), False),
        "bf16": ratio_mismatch(base, collate(scored, pad_id=pad), True),
    }
    print(f"ratio mismatch at staleness 0: {mismatch}", flush=True)
    names = args.variants.split(",")
    times: dict[str, list[float]] = {n: [] for n in names}
    stats: dict[str, dict] = {}
    sampling_s: dict[str, list[float]] = {"fp32": [], "bf16": []}
    reference_s: dict[str, list[float]] = {"fp32": [], "bf16": []}
    reference_values: dict[str, list] = {}
    for rep in range(args.repeats):
        for mode in sampling_s:  # the generator's batch of the same prompts, fp32 and under bf16 autocast
            sampling_s[mode].append(time_sampling(cfg, base, tokenizer, autocast_bf16=mode == "bf16"))
            print(f"generator {mode} run {rep + 1}: {sampling_s[mode][-1]:.2f}s", flush=True)
        for mode in reference_s:  # the scorers' reference pass over the step's rollouts (scorer.autocast_bf16)
            seconds, reference_values[mode] = time_reference(reference, scored, pad, autocast_bf16=mode == "bf16")
            reference_s[mode].append(seconds)
            print(f"scorer reference pass {mode} run {rep + 1}: {seconds:.2f}s", flush=True)
        for name in names:
            v = VARIANTS[name]
            lc = cfg.learner.model_copy(
                update={k: v[k] for k in ("reuse_first_pass", "bucket_by_length", "autocast_bf16")}
            )
            trainer = PPOTrainer(copy.deepcopy(base), reference, lc)
            batch = collate(with_ref if v["ref"] else scored, pad_id=pad)
            torch.manual_seed(rep)
            started = time.perf_counter()
            out = trainer.step(batch, 0)
            times[name].append(time.perf_counter() - started)
            stats[name] = {k: out[k] for k in ("kl", "loss/total", "importance_ratio_max", "clip_fraction")}
            print(f"{name} run {rep + 1}: {times[name][-1]:.2f}s", flush=True)
    summary = {n: median(t) for n, t in times.items()}
    sampling = {mode: median(t) for mode, t in sampling_s.items()}
    ref_time = {mode: median(t) for mode, t in reference_s.items()}
    ref_mismatch = reference_mismatch(reference_values["fp32"], reference_values["bf16"])
    env = environment()
    command = command_line()
    rows = len(scored)
    result = {
        "command": command,
        "environment": env,
        "config": args.config,
        "overrides": args.overrides,
        "model": cfg.model.path,
        "rollouts": rows,
        "minibatches": cfg.learner.minibatches,
        "generate_s": generate_s,
        "scorer_reference_s": scorer_ref_s,
        "step_s": summary,
        "runs": times,
        "stats": stats,
        "ratio_mismatch_staleness_0": mismatch,
        "generator_batch_s": sampling,
        "generator_batch_runs": sampling_s,
        "scorer_reference_pass_s": ref_time,
        "scorer_reference_pass_runs": reference_s,
        "reference_bf16_mismatch": ref_mismatch,
    }
    first = summary[names[0]]
    table = markdown_table(
        ["variant", "learner step (s, median)", "vs first", "kl", "ratio max"],
        [
            [
                n,
                f"{summary[n]:.2f}",
                f"{first / summary[n]:.2f}x",
                f"{stats[n]['kl']:.4f}",
                f"{stats[n]['importance_ratio_max']:.3f}",
            ]
            for n in names
        ],
    )
    mm = markdown_table(
        ["pi_old pass", "mean abs log ratio", "max abs log ratio", "ratio min", "ratio max", "outside [0.8, 1.25]"],
        [
            [
                k,
                f"{m['abs_log_ratio_mean']:.2e}",
                f"{m['abs_log_ratio_max']:.2e}",
                f"{m['ratio_min']:.4f}",
                f"{m['ratio_max']:.4f}",
                f"{m['outside_0.8_1.25']:.4f}",
            ]
            for k, m in mismatch.items()
        ],
    )
    section = (
        f"## Learner passes: reference from the scorers, first pass reused\n\n`{command}`\n\n"
        f"{environment_line(env)}\n\n"
        f"{cfg.model.path}, one step of {rows} rollouts, {cfg.learner.minibatches} minibatches, "
        f"{args.repeats} alternating repeats. Sampling the batch took {generate_s:.1f}s; the scorers' "
        f"reference pass over it {scorer_ref_s:.1f}s (off the learner).\n\n{table}\n\n"
        f"Raw importance ratio pi_old/mu at staleness 0 (mu: fp32 sampler):\n\n{mm}\n\n"
        f"The generator's batch ({cfg.generator.prompts_per_batch} prompts x {cfg.generator.group_size} "
        f"completions, median of {args.repeats}): fp32 {sampling['fp32']:.2f}s, under bf16 autocast "
        f"(`generator.autocast_bf16`) {sampling['bf16']:.2f}s ({sampling['fp32'] / sampling['bf16']:.2f}x).\n\n"
        f"The scorers' reference pass over the step's {rows} rollouts (median of {args.repeats}): fp32 "
        f"{ref_time['fp32']:.2f}s, under bf16 autocast (`scorer.autocast_bf16`) {ref_time['bf16']:.2f}s "
        f"({ref_time['fp32'] / ref_time['bf16']:.2f}x). bf16 minus fp32 reference log-probs: per token mean "
        f"{ref_mismatch['token_mean']:+.4f}, mean abs {ref_mismatch['token_abs_mean']:.4f}, max abs "
        f"{ref_mismatch['token_abs_max']:.3f} nats; summed over a completion (what its k1 KL penalty moves "
        f"by) {ref_mismatch['completion_mean']:+.3f} +- {ref_mismatch['completion_std']:.3f} (mean +- sd).\n"
    )
    out = write_results("learner_passes", result, section, results_dir=args.results_dir, results_md=args.results_md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
