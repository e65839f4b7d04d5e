"""The vocabulary check on a received batch: ids at or past the embedding size are refused, in order."""

from __future__ import annotations

import numpy as np

from streamrl.services.learner.intake import split_in_vocabulary, split_same_model
from support import scored_item


def with_tokens(group: str, k: int, prompt: list[int], completion: list[int]):
    s = scored_item(group, k)
    s.rollout.prompt_tokens = np.array(prompt, dtype=np.int32)
    s.rollout.completion_tokens = np.array(completion, dtype=np.int32)
    return s


def test_ids_must_be_below_the_vocabulary_size():
    batch = [
        with_tokens("a", 0, [0, 5], [9]),  # largest id 9 < 10
        with_tokens("a", 1, [10], [1]),  # prompt id 10 == vocab: out
        with_tokens("b", 0, [3], [2, 11]),  # completion id 11: out
        with_tokens("b", 1, [9], [9, 9]),
    ]
    kept, refused = split_in_vocabulary(batch, vocab_size=10)
    assert [s.rollout.rollout_id for s in kept] == ["a-0", "b-1"]
    assert [s.rollout.rollout_id for s in refused] == ["a-1", "b-0"]
    assert split_in_vocabulary(batch, vocab_size=12) == (batch, [])
    assert split_in_vocabulary([], vocab_size=10) == ([], [])


def test_rollouts_of_another_model_are_refused_and_unstated_ones_kept():
    batch = [scored_item("a", k) for k in range(4)]
    for s, fp in zip(batch, ["f00d", "beef", "", "f00d"]):
        s.rollout.model_fingerprint = fp
    kept, refused = split_same_model(batch, "f00d")
    assert [s.rollout.rollout_id for s in kept] == ["a-0", "a-2", "a-3"]
    assert [s.rollout.rollout_id for s in refused] == ["a-1"]
    assert split_same_model(batch, "") == (batch, [])  # the learner states none: nothing compared
