"""Tests for services/learner/batch.py: exact collated tensors, padding-invariant
log-probs against a per-row unpadded forward pass, and ``TrainBatch.select``."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.services.learner.batch import (
    TRAIN_BATCH_DTYPES,
    MixedSamplingError,
    TrainBatch,
    collate,
    forward_completions,
    split_by_sampling,
)
from support import fp32_head_on_bf16_body, slow_nucleus

FIELDS = [
    "input_ids",
    "attention_mask",
    "positions",
    "tokens",
    "mask",
    "behaviour_logprobs",
    "scores",
    "group_ids",
    "versions",
]


def scored(
    group_id: str,
    prompt: list[int],
    completion: list[int],
    logprobs: list[float],
    *,
    version: int,
    reward: float,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> ScoredRollout:
    rollout = Rollout(
        prompt_id=f"p-{group_id}",
        group_id=group_id,
        rollout_id=f"{group_id}-{len(prompt)}-{len(completion)}",
        generator_id="gen-0",
        group_size=2,
        prompt_tokens=np.asarray(prompt, dtype=np.int32),
        completion_tokens=np.asarray(completion, dtype=np.int32),
        behaviour_logprobs=np.asarray(logprobs, dtype=np.float32),
        policy_version=version,
        finish_reason=FinishReason.STOP if completion[-1] == 1 else FinishReason.LENGTH,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=4),
    )
    return ScoredRollout(rollout=rollout, reward=reward)


def hand_rollouts() -> list[ScoredRollout]:
    return [
        scored("g-a", [5, 6, 7], [10, 11], [-1.0, -2.0], version=3, reward=0.5),
        scored("g-b", [8], [12, 13, 14, 1], [-0.1, -0.2, -0.3, -0.4], version=5, reward=-1.0),
        scored("g-a", [5, 6, 7, 9, 9], [15], [-3.0], version=4, reward=2.0),
    ]


# --------------------------------------------------------------------------- collate


def test_the_dtype_table_is_the_documented_one():
    """TRAIN_BATCH_DTYPES (what collate makes, what the data-parallel learner broadcasts and allocates)
    covers every tensor field of TrainBatch, each with the dtype the class docstring states."""
    documented = re.findall(r"^ +(\w+): ``\[[^\]]*\]`` (int64|float32)\b", TrainBatch.__doc__, re.MULTILINE)
    tensors = [f.name for f in dataclasses.fields(TrainBatch) if f.name != "sampling"]
    assert [name for name, _ in documented] == tensors
    assert TRAIN_BATCH_DTYPES == {name: getattr(torch, dtype) for name, dtype in documented}


def test_collate_exact_tensors():
    b = collate(hand_rollouts(), pad_id=0)
    expected = {
        "input_ids": [[5, 6, 7, 10, 11, 0], [8, 12, 13, 14, 1, 0], [5, 6, 7, 9, 9, 15]],
        "attention_mask": [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]],
        # logits at prompt_len - 1 + t predict completion token t
        "positions": [[2, 3, 0, 0], [0, 1, 2, 3], [4, 0, 0, 0]],
        "tokens": [[10, 11, 0, 0], [12, 13, 14, 1], [15, 0, 0, 0]],
        "mask": [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
        "behaviour_logprobs": [[-1.0, -2.0, 0, 0], [-0.1, -0.2, -0.3, -0.4], [-3.0, 0, 0, 0]],
        "scores": [0.5, -1.0, 2.0],
        "group_ids": [0, 1, 0],  # groups numbered in order of first appearance
        "versions": [3, 5, 4],
    }
    for name in FIELDS:
        got = getattr(b, name)
        assert got.dtype == TRAIN_BATCH_DTYPES[name], name
        assert torch.equal(got, torch.tensor(expected[name], dtype=TRAIN_BATCH_DTYPES[name])), name
    assert b.size == 3


def test_collate_pad_id_fills_padding_only():
    b = collate(hand_rollouts(), pad_id=97)
    assert b.input_ids[0].tolist() == [5, 6, 7, 10, 11, 97]
    assert b.tokens[2].tolist() == [15, 97, 97, 97]
    # the same rollouts with a different pad: identical wherever attention / mask is 1
    a = collate(hand_rollouts(), pad_id=0)
    assert torch.equal(a.input_ids * a.attention_mask, b.input_ids * b.attention_mask)
    assert torch.equal(a.tokens * a.mask.long(), b.tokens * b.mask.long())


def test_collate_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)


def test_collate_group_ids_interleaved():
    rs = [scored(g, [4], [5], [-1.0], version=0, reward=0.0) for g in ["z", "y", "z", "x", "y"]]
    assert collate(rs, pad_id=0).group_ids.tolist() == [0, 1, 0, 2, 1]


# --------------------------------------------------------------------------- select


def test_select_trims_to_longest_selected_row():
    b = collate(hand_rollouts(), pad_id=0)
    sub = b.select(torch.tensor([0, 1]))
    assert sub.input_ids.tolist() == [[5, 6, 7, 10, 11], [8, 12, 13, 14, 1]]
    assert sub.attention_mask.tolist() == [[1] * 5, [1] * 5]
    assert sub.positions.tolist() == [[2, 3, 0, 0], [0, 1, 2, 3]]
    assert sub.versions.tolist() == [3, 5]

    sub = b.select(torch.tensor([2, 0]))  # order kept as given
    assert sub.input_ids.tolist() == [[5, 6, 7, 9, 9, 15], [5, 6, 7, 10, 11, 0]]
    assert sub.positions.tolist() == [[4, 0], [2, 3]]
    assert sub.tokens.tolist() == [[15, 0], [10, 11]]
    assert sub.mask.tolist() == [[1, 0], [1, 1]]
    assert sub.behaviour_logprobs.tolist() == [[-3.0, 0.0], [-1.0, -2.0]]
    assert sub.scores.tolist() == [2.0, 0.5]
    assert sub.group_ids.tolist() == [0, 0]
    assert sub.versions.tolist() == [4, 3]

    sub = b.select(torch.tensor([0]))
    assert sub.input_ids.tolist() == [[5, 6, 7, 10, 11]]
    assert sub.tokens.tolist() == [[10, 11]]
    assert sub.size == 1
    # the original is untouched
    assert b.input_ids.shape == (3, 6) and b.mask.shape == (3, 4)


# --------------------------------------------------------------------------- forward_completions


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(build_char_tokenizer(), seed=0)


def random_rollouts(seed: int, temperature: float = 1.0) -> list[ScoredRollout]:
    g = np.random.default_rng(seed)
    out = []
    for i, (p, t) in enumerate([(3, 7), (9, 2), (1, 5), (6, 6)]):
        prompt = g.integers(4, 99, size=p).tolist()
        completion = g.integers(1, 99, size=t).tolist()
        out.append(
            scored(f"g{i % 2}", prompt, completion, [-1.0] * t, version=i, reward=float(i), temperature=temperature)
        )
    return out


@torch.no_grad()
def row_reference(model, s: ScoredRollout, temperature: float, value_head=None, top_p: float = 1.0):
    """Log-probs / entropies / values of one rollout from an unpadded forward pass (the
    nucleus, when top_p < 1, from the slow reference)."""
    r = s.rollout
    ids = torch.from_numpy(np.concatenate([r.prompt_tokens, r.completion_tokens]).astype(np.int64))[None]
    out = model(input_ids=ids, output_hidden_states=value_head is not None)
    p, t = len(r.prompt_tokens), len(r.completion_tokens)
    logits = out.logits[0, p - 1 : p - 1 + t].double() / temperature
    if top_p < 1:
        logits = logits.masked_fill(~slow_nucleus(logits, top_p), -torch.inf)
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, torch.from_numpy(r.completion_tokens.astype(np.int64))[:, None])[:, 0]
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][0, p - 1 : p - 1 + t]).squeeze(-1)
    return lp, ent, values


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_completions_matches_unpadded_rows(model, temperature):
    rollouts = random_rollouts(0, temperature)  # the temperature recorded in the rollouts is the one used
    batch = collate(rollouts, pad_id=0)
    assert batch.sampling.temperature == temperature
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad():
        out = forward_completions(model, batch, value_head=head, with_entropy=True)
    assert out.logprobs.shape == batch.mask.shape
    for i, s in enumerate(rollouts):
        lp, ent, values = row_reference(model, s, temperature, head)
        n = len(lp)
        torch.testing.assert_close(out.logprobs[i, :n].double(), lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy[i, :n].double(), ent, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.values[i, :n], values, atol=1e-5, rtol=0)
    assert (out.logprobs[batch.mask > 0] < 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_completions_under_top_p_reads_the_nucleus(model, temperature):
    """top_p < 1: log-probs and entropies of the nucleus-truncated distribution, row by row
    against an unpadded pass and the slow nucleus; tokens outside it get -inf."""
    top_p = 0.5
    rollouts = []
    for s in random_rollouts(4, temperature):
        s.rollout.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=4)
        rollouts.append(s)
    batch = collate(rollouts, pad_id=0)
    with torch.no_grad():
        out = forward_completions(model, batch, with_entropy=True)
    outside = 0
    for i, s in enumerate(rollouts):
        lp, ent, _ = row_reference(model, s, temperature, top_p=top_p)
        n = len(lp)
        torch.testing.assert_close(out.entropy[i, :n].double(), ent, atol=1e-5, rtol=0)
        finite = torch.isfinite(lp)
        outside += int((~finite).sum())
        assert torch.equal(torch.isfinite(out.logprobs[i, :n]), finite)
        torch.testing.assert_close(out.logprobs[i, :n][finite].double(), lp[finite], atol=1e-5, rtol=0)
    assert outside > 0  # random tokens: some lie outside the nucleus, which the test then covers
    # truncate=False (the reference's pass): the untruncated distribution at the temperature
    with torch.no_grad():
        full = forward_completions(model, batch, truncate=False)
    for i, s in enumerate(rollouts):
        lp, _, _ = row_reference(model, s, temperature)
        torch.testing.assert_close(full.logprobs[i, : len(lp)].double(), lp, atol=1e-5, rtol=0)


def test_output_projection_and_value_head_run_in_fp32_under_bf16_autocast(model):
    """Under the learner's bf16 autocast only the body is bf16: the log-probs are those of the
    float32 output projection on the bf16 hidden states, the values those of the float32 value head."""
    batch = collate(random_rollouts(3), pad_id=0)
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward_completions(model, batch, value_head=head, with_entropy=True)
    logprobs, values, bf16_change = fp32_head_on_bf16_body(model, batch, head)
    mask = batch.mask > 0
    assert out.logprobs.dtype == out.values.dtype == torch.float32
    torch.testing.assert_close(out.logprobs[mask], logprobs[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values[mask], values[mask], atol=1e-5, rtol=0)
    assert bf16_change > 1e-3  # a bf16 projection would be told apart at this tolerance


def test_forward_completions_without_extras(model):
    batch = collate(random_rollouts(1), pad_id=0)
    with torch.no_grad():
        out = forward_completions(model, batch)
    assert out.entropy is None and out.values is None


def test_padding_content_does_not_change_logprobs(model):
    """Different pad ids, and a batch padded wider by an extra long row, give the same
    log-probs on real tokens."""
    rollouts = random_rollouts(2)
    with torch.no_grad():
        base = forward_completions(model, collate(rollouts, pad_id=0)).logprobs
        other_pad = forward_completions(model, collate(rollouts, pad_id=42)).logprobs
        long_row = scored("gx", list(range(4, 40)), list(range(40, 60)), [-1.0] * 20, version=0, reward=0.0)
        wider = forward_completions(model, collate(rollouts + [long_row], pad_id=0)).logprobs
    mask = collate(rollouts, pad_id=0).mask > 0
    torch.testing.assert_close(other_pad[mask], base[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(wider[: len(rollouts), : mask.shape[1]][mask], base[mask], atol=1e-5, rtol=0)


def test_forward_on_selected_minibatch_matches_full_batch(model):
    batch = collate(random_rollouts(3), pad_id=0)
    rows = torch.tensor([1, 2])
    with torch.no_grad():
        full = forward_completions(model, batch).logprobs
        sub = forward_completions(model, batch.select(rows)).logprobs
    t = sub.shape[1]
    m = batch.mask[rows, :t] > 0
    torch.testing.assert_close(sub[m], full[rows, :t][m], atol=1e-5, rtol=0)


def test_to_moves_every_field():
    b = collate(hand_rollouts(), pad_id=0).to(torch.device("cpu"))
    assert isinstance(b, TrainBatch) and b.sampling == hand_rollouts()[0].rollout.sampling
    assert b.tokens.tolist() == [[10, 11, 0, 0], [12, 13, 14, 1], [15, 0, 0, 0]]


# --------------------------------------------------------------------------- sampling parameters


def test_split_by_sampling_keeps_the_most_common_setting_and_names_the_reason():
    rows = hand_rollouts()
    mixed = [
        rows[0],
        scored("g-c", [5], [6], [-1.0], version=1, reward=0.0, temperature=0.7),
        rows[1],
        scored("g-d", [5], [6], [-1.0], version=1, reward=0.0, top_p=0.9),
        rows[2],
        scored("g-e", [5], [6], [-1.0], version=1, reward=0.0, temperature=0.7, top_p=0.9),
    ]
    kept, refused = split_by_sampling(mixed)
    assert kept == [rows[0], rows[1], rows[2]]  # 3 at (1.0, 1.0) beat 1 at each other setting
    assert refused == {"mixed_temperature": [mixed[1], mixed[5]], "mixed_top_p": [mixed[3]]}
    # the majority wins even when it is not the config's setting, and max_new_tokens does not matter
    cold = [scored(f"c{i}", [5], [6], [-1.0], version=1, reward=0.0, temperature=0.5) for i in range(3)]
    kept, refused = split_by_sampling([rows[0], *cold])
    assert kept == cold and refused == {"mixed_temperature": [rows[0]]}
    # a tie keeps the first setting seen
    kept, refused = split_by_sampling([cold[0], rows[0]])
    assert kept == [cold[0]] and list(refused) == ["mixed_temperature"]
    assert split_by_sampling(rows) == (rows, {})


def test_collate_refuses_a_mixed_batch_and_records_its_sampling():
    rows = hand_rollouts() + [scored("g-c", [5], [6], [-1.0], version=1, reward=0.0, temperature=0.7)]
    with pytest.raises(MixedSamplingError, match="1 of 4 rollouts were sampled with another temperature") as err:
        collate(rows, pad_id=0)
    assert err.value.reason == "mixed_temperature"
    batch = collate(rows[3:], pad_id=0)
    assert batch.sampling == SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=4)
    assert batch.select(torch.tensor([0])).sampling == batch.sampling
