"""Seeded learning test: a tiny policy learns a rule reward through the real sampler and trainer.

The generator's copy of the policy lags the learner by one version (as in the
asynchronous pipeline), so the data is stale and the decoupled correction is
exercised, not just on-policy PPO.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from streamrl.common.config import LearnerSection
from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.services.generator.sampling import encode_prompts, sample_completions
from streamrl.services.learner.batch import collate
from streamrl.services.learner.trainer import PPOTrainer
from streamrl.services.scorer.rewards import count_char

PROMPTS = ["The film was", "I think that", "My review:", "Overall it is"]


def scored_batch(groups, prompts, rewards, version):
    out = []
    for g, (prompt, group) in enumerate(zip(prompts, groups)):
        for j, c in enumerate(group):
            r = Rollout(
                prompt_id=prompt,
                group_id=f"g{version}-{g}",
                rollout_id=f"{version}-{g}-{j}",
                generator_id="test",
                group_size=len(group),
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.completion_tokens,
                behaviour_logprobs=c.logprobs,
                policy_version=version,
                finish_reason=FinishReason.LENGTH,
                sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8),
                completion_text=c.text,
            )
            out.append(ScoredRollout(rollout=r, reward=rewards[g * len(group) + j]))
    return out


@pytest.mark.slow  # tens of PPO steps of the tiny model: about 20 s on 2 cores
def test_policy_learns_to_emit_target_char():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_model(tokenizer, seed=0)
    reference = copy.deepcopy(policy).eval()
    behaviour = copy.deepcopy(policy).eval()  # the generator's copy, one version behind
    cfg = LearnerSection(
        lr=3e-3, groups_per_step=4, kl_coef=0.0, advantage="grpo", correction="decoupled", normalize_rewards=False
    )
    trainer = PPOTrainer(policy, reference, cfg)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8)
    ids = encode_prompts(tokenizer, PROMPTS, max_prompt_tokens=32, add_special_tokens=False)
    mean_rewards, staleness = [], []
    behaviour_version = 0
    for version in range(40):
        groups = sample_completions(behaviour, tokenizer, ids, group_size=8, sampling=sampling)
        texts = [c.text for g in groups for c in g]
        rewards = count_char([""] * len(texts), texts, [{}] * len(texts), char="e")
        mean_rewards.append(float(np.mean(rewards)))
        stats = trainer.step(
            collate(scored_batch(groups, PROMPTS, rewards, behaviour_version), pad_id=tokenizer.pad_token_id), version
        )
        staleness.append(stats["staleness_max"])
        if version % 2 == 1:  # the generator syncs every other version: its data is 0-1 versions stale
            behaviour.load_state_dict(policy.state_dict())
            behaviour_version = version + 1
    first, last = np.mean(mean_rewards[:5]), np.mean(mean_rewards[-5:])
    assert max(staleness) >= 1  # the data really was stale
    assert first < 0.1
    print(f"mean reward first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.25, (first, last, mean_rewards)
