"""The rollout messages of one sampled group: ids, group size, versions, texts, and a wire round trip."""

from __future__ import annotations

import numpy as np

from streamrl.common.messages import FinishReason, Rollout, SamplingParams, decode, encode
from streamrl.common.prompts import Prompt
from streamrl.services.generator.rollouts import group_rollouts
from streamrl.services.generator.sampling import Completion


def completion(tokens: list[int], text: str, reason=FinishReason.STOP) -> Completion:
    return Completion(
        prompt_tokens=np.array([1, 2, 3], dtype=np.int32),
        completion_tokens=np.array(tokens, dtype=np.int32),
        logprobs=-np.arange(1, len(tokens) + 1, dtype=np.float32) / 4,
        finish_reason=reason,
        text=text,
    )


def test_group_rollouts_ids_and_fields():
    prompt = Prompt(prompt_id="gsm8k-17", text="2+2?", metadata={"answer": "4"})
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8)
    group = [completion([4, 5], "4"), completion([6, 7, 8], "five", FinishReason.LENGTH)]
    rollouts = group_rollouts(
        generator_id="generator-1-ab12cd34",
        group_number=41,
        prompt=prompt,
        prompt_text="<user>2+2?",
        completions=group,
        version=9,
        sampling=sampling,
    )
    assert [r.rollout_id for r in rollouts] == ["generator-1-ab12cd34:41:0", "generator-1-ab12cd34:41:1"]
    assert {r.group_id for r in rollouts} == {"generator-1-ab12cd34:41"}
    assert {(r.group_size, r.policy_version, r.prompt_id, r.prompt_text) for r in rollouts} == {
        (2, 9, "gsm8k-17", "<user>2+2?")
    }
    assert [r.completion_text for r in rollouts] == ["4", "five"]
    assert [r.finish_reason for r in rollouts] == [FinishReason.STOP, FinishReason.LENGTH]
    assert all(r.sampling == sampling and r.sender == r.generator_id == "generator-1-ab12cd34" for r in rollouts)
    np.testing.assert_array_equal(rollouts[1].behaviour_logprobs, [-0.25, -0.5, -0.75])
    rollouts[0].metadata["answer"] = "changed"  # each rollout has its own copy of the prompt's metadata
    assert prompt.metadata == {"answer": "4"} and rollouts[1].metadata == {"answer": "4"}


def test_group_rollouts_survive_the_wire():
    prompt = Prompt(prompt_id="p", text="hi")
    sent = group_rollouts(
        generator_id="g",
        group_number=0,
        prompt=prompt,
        prompt_text="hi",
        completions=[completion([9], "x")],
        version=0,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
    )
    received = decode(encode(sent[0]), expected=(Rollout,))
    assert received.rollout_id == "g:0:0" and received.group_size == 1
    np.testing.assert_array_equal(received.completion_tokens, [9])
    np.testing.assert_array_equal(received.behaviour_logprobs, sent[0].behaviour_logprobs)
