"""The reference pass outside the learner: log-probs the scorers compute with
streamrl.common.reference equal the learner's own reference pass, and the KL penalty, advantages
and a whole step computed from them equal today's learner-side values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from streamrl.common.config import LearnerSection
from streamrl.common.messages import ScoredRollout
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.reference import reference_logprobs
from streamrl.services.learner.batch import collate, forward_completions
from streamrl.services.learner.trainer import PPOTrainer
from support import PROMPT_COMPLETIONS, fp32_head_on_bf16_body, text_rollout

TOKENIZER = build_char_tokenizer()
PAD = TOKENIZER.pad_token_id


def scored(i: int, prompt: str, completion: str, *, temperature: float = 0.7, top_p: float = 1.0) -> ScoredRollout:
    return text_rollout(
        TOKENIZER,
        i,
        prompt,
        completion,
        reward=float(i % 3) - 0.5,
        behaviour_logprob=-1.5,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=12,
    )


TEXTS = PROMPT_COMPLETIONS[:6]


def rollouts(**kw) -> list[ScoredRollout]:
    return [scored(i, p, c, **kw) for i, (p, c) in enumerate(TEXTS)]


def models():
    torch.manual_seed(0)
    return build_tiny_model(TOKENIZER, seed=0), build_tiny_model(TOKENIZER, seed=1).eval()


def with_scorer_reference(items: list[ScoredRollout], reference, micro_batch: int) -> list[ScoredRollout]:
    """As the scorers do: micro-batches of another composition than the learner's batch."""
    out = copy.deepcopy(items)
    for s, v in zip(out, reference_logprobs(reference, [s.rollout for s in out], pad_id=PAD, micro_batch=micro_batch)):
        s.reference_logprobs = v
    return out


@pytest.mark.parametrize("micro_batch", [1, 4, 16])
def test_scorer_log_probs_equal_the_learners_reference_pass(micro_batch):
    _, reference = models()
    items = with_scorer_reference(rollouts(), reference, micro_batch)
    batch = collate(items, pad_id=PAD)
    with torch.no_grad():
        learner_side = forward_completions(reference, batch).logprobs
    assert batch.ref_logprobs is not None and batch.ref_logprobs.shape == learner_side.shape
    mask = batch.mask.bool()
    torch.testing.assert_close(batch.ref_logprobs[mask], learner_side[mask], atol=1e-5, rtol=1e-5)
    assert (batch.ref_logprobs[~mask] == 0).all()
    for s in items:  # one value per completion token, each a log-probability
        assert s.reference_logprobs.shape == s.rollout.completion_tokens.shape
        assert s.reference_logprobs.dtype == np.float32 and (s.reference_logprobs <= 1e-6).all()


def test_scorer_log_probs_under_bf16_autocast_equal_the_learners_bf16_reference_pass():
    """``scorer.autocast_bf16``: the values are those of the learner's reference pass under its own bf16
    autocast (``learner.autocast_bf16``), not of the float32 pass: a bf16 body, then the float32
    output projection on its hidden states (by hand)."""
    _, reference = models()
    items = rollouts()
    bf16, fp32 = copy.deepcopy(items), copy.deepcopy(items)
    for out, on in ((bf16, True), (fp32, False)):
        for s, v in zip(
            out, reference_logprobs(reference, [s.rollout for s in out], pad_id=PAD, micro_batch=4, autocast_bf16=on)
        ):
            s.reference_logprobs = v
    batch = collate(bf16, pad_id=PAD)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        learner_bf16 = forward_completions(reference, batch).logprobs
    mask = batch.mask.bool()
    from_bf16 = batch.ref_logprobs[mask]
    from_fp32 = collate(fp32, pad_id=PAD).ref_logprobs[mask]
    assert (from_bf16 - from_fp32).abs().max() > 1e-4  # the autocast is on
    # other micro-batches than the learner's: bf16 matmuls of other shapes round differently
    torch.testing.assert_close(from_bf16, learner_bf16[mask].float(), atol=1e-3, rtol=0)
    assert (from_bf16 - learner_bf16[mask]).abs().max() < (from_bf16 - from_fp32).abs().max()
    # one pass over the learner's rows: exactly a float32 output projection on the hidden states
    one_pass = copy.deepcopy(items)
    for s, v in zip(
        one_pass,
        reference_logprobs(
            reference, [s.rollout for s in one_pass], pad_id=PAD, micro_batch=len(items), autocast_bf16=True
        ),
    ):
        s.reference_logprobs = v
    head = torch.nn.Linear(reference.config.hidden_size, 1)
    by_hand, _, bf16_change = fp32_head_on_bf16_body(reference, batch, head)
    torch.testing.assert_close(collate(one_pass, pad_id=PAD).ref_logprobs[mask], by_hand[mask], atol=1e-5, rtol=0)
    assert bf16_change > 1e-3  # a bf16 projection would be told apart


@pytest.mark.parametrize("top_p", [1.0, 0.5])
@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_kl_penalty_and_step_equal_with_and_without_the_scorers_values(kl_penalty, advantage, top_p):
    cfg = LearnerSection(
        lr=1e-2,
        kl_coef=0.2,
        kl_penalty=kl_penalty,
        advantage=advantage,
        device="cpu",
        minibatches=2,
        kl_estimator="k3" if kl_penalty == "loss" else "k1",
    )
    policy, reference = models()
    plain = rollouts(top_p=top_p)
    items = with_scorer_reference(plain, reference, micro_batch=4)
    results = []
    for batch_items in (plain, items):
        trainer = PPOTrainer(copy.deepcopy(policy), copy.deepcopy(reference), cfg)
        batch = collate(batch_items, pad_id=PAD)
        targets = trainer.targets(batch)
        torch.manual_seed(3)  # the same minibatch order
        stats = trainer.step(collate(batch_items, pad_id=PAD), current_version=0)
        results.append((batch, targets, stats, trainer.policy.state_dict()))
    (b0, t0, s0, w0), (b1, t1, s1, w1) = results
    assert b0.ref_logprobs is None and b1.ref_logprobs is not None
    mask = b0.mask.bool()
    torch.testing.assert_close(t1.ref_logprobs[mask], t0.ref_logprobs[mask], atol=1e-5, rtol=1e-5)
    assert t0.kl_mean > 1e-3  # the reference differs from the policy: the penalty is not trivially 0
    assert t1.kl_mean == pytest.approx(t0.kl_mean, abs=1e-6)
    torch.testing.assert_close(t1.advantages, t0.advantages, atol=1e-5, rtol=1e-4)
    for key in ("kl", "loss/total", "loss/policy", "entropy", "grad_norm"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-6), key
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-4, rtol=1e-3)  # Adam: lr 1e-2 per update


def test_top_p_below_one_gets_the_untruncated_reference_on_both_sides():
    """The reference is never truncated: a rollout sampled with top_p < 1 gets the reference's
    full distribution at its temperature, from the scorers and from the learner's own pass alike."""
    policy, reference = models()
    items = with_scorer_reference(rollouts(top_p=0.5), reference, micro_batch=4)
    batch = collate(items, pad_id=PAD)
    mask = batch.mask.bool()
    assert torch.isfinite(batch.ref_logprobs).all()
    with torch.no_grad():
        untruncated = forward_completions(reference, batch, truncate=False).logprobs
        truncated = forward_completions(reference, batch).logprobs
    torch.testing.assert_close(batch.ref_logprobs[mask], untruncated[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(untruncated[mask], truncated[mask], atol=1e-3)  # the nucleus does cut
    trainer = PPOTrainer(policy, reference, LearnerSection(device="cpu", kl_coef=0.1))
    learner_side = trainer.targets(collate(rollouts(top_p=0.5), pad_id=PAD)).ref_logprobs
    torch.testing.assert_close(learner_side[mask], batch.ref_logprobs[mask], atol=1e-5, rtol=1e-5)


def test_partial_batches_fall_back_to_the_learner():
    _, reference = models()
    items = with_scorer_reference(rollouts(), reference, micro_batch=4)
    items[2].reference_logprobs = None  # one rollout came from a scorer without the pass
    assert collate(items, pad_id=PAD).ref_logprobs is None
    # a selected minibatch keeps the values, trimmed like the other completion-aligned tensors
    full = collate(with_scorer_reference(rollouts(), reference, micro_batch=4), pad_id=PAD)
    sub = full.select(torch.tensor([1, 4]))  # the two shortest completions
    assert sub.ref_logprobs.shape == sub.mask.shape
    torch.testing.assert_close(sub.ref_logprobs, full.ref_logprobs[[1, 4], : sub.mask.shape[1]])


def test_temperatures_are_read_per_rollout():
    _, reference = models()
    hot = rollouts(temperature=1.3)
    cold = rollouts(temperature=0.5)
    mixed = [hot[0], cold[1], hot[2]]
    got = reference_logprobs(reference, [s.rollout for s in mixed], pad_id=PAD)
    for s, g in zip(mixed, got):
        alone = reference_logprobs(reference, [s.rollout], pad_id=PAD)[0]
        np.testing.assert_allclose(g, alone, atol=1e-5)
    assert not np.allclose(got[0], reference_logprobs(reference, [cold[0].rollout], pad_id=PAD)[0], atol=1e-3)
