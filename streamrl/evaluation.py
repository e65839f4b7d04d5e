"""Evaluate a policy on held-out prompts: mean reward +- standard error and KL to the reference.

The held-out prompts are ``[eval] prompts`` when set (e.g. ``heldout_prompts.jsonl`` of
``streamrl sft``), else the ``eval_fraction`` split of the generators' prompt
source (split by hashed prompt id, so they are never trained on). Decoding is
seeded sampling at the configured temperature and top-p (the distribution the
policy is trained for), one completion per prompt, so two checkpoints are
compared on the same prompts with the same random stream. Rewards come from the
scorer's reward config (the reward PPO optimises); each ``[[eval.rewards]]`` entry
(e.g. the never-optimised gold reward model of ``rm.gold``, Gao et al. 2022) is scored on
the same completions and reported by its name beside it. :func:`compare` gives the change
of each between two policies with its paired standard error. KL is ``log pi - log pi_ref`` (k1, nats)
of the sampled tokens, reported
per token (``kl_per_token``: their sum over all completions / the number of completion tokens),
the unit of the learner's ``kl`` (step lines, metrics, TensorBoard, the learning-curve plot);
``kl_mean`` keeps the per-completion sum averaged over completions. A progress bar counts the
prompts scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from streamrl.common.config import Config
from streamrl.common.lora import adapter_spec, adapter_tensors, is_adapter_folder, load_lora
from streamrl.common.messages import SamplingParams, ScoredRollout
from streamrl.common.models import load_causal_lm, load_tokenizer, resolve_model_path, select_device
from streamrl.common.modes import Engine
from streamrl.common.prompts import Prompt, load_prompts, run_split
from streamrl.services.generator.engine import HFEngine, build_engine
from streamrl.services.generator.rollouts import group_rollouts
from streamrl.services.generator.sampling import Completion, prepare_run_prompts
from streamrl.services.learner.batch import collate, forward_completions
from streamrl.services.scorer.rewards import build_reward


@dataclass
class EvalResult:
    """Held-out evaluation of one policy.

    Attributes:
        model: the evaluated model folder.
        prompts: number of held-out prompts scored (n).
        reward_mean: mean over prompts of each prompt's mean reward.
        reward_stderr: standard error of that mean (sample std over prompts / sqrt(n)).
        kl_mean: mean per-completion KL(pi || pi_ref) estimate, nats.
        kl_per_token: mean per-token KL estimate, nats.
        completion_tokens_mean: mean completion length, tokens.
        samples: a few ``{"prompt", "completion", "reward"}`` examples.
        rewards: ``{name: {"mean", "stderr"}}`` of each ``[[eval.rewards]]`` entry (its
            unweighted value), over prompts as ``reward_mean``.
        per_prompt: ``{"reward" or name: [per-prompt mean]}`` in prompt order (for paired changes).
        prompt_ids: the prompts' ids, in that order.
    """

    model: str
    prompts: int
    reward_mean: float
    reward_stderr: float
    kl_mean: float
    kl_per_token: float
    completion_tokens_mean: float
    samples_per_prompt: int = 1
    samples: list[dict] = field(default_factory=list)
    rewards: dict[str, dict] = field(default_factory=dict)
    per_prompt: dict[str, list[float]] = field(default_factory=dict)
    prompt_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain-JSON form (for summary.json)."""
        return asdict(self)

    def line(self) -> str:
        """One human-readable line: reward +- stderr, KL per token (the unit of the learner's step lines,
        metrics and plot), completion length."""
        extra = "".join(f" | {name} {r['mean']:+.4f} +- {r['stderr']:.4f}" for name, r in self.rewards.items())
        return (
            f"reward {self.reward_mean:+.4f} +- {self.reward_stderr:.4f} "
            f"(n={self.prompts} prompts x {self.samples_per_prompt}){extra} | "
            f"KL to reference {self.kl_per_token:.4f} nats/token | {self.completion_tokens_mean:.1f} tokens"
        )


def scored_group(
    prompt: Prompt,
    completions: Sequence[Completion],
    rewards: Sequence[float],
    *,
    sampling: SamplingParams,
    generator_id: str,
    group_number: int,
    prompt_text: str = "",
) -> list[ScoredRollout]:
    """Completions of ``prompt`` sampled outside the streaming pipeline (evaluation, benchmarks) as one
    group of scored rollouts of policy version 0, ready for :func:`~streamrl.services.learner.batch.collate`:
    the generators' own :func:`~streamrl.services.generator.rollouts.group_rollouts` (group
    ``{generator_id}:{group_number}``, member ``j`` its rollout ``:{j}``, behaviour log-probs the
    completion's ``[T]`` float32 nats drawn with ``sampling``) with member ``j`` scored ``rewards[j]``.

    Raises:
        ValueError: ``rewards`` and ``completions`` differ in length.
    """
    if len(rewards) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards")
    rollouts = group_rollouts(
        generator_id=generator_id,
        group_number=group_number,
        prompt=prompt,
        prompt_text=prompt_text,
        completions=completions,
        version=0,
        sampling=sampling,
    )
    return [ScoredRollout(reward=float(reward), rollout=r) for r, reward in zip(rollouts, rewards)]


def held_out_prompts(cfg: Config, limit: int | None):
    """``[eval] prompts`` (all of them) when set, else the held-out split of the generators' prompt
    source; at most ``limit``.

    Raises:
        ValueError: no held-out prompts.
    """
    if cfg.eval.prompts is not None:
        prompts = load_prompts(cfg.eval.prompts)
        if not prompts:
            raise ValueError(f"eval.prompts: {cfg.eval.prompts.path} holds no prompts")
        return prompts[:limit] if limit else prompts
    _, held_out = run_split(cfg.generator.prompts, cfg.run.seed)
    if not held_out:
        raise ValueError("no held-out prompts: set generator.prompts.eval_fraction > 0")
    return held_out[:limit] if limit else held_out


@torch.no_grad()
def evaluate(
    cfg: Config,
    model_path: str,
    *,
    limit: int | None = None,
    seed: int = 1234,
    batch_prompts: int = 8,
    num_samples: int = 3,
    samples_per_prompt: int = 1,
) -> EvalResult:
    """Score ``model_path`` on the held-out prompts (see module docstring).

    ``model_path`` is a Hugging Face model folder or a LoRA adapter folder (``learner.lora``
    checkpoints, ``streamrl export``'s ``adapter/``) trained on ``model.path``, merged into it here.

    With ``samples_per_prompt`` > 1 each prompt's reward is the mean over its
    completions, and the standard error is taken over prompts (completions of one
    prompt are correlated, so counting them as independent would understate it).

    Raises:
        ValueError: no held-out prompts.
    """
    device = select_device(cfg.learner.device)
    base = resolve_model_path(cfg.model.path, cfg.model.cache_path)
    tokenizer = load_tokenizer(base)
    adapter = None  # a LoRA adapter folder (learner.lora checkpoints): merged into the base here
    if is_adapter_folder(model_path):
        lora = load_lora(load_causal_lm(base, device=device), model_path, trainable=False)
        adapter = ({k: v.clone() for k, v in adapter_tensors(lora).items()}, adapter_spec(lora))
        policy = lora.merge_and_unload().eval()
    else:
        policy = load_causal_lm(model_path, device=device).eval()
    gen = cfg.generator
    engine = (
        HFEngine(policy, tokenizer)
        if gen.engine is Engine.HF
        # fp32: the evaluation is exact
        else build_engine(
            gen.engine,
            base if adapter is not None else model_path,
            tokenizer,
            device=device,
            autocast_bf16=False,
            max_model_len=gen.max_prompt_tokens + gen.max_new_tokens,
            kv_cache_gib=gen.kv_cache_gib,
            threads=torch.get_num_threads(),
            seed=seed,
        )
    )
    if adapter is not None and gen.engine is not Engine.HF:
        engine.load_adapter(*adapter)  # the base, merged in place as a generator does
    # the reference itself: KL is exactly 0 at top_p = 1 (below, the nucleus cuts -log(its mass) per token)
    same = Path(model_path).resolve() == Path(base).resolve()
    reference = policy if same else load_causal_lm(base, device=device).eval()
    reward = build_reward(cfg.scorer.rewards, device=device)
    extra = build_reward(cfg.eval.rewards, device=device) if cfg.eval.rewards else None
    extra_rewards: dict[str, list[float]] = {name: [] for name in (extra.names if extra is not None else [])}
    sampling = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)
    prompts = held_out_prompts(cfg, limit)
    torch.manual_seed(seed)
    rewards: list[float] = []
    kls: list[float] = []
    tokens: list[int] = []
    samples: list[dict] = []
    progress = tqdm(total=len(prompts), desc=f"evaluating {Path(model_path).name}", unit="prompt")
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        texts, ids = prepare_run_prompts(tokenizer, chunk, cfg)
        groups = engine.sample(ids, group_size=samples_per_prompt, sampling=sampling)
        completions = [c for g in groups for c in g]
        k = samples_per_prompt
        chunk = [p for p in chunk for _ in range(k)]
        texts = [t for t in texts for _ in range(k)]
        values, _ = reward(texts, [c.text for c in completions], [p.metadata for p in chunk])
        if extra is not None:
            _, parts = extra(texts, [c.text for c in completions], [p.metadata for p in chunk])
            for name, per_prompt in extra_rewards.items():
                per_prompt += [sum(part[name] for part in parts[i : i + k]) / k for i in range(0, len(parts), k)]
        scored = [
            rollout
            for i, (p, group) in enumerate(zip(prompts[start : start + batch_prompts], groups))
            for rollout in scored_group(
                p, group, values[i * k : (i + 1) * k], sampling=sampling, generator_id="eval", group_number=start + i
            )
        ]
        batch = collate(scored, pad_id=tokenizer.pad_token_id).to(device)
        if same and sampling.top_p >= 1:  # KL of a policy to itself: no forward pass needed
            kls += [0.0] * len(scored)
        else:  # the policy as it samples against the untruncated reference (as the learner's penalty)
            out = forward_completions(policy, batch)
            ref = forward_completions(reference, batch, truncate=False).logprobs
            kls += torch.where(batch.mask > 0, out.logprobs - ref, 0.0).sum(1).tolist()  # padding may hold -inf
        tokens += batch.mask.sum(1).long().tolist()
        rewards += [sum(values[i : i + k]) / k for i in range(0, len(values), k)]
        for text, c, v in zip(texts, completions, values):
            if len(samples) < num_samples:
                samples.append({"prompt": text, "completion": c.text, "reward": v})
        progress.update(min(batch_prompts, len(prompts) - start))
    progress.close()
    engine.close()
    n = len(rewards)  # prompts
    kl_total, token_total = sum(kls), max(sum(tokens), 1)
    mean, stderr = mean_stderr(rewards)
    return EvalResult(
        model=str(model_path),
        prompts=n,
        reward_mean=mean,
        reward_stderr=stderr,
        rewards={name: dict(zip(("mean", "stderr"), mean_stderr(v))) for name, v in extra_rewards.items()},
        per_prompt={"reward": rewards, **extra_rewards},
        prompt_ids=[p.prompt_id for p in prompts],
        kl_mean=kl_total / len(kls),
        kl_per_token=kl_total / token_total,
        samples_per_prompt=samples_per_prompt,
        completion_tokens_mean=token_total / len(tokens),
        samples=samples,
    )


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std with n - 1 / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std / math.sqrt(n)


def compare(before: EvalResult, after: EvalResult, name: str = "reward") -> dict:
    """Change of reward ``name`` (``"reward"``: the training reward, or an ``[[eval.rewards]]``
    name) from ``before`` to ``after``, evaluated on the same prompts.

    Returns:
        ``{"before", "before_stderr", "after", "after_stderr", "delta", "delta_stderr",
        "delta_stderr_unpaired", "delta_z"}``: ``delta_stderr`` is the paired standard error
        (std over prompts of the per-prompt change / sqrt(n)), ``delta_stderr_unpaired`` is
        ``sqrt(se_before^2 + se_after^2)`` (ignores that the prompts are shared), ``delta_z`` is
        ``delta / delta_stderr``.

    Raises:
        ValueError: the two results were not computed on the same prompts, or lack ``name``.
    """
    if before.prompt_ids != after.prompt_ids:
        raise ValueError(
            "before and after were evaluated on different prompts; fix: the same eval.prompts, limit and seed for both"
        )
    if name not in before.per_prompt or name not in after.per_prompt:
        raise ValueError(
            f"no reward {name!r} in both evaluations (have {sorted(before.per_prompt)}); fix: list it "
            "in [[eval.rewards]] for both"
        )
    b, a = before.per_prompt[name], after.per_prompt[name]
    mean_b, se_b = mean_stderr(b)
    mean_a, se_a = mean_stderr(a)
    delta, se = mean_stderr([y - x for x, y in zip(b, a)])
    return {
        "before": mean_b,
        "before_stderr": se_b,
        "after": mean_a,
        "after_stderr": se_a,
        "delta": delta,
        "delta_stderr": se,
        "delta_stderr_unpaired": math.sqrt(se_a**2 + se_b**2),
        "delta_z": delta / se if se > 0 else (math.inf if delta > 0 else -math.inf if delta < 0 else 0.0),
    }
