"""The ``rollout`` messages of one sampled group (generator -> scorers)."""

from __future__ import annotations

from collections.abc import Sequence

from streamrl.common.messages import Rollout, SamplingParams, Selection
from streamrl.common.prompts import Prompt
from streamrl.services.generator.sampling import Completion


def group_rollouts(
    *,
    generator_id: str,
    group_number: int,
    prompt: Prompt,
    prompt_text: str,
    completions: Sequence[Completion],
    version: int,
    sampling: SamplingParams,
    selections: Sequence[Selection] | None = None,
) -> list[Rollout]:
    """One :class:`Rollout` per completion of a group sampled for ``prompt``.

    Args:
        generator_id: this generator's identity (unique per process start).
        group_number: groups this generator sent before this one; the group id is
            ``"{generator_id}:{group_number}"``, unique across restarts because ``generator_id`` is.
        prompt: the prompt the group was sampled for (its id and metadata travel with each rollout).
        prompt_text: the prompt as the model saw it (after the chat template).
        completions: the group's G completions; member ``j``'s id is ``"{group_id}:{j}"``.
        version: the policy version that sampled them (the behaviour policy).
        sampling: the sampling parameters used (the learner recomputes log-probs with them).
        selections: one :class:`Selection` per completion when control sharing chose them among
            candidates (``services/generator/control.py``), else None.

    Returns:
        ``[G]`` rollouts, each declaring ``group_size = G``.
    """
    group_id = f"{generator_id}:{group_number}"
    return [
        Rollout(
            sender=generator_id,
            prompt_id=prompt.prompt_id,
            group_id=group_id,
            rollout_id=f"{group_id}:{j}",
            generator_id=generator_id,
            group_size=len(completions),
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            behaviour_logprobs=c.logprobs,
            policy_version=version,
            finish_reason=c.finish_reason,
            sampling=sampling,
            prompt_text=prompt_text,
            completion_text=c.text,
            metadata=dict(prompt.metadata),
            selection=selections[j] if selections is not None else None,
        )
        for j, c in enumerate(completions)
    ]
