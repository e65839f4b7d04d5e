"""Helpers of the feedback tests (tests/services/feedback, tests/e2e/test_feedback*.py)."""

from __future__ import annotations

import numpy as np

from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout


def scored(rollout_id, *, group="g1", prompt="The film was", completion="good", version=3, reward=0.5):
    """A scored rollout with fixed tokens and the given ids, texts, policy version and reward."""
    r = Rollout(prompt_id="p", group_id=group, rollout_id=rollout_id, generator_id="gen-0", group_size=2,
                prompt_tokens=np.array([1, 2, 3], np.int32), completion_tokens=np.array([4, 5], np.int32),
                behaviour_logprobs=np.array([-1.0, -0.5], np.float32), policy_version=version,
                finish_reason=FinishReason.STOP, sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
                prompt_text=prompt, completion_text=completion)
    return ScoredRollout(rollout=r, reward=reward, reward_parts={"vader": reward})
