"""Tests for services/generator/sampling.py.

The central property: the behaviour log-prob recorded for every sampled token is
the log-probability under the distribution it was actually drawn from (the
behaviour policy mu). We check that against an *unpadded* full forward pass of the
same model over prompt + completion (so left padding, the KV cache and the
temperature / top-p processing of ``generate`` must all be accounted for).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrl.common.messages import FinishReason, SamplingParams
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.services.generator.sampling import Completion, encode_prompts, generation_config, sample_completions
from support import slow_nucleus

PROMPT_TEXTS = ["Hello there, friend", "abc"]  # 19 and 3 tokens: left padding is exercised
MAX_NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def eos_model(tokenizer):
    """The tiny model with a +2.5 bias on the EOS logit, so completions often stop early."""
    m = build_tiny_model(tokenizer, seed=0)
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 2.5
    m.lm_head = head
    m.eval()
    return m


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return encode_prompts(tokenizer, PROMPT_TEXTS, max_prompt_tokens=64, add_special_tokens=False)


def sample(model, tokenizer, prompts, *, seed=0, group_size=3, temperature=1.0, top_p=1.0, max_new=MAX_NEW):
    torch.manual_seed(seed)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new)
    return sample_completions(model, tokenizer, prompts, group_size=group_size, sampling=params)


@torch.no_grad()
def full_logits(model, c: Completion, temperature: float) -> torch.Tensor:
    """``[T, V]`` logits / temperature predicting each completion token, from one
    unpadded forward pass over prompt + completion (no attention mask, no cache)."""
    ids = np.concatenate([c.prompt_tokens, c.completion_tokens]).astype(np.int64)
    logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0].double()
    p, t = len(c.prompt_tokens), len(c.completion_tokens)
    return logits[p - 1 : p - 1 + t] / temperature


def token_lp(logp: torch.Tensor, c: Completion) -> np.ndarray:
    idx = torch.from_numpy(c.completion_tokens.astype(np.int64))[:, None]
    return logp.gather(-1, idx)[:, 0].numpy()


def nucleus_logprobs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Log-probs renormalised over the slow reference nucleus; -inf outside it."""
    keep = slow_nucleus(logits, top_p)
    return torch.log_softmax(logits.masked_fill(~keep, -torch.inf), -1)


def all_completions(result):
    return [c for group in result for c in group]


# --------------------------------------------------------------------------- encode_prompts


def test_encode_prompts_keeps_last_tokens_and_rejects_empty(tokenizer):
    ids = encode_prompts(tokenizer, ["abcdef", "xy"], max_prompt_tokens=4, add_special_tokens=False)
    # 'a' = 4 + (97 - 32) = 69; the last four of "abcdef" are "cdef".
    assert ids == [[71, 72, 73, 74], [92, 93]]
    with pytest.raises(ValueError, match="no tokens"):
        encode_prompts(tokenizer, ["ok", ""], max_prompt_tokens=4, add_special_tokens=False)


# --------------------------------------------------------------------------- structure


def test_groups_prompts_order_and_cut_at_max_new_tokens(model, tokenizer, prompts):
    result = sample(model, tokenizer, prompts)
    assert len(result) == 2 and [len(g) for g in result] == [3, 3]
    for group, ids in zip(result, prompts):
        for c in group:
            assert c.prompt_tokens.dtype == np.int32 and c.completion_tokens.dtype == np.int32
            assert c.logprobs.dtype == np.float32
            np.testing.assert_array_equal(c.prompt_tokens, np.asarray(ids, dtype=np.int32))
            assert c.logprobs.shape == c.completion_tokens.shape
            eos_hits = np.flatnonzero(c.completion_tokens == tokenizer.eos_token_id)
            if c.finish_reason is FinishReason.STOP:
                assert eos_hits.tolist() == [len(c.completion_tokens) - 1]
            else:
                assert c.finish_reason is FinishReason.LENGTH
                assert len(c.completion_tokens) == MAX_NEW and eos_hits.size == 0
            assert c.text == tokenizer.decode(c.completion_tokens.tolist(), skip_special_tokens=True)


def test_group_members_differ_and_seed_reproduces(model, tokenizer, prompts):
    first = sample(model, tokenizer, prompts, seed=123)
    again = sample(model, tokenizer, prompts, seed=123)
    other = sample(model, tokenizer, prompts, seed=124)
    for group in first:
        seqs = [tuple(c.completion_tokens.tolist()) for c in group]
        assert len(set(seqs)) == len(seqs), "group members must be independent samples"
    key = lambda res: [tuple(c.completion_tokens.tolist()) for c in all_completions(res)]  # noqa: E731
    assert key(first) == key(again)
    assert key(first) != key(other)
    for a, b in zip(all_completions(first), all_completions(again)):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_eos_cuts_completion_and_sets_stop(eos_model, tokenizer, prompts):
    result = sample(eos_model, tokenizer, prompts, seed=0, group_size=8)
    reasons = {c.finish_reason for c in all_completions(result)}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}, "seed should produce both endings"
    eos = tokenizer.eos_token_id
    for c in all_completions(result):
        toks = c.completion_tokens
        if c.finish_reason is FinishReason.STOP:
            assert toks[-1] == eos and (toks[:-1] != eos).all()
            assert 1 <= len(toks) <= MAX_NEW
        else:
            assert len(toks) == MAX_NEW and (toks != eos).all()
        assert c.text == tokenizer.decode(toks.tolist(), skip_special_tokens=True)
        assert "<eos>" not in c.text and "<pad>" not in c.text
        # Log-probs of EOS-ended completions (including the EOS token itself) are still exact.
        ref = token_lp(torch.log_softmax(full_logits(eos_model, c, 1.0), -1), c)
        np.testing.assert_allclose(c.logprobs, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- behaviour log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_unpadded_forward(model, tokenizer, prompts, temperature):
    result = sample(model, tokenizer, prompts, seed=1, temperature=temperature)
    n_tokens = 0
    for c in all_completions(result):
        ref = token_lp(torch.log_softmax(full_logits(model, c, temperature), -1), c)
        np.testing.assert_allclose(c.logprobs, ref, atol=1e-4, rtol=0)
        n_tokens += len(ref)
    assert n_tokens >= 6  # something was actually compared


def test_temperature_changes_recorded_logprobs(model, tokenizer, prompts):
    """At T=0.7 the recorded values are NOT the T=1 log-probs (the scaling is applied)."""
    result = sample(model, tokenizer, prompts, seed=1, temperature=0.7)
    diffs = []
    for c in all_completions(result):
        at_one = token_lp(torch.log_softmax(full_logits(model, c, 1.0), -1), c)
        diffs.append(np.abs(c.logprobs - at_one).max())
    assert max(diffs) > 1e-2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_logprobs_are_renormalised_over_nucleus(model, tokenizer, prompts, temperature):
    top_p = 0.5
    result = sample(model, tokenizer, prompts, seed=2, temperature=temperature, top_p=top_p)
    for c in all_completions(result):
        logits = full_logits(model, c, temperature)
        full = token_lp(torch.log_softmax(logits, -1), c)
        # Renormalising over a nucleus of mass >= top_p raises each log-prob by at most
        # -log(top_p), never lowers it, and keeps it a log-probability.
        assert (c.logprobs >= full - 1e-4).all()
        assert (c.logprobs <= full - np.log(top_p) + 1e-4).all()
        assert (c.logprobs <= 0).all()
        # Exact value against a slow nucleus reference; every sampled token is inside it.
        nucleus = token_lp(nucleus_logprobs(logits, top_p), c)
        assert np.isfinite(nucleus).all(), "sampled a token outside the nucleus"
        np.testing.assert_allclose(c.logprobs, nucleus, atol=1e-4, rtol=0)
    # With a near-uniform tiny model the nucleus is about half the vocabulary: the
    # shift is close to log 2 (i.e. the correction is not vacuous).
    shift = np.concatenate(
        [
            c.logprobs - token_lp(torch.log_softmax(full_logits(model, c, temperature), -1), c)
            for c in all_completions(result)
        ]
    )
    assert shift.min() > 0.3


# --------------------------------------------------------------------------- the model's generation_config


@pytest.fixture
def opinionated_model(tokenizer):
    """The tiny model with a generation_config full of sampling settings of its own (as
    checkpoints on the hub ship): generate would otherwise fill unset fields from it."""
    m = build_tiny_model(tokenizer, seed=0)
    gc = m.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k = 1.3, 2, 5
    gc.typical_p, gc.temperature, gc.top_p, gc.min_length = 0.8, 0.5, 0.6, 6
    gc.do_sample = False
    return m


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_model_generation_config_does_not_leak_into_sampling(opinionated_model, tokenizer, prompts, temperature, top_p):
    """Only the rollout's temperature and top_p shape mu: the recorded log-probs are the
    tempered (nucleus) softmax of an unpadded forward pass, whatever the model's own
    generation_config says (repetition penalty, n-gram ban, top-k, typical-p, min length)."""
    result = sample(opinionated_model, tokenizer, prompts, seed=4, temperature=temperature, top_p=top_p, group_size=4)
    for c in all_completions(result):
        logits = full_logits(opinionated_model, c, temperature)
        ref = token_lp(nucleus_logprobs(logits, top_p) if top_p < 1 else torch.log_softmax(logits, -1), c)
        np.testing.assert_allclose(c.logprobs, ref, atol=1e-4, rtol=0)


def test_explicit_config_builds_only_the_processors_the_learner_reproduces(opinionated_model):
    """The generation config used is complete: merged with the model's generation_config as
    generate merges it, it yields a temperature and a top-p warper and nothing else."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    config = generation_config(
        opinionated_model, SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=4), pad_token_id=0, eos_token_id=1
    )
    merged, _ = opinionated_model._prepare_generation_config(config)
    processors = opinionated_model._get_logits_processor(generation_config=merged, input_ids_seq_length=3, device="cpu")
    assert [type(p) for p in processors] == [TemperatureLogitsWarper, TopPLogitsWarper]
    merged, _ = opinionated_model._prepare_generation_config(
        generation_config(
            opinionated_model,
            SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    assert (
        list(opinionated_model._get_logits_processor(generation_config=merged, input_ids_seq_length=3, device="cpu"))
        == []
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("suppress_tokens", [5, 6]),
        ("bad_words_ids", [[7]]),
        ("min_p", 0.1),
        ("forced_eos_token_id", 1),
        ("sequence_bias", {(8,): 2.0}),
    ],
)
def test_a_processor_the_learner_cannot_reproduce_is_refused(tokenizer, prompts, field, value):
    model = build_tiny_model(tokenizer, seed=0)
    setattr(model.generation_config, field, value)
    with pytest.raises(ValueError, match=f"generation_config sets {field}"):
        sample(model, tokenizer, prompts)


# --------------------------------------------------------------------------- bf16 autocast


@torch.no_grad()
def test_bf16_autocast_records_the_logprobs_it_sampled_from(model, tokenizer, prompts):
    """Under ``autocast_bf16`` the recorded log-probs are those of the bf16 logits (mu of the
    tokens actually drawn): close to a bf16 forward pass of the same text, and off the fp32
    pass by bf16 rounding (so the autocast really ran)."""
    torch.manual_seed(3)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW)
    result = sample_completions(model, tokenizer, prompts, group_size=3, sampling=params, autocast_bf16=True)
    off_bf16, off_fp32 = [], []
    for c in all_completions(result):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = token_lp(torch.log_softmax(full_logits(model, c, 1.0), -1), c)
        fp32 = token_lp(torch.log_softmax(full_logits(model, c, 1.0), -1), c)
        off_bf16.append(np.abs(c.logprobs - bf16))
        off_fp32.append(np.abs(c.logprobs - fp32))
    off_bf16, off_fp32 = np.concatenate(off_bf16), np.concatenate(off_fp32)
    # fp32 sampling matches to ~1e-6 (above); bf16 rounding shows: the sampler did not run in fp32
    assert off_fp32.mean() > 1e-4
    assert off_bf16.mean() < off_fp32.mean() / 2  # and it matches the bf16 pass far better
