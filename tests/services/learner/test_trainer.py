"""Tests for services/learner/trainer.py: PPOTrainer.step on a tiny char Llama.

Diagnostics are checked against hand computations (staleness, raw importance
ratios, truncation, ESS), learning direction against a fixed rewarded batch for
every advantage estimator, and checkpoint state against an exact replay.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streamrl.common.config import LearnerSection
from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.services.learner.batch import TrainBatch, collate, forward_completions
from streamrl.services.learner.losses import policy_loss
from streamrl.services.learner.trainer import PPOTrainer, PtxBatch

TOKENIZER = build_char_tokenizer()


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def scored(group: str, prompt: str, completion: str, reward: float, version: int = 0) -> ScoredRollout:
    p, c = ids(prompt), ids(completion)
    return ScoredRollout(
        rollout=Rollout(
            prompt_id=group,
            group_id=group,
            rollout_id=f"{group}/{completion}",
            generator_id="g0",
            group_size=2,
            prompt_tokens=np.asarray(p, np.int32),
            completion_tokens=np.asarray(c, np.int32),
            behaviour_logprobs=np.full(len(c), -1.0, np.float32),
            policy_version=version,
            finish_reason=FinishReason.LENGTH,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8),
        ),
        reward=reward,
    )


# Two prompts x (favoured "good!!", disfavoured "bad..."), equal completion lengths.
GOOD, BAD = "good!!", "bad..."


def preference_batch() -> TrainBatch:
    return collate(
        [
            scored("g0", "Say:", GOOD, 1.0, version=5),
            scored("g0", "Say:", BAD, 0.0, version=7),
            scored("g1", "Tell me", GOOD, 1.0, version=6),
            scored("g1", "Tell me", BAD, 0.0, version=7),
        ],
        pad_id=TOKENIZER.pad_token_id,
    )


def ragged_batch() -> TrainBatch:
    """Prompts and completions of different lengths, four groups' worth of rewards."""
    return collate(
        [
            scored("a", "Hi", "there you", 0.3, version=2),
            scored("a", "Hi", "x", -0.7, version=3),
            scored("b", "A longer prompt", "abc", 1.5, version=3),
            scored("b", "A longer prompt", "zz top!", 0.1, version=1),
        ],
        pad_id=TOKENIZER.pad_token_id,
    )


def learner_cfg(**overrides) -> LearnerSection:
    base = dict(lr=1e-2, kl_coef=0.0, device="cpu")
    base.update(overrides)
    return LearnerSection(**base)


def make_trainer(cfg: LearnerSection, *, seed: int = 0, **kw) -> PPOTrainer:
    policy = build_tiny_model(TOKENIZER, seed=seed)
    reference = copy.deepcopy(policy)
    return PPOTrainer(policy, reference, cfg, **kw)


@torch.no_grad()
def policy_logprobs(model, batch: TrainBatch) -> torch.Tensor:
    return forward_completions(model, batch).logprobs * batch.mask


def on_policy(trainer: PPOTrainer, batch: TrainBatch) -> TrainBatch:
    """``batch`` with behaviour log-probs replaced by the trainer's current policy's."""
    batch.behaviour_logprobs = policy_logprobs(trainer.policy, batch)
    return batch


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- (a) on-policy


@pytest.mark.parametrize("correction", ["none", "tis", "decoupled"])
def test_on_policy_step_diagnostics(correction):
    trainer = make_trainer(learner_cfg(correction=correction, kl_coef=0.1))
    batch = on_policy(trainer, ragged_batch())
    stats = trainer.step(batch, current_version=4)
    assert stats["importance_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["importance_ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert stats["truncated_fraction"] == 0.0
    assert stats["ess_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert stats["ess"] == pytest.approx(float(batch.mask.sum()), abs=1e-3)
    assert stats["clip_fraction"] == 0.0  # first (only) update: pi == pi_old
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at step 0
    assert stats["kl_coef"] == 0.1
    # versions [2, 3, 3, 1] at learner version 4 -> staleness [2, 1, 1, 3]
    assert stats["staleness_min"] == 1.0
    assert stats["staleness_mean"] == 1.75
    assert stats["staleness_max"] == 3.0
    scores = np.array([0.3, -0.7, 1.5, 0.1], np.float32)
    assert stats["reward_mean"] == pytest.approx(float(scores.mean()), abs=1e-6)
    assert stats["reward_std"] == pytest.approx(float(scores.std()), abs=1e-6)
    assert stats["samples"] == 4.0
    assert stats["tokens"] == 9 + 1 + 3 + 7
    assert stats["completion_tokens_mean"] == 20 / 4
    assert stats["optimizer_updates"] == 1.0
    assert stats["skipped_updates"] == 0.0
    assert math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert math.isfinite(stats["loss/total"])


def test_reported_kl_is_masked_mean_of_k1_against_reference():
    trainer = make_trainer(learner_cfg())
    batch = ragged_batch()
    trainer.step(on_policy(trainer, batch), current_version=3)  # policy moves away from reference
    pi = policy_logprobs(trainer.policy, batch)
    ref = policy_logprobs(trainer.reference, batch)
    expected = float(((pi - ref) * batch.mask).sum() / batch.mask.sum())
    assert abs(expected) > 1e-3
    stats = trainer.step(on_policy(trainer, batch), current_version=4)
    assert stats["kl"] == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- (b) parameters


def test_step_updates_policy_only():
    trainer = make_trainer(learner_cfg(kl_coef=0.05))
    policy_before, ref_before = params(trainer.policy), params(trainer.reference)
    trainer.step(on_policy(trainer, preference_batch()), current_version=7)
    assert not same(params(trainer.policy), policy_before)
    changed = sum(not torch.equal(a, b) for a, b in zip(params(trainer.policy), policy_before))
    assert changed >= len(policy_before) // 2
    assert same(params(trainer.reference), ref_before)
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    assert all(p.grad is None for p in trainer.reference.parameters())


# --------------------------------------------------------------------------- (c) learning


def summed_logprobs(trainer: PPOTrainer, batch: TrainBatch) -> torch.Tensor:
    return policy_logprobs(trainer.policy, batch).sum(1)  # [B]


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "gae"])
@pytest.mark.parametrize("stale", [False, True], ids=["on_policy", "stale_decoupled"])
def test_steps_raise_logprob_of_rewarded_completion(advantage, stale):
    trainer = make_trainer(learner_cfg(advantage=advantage, correction="decoupled", lr=3e-3))
    batch = on_policy(trainer, preference_batch())
    good = torch.tensor([0, 2])  # rows with the rewarded completion
    bad = torch.tensor([1, 3])
    before = summed_logprobs(trainer, batch)
    for step in range(5):
        if not stale:  # else keep the step-0 behaviour log-probs: mu falls behind pi
            on_policy(trainer, batch)
        stats = trainer.step(batch, current_version=7 + step)
        assert math.isfinite(stats["loss/total"])
    after = summed_logprobs(trainer, batch)
    assert (after[good] > before[good] + 1.0).all(), (before, after)
    assert (after[bad] < before[bad] - 1.0).all(), (before, after)
    if stale:
        assert stats["importance_ratio_mean"] != pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- (d) stale data


def shifted_batch(trainer: PPOTrainer) -> tuple[TrainBatch, torch.Tensor]:
    """On-policy batch, then mu := pi + shift with shift +0.5 on some tokens and -1.0 on
    others. Returns the batch and the shift ``[B, T]``."""
    batch = on_policy(trainer, ragged_batch())
    shift = torch.zeros_like(batch.mask)
    shift[0, 0] = shift[0, 4] = shift[2, 1] = 0.5  # ratio pi_old/mu = e^-0.5
    shift[3, 6] = shift[0, 8] = -1.0  # ratio e^1 > is_cap = 2: truncated
    assert torch.all(batch.mask[shift != 0] == 1)
    batch.behaviour_logprobs = batch.behaviour_logprobs + shift
    return batch, shift


def test_stale_decoupled_ratio_stats_match_hand_computation():
    trainer = make_trainer(learner_cfg(correction="decoupled", is_cap=2.0))
    batch, shift = shifted_batch(trainer)
    n = float(batch.mask.sum())  # 20 tokens: 15 with ratio 1, 3 with e^-0.5, 2 with e
    assert n == 20
    ratios = [1.0] * 15 + [math.exp(-0.5)] * 3 + [math.e] * 2
    weights = [min(r, 2.0) for r in ratios]
    stats = trainer.step(batch, current_version=3)
    assert stats["importance_ratio_mean"] == pytest.approx(sum(ratios) / n, abs=1e-4)
    assert stats["importance_ratio_max"] == pytest.approx(math.e, abs=1e-4)
    assert stats["truncated_fraction"] == pytest.approx(2 / 20, abs=1e-12)
    ess = sum(weights) ** 2 / sum(w * w for w in weights)
    assert stats["ess"] == pytest.approx(ess, abs=1e-3)
    assert stats["ess_fraction"] == pytest.approx(ess / n, abs=1e-4)


def test_stale_tis_uses_sequence_weights():
    trainer = make_trainer(learner_cfg(correction="tis", is_cap=2.0))
    batch, shift = shifted_batch(trainer)
    # per sequence: exp(sum_t (pi_old - mu)) = exp(-sum shift), broadcast to its tokens
    seq_w = torch.exp(-shift.double().sum(1))  # rows: e^(-1+1)... computed below
    lengths = batch.mask.sum(1).double()
    expected_mean = float((seq_w * lengths).sum() / lengths.sum())
    expected_max = float(seq_w.max())
    truncated = float(lengths[seq_w > 2.0].sum() / lengths.sum())
    # row 0: 0.5+0.5-1.0 = 0 -> w 1; row 2: +0.5 -> e^-0.5; row 3: -1 -> e (truncated, 7 tokens)
    assert truncated == pytest.approx(7 / 20)
    stats = trainer.step(batch, current_version=3)
    assert stats["importance_ratio_mean"] == pytest.approx(expected_mean, abs=1e-4)
    assert stats["importance_ratio_max"] == pytest.approx(expected_max, abs=1e-4)
    assert stats["truncated_fraction"] == pytest.approx(truncated, abs=1e-12)


def test_correction_none_never_truncates_but_reports_raw_ratio():
    trainer = make_trainer(learner_cfg(correction="none", is_cap=2.0))
    batch, _ = shifted_batch(trainer)
    stats = trainer.step(batch, current_version=3)
    ratios = [1.0] * 15 + [math.exp(-0.5)] * 3 + [math.e] * 2
    assert stats["truncated_fraction"] == 0.0
    assert stats["importance_ratio_mean"] == pytest.approx(sum(ratios) / 20, abs=1e-4)
    # r = pi/mu is the clipped ratio here: 5 tokens have |r - 1| > 0.2
    assert stats["clip_fraction"] == pytest.approx(5 / 20, abs=1e-12)


# --------------------------------------------------------------------------- (e) state


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_state_dict_round_trip_reproduces_next_step(advantage):
    cfg = learner_cfg(
        advantage=advantage, kl_coef=0.1, kl_target_per_sequence=0.01, kl_horizon=10, minibatches=2, lr=3e-3
    )
    first = make_trainer(cfg)
    first.step(on_policy(first, ragged_batch()), current_version=3)
    first.step(on_policy(first, preference_batch()), current_version=8)
    assert first.kl_controller.value != 0.1  # the adaptive controller moved
    assert first.reward_stats.count == 8

    # a fresh trainer: same policy weights, the initial reference, loaded trainer state
    policy = build_tiny_model(TOKENIZER, seed=0)
    policy.load_state_dict(first.policy.state_dict())
    second = PPOTrainer(policy, copy.deepcopy(first.reference), cfg)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    # a fresh trainer without the state: the control that the state matters
    policy3 = build_tiny_model(TOKENIZER, seed=0)
    policy3.load_state_dict(first.policy.state_dict())
    third = PPOTrainer(policy3, copy.deepcopy(first.reference), cfg)

    results = []
    for trainer in (first, second, third):
        batch = on_policy(trainer, ragged_batch())
        torch.manual_seed(1234)  # minibatch shuffling
        results.append((trainer.step(batch, current_version=9), params(trainer.policy)))
    (s1, p1), (s2, p2), (s3, p3) = results
    assert s2["loss/total"] == s1["loss/total"]
    assert s2["loss/policy"] == s1["loss/policy"]
    assert s2["kl_coef"] == s1["kl_coef"]
    assert same(p1, p2)
    assert second.kl_controller.value == first.kl_controller.value
    assert second.reward_stats.state_dict() == first.reward_stats.state_dict()
    assert not same(p1, p3)
    assert s3["kl_coef"] != s1["kl_coef"]


# --------------------------------------------------------------------------- (f) updates


@pytest.mark.parametrize("epochs,minibatches", [(1, 1), (2, 2), (3, 1), (1, 4), (2, 3)])
def test_optimizer_update_count(epochs, minibatches):
    trainer = make_trainer(learner_cfg(ppo_epochs=epochs, minibatches=minibatches))
    calls = []
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    stats = trainer.step(on_policy(trainer, ragged_batch()), current_version=3)
    assert stats["optimizer_updates"] == epochs * minibatches
    assert len(calls) == epochs * minibatches


def test_later_epochs_see_moved_policy():
    """Epoch 2 re-uses the data with pi != pi_old: approx_kl averaged over updates > 0."""
    trainer = make_trainer(learner_cfg(ppo_epochs=2, minibatches=2))
    stats = trainer.step(on_policy(trainer, ragged_batch()), current_version=3)
    assert stats["approx_kl"] > 0


# --------------------------------------------------------------------------- (g) zero advantage


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_equal_rewards_in_every_group_leave_policy_unchanged(advantage):
    trainer = make_trainer(learner_cfg(advantage=advantage, entropy_coef=0.0, kl_coef=0.0, ppo_epochs=2, minibatches=2))
    batch = preference_batch()
    batch.scores = torch.tensor([0.7, 0.7, -2.0, -2.0])  # equal within each group
    batch = on_policy(trainer, batch)
    before = params(trainer.policy)
    stats = trainer.step(batch, current_version=7)
    assert stats["loss/policy"] == 0.0
    assert same(params(trainer.policy), before)


def test_entropy_bonus_alone_moves_policy_with_zero_advantages():
    """Control for the test above: the same batch with entropy_coef > 0 does change the policy."""
    trainer = make_trainer(learner_cfg(entropy_coef=0.1, kl_coef=0.0))
    batch = preference_batch()
    batch.scores = torch.tensor([0.7, 0.7, -2.0, -2.0])
    before = params(trainer.policy)
    trainer.step(on_policy(trainer, batch), current_version=7)
    assert not same(params(trainer.policy), before)


# --------------------------------------------------------------------------- KL as loss, PPO-ptx


def test_kl_loss_term_zero_at_start():
    trainer = make_trainer(learner_cfg(kl_penalty="loss", kl_coef=0.2, kl_estimator="k3"))
    stats = trainer.step(on_policy(trainer, ragged_batch()), current_version=3)
    assert stats["loss/kl"] == pytest.approx(0.0, abs=1e-7)


def test_ptx_loss_is_token_mean_nll_of_sft_batch():
    text = [ids("hello world"), ids("abc")]
    input_ids = torch.zeros(2, 11, dtype=torch.long)
    attention = torch.zeros(2, 11, dtype=torch.long)
    for i, row in enumerate(text):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    ptx = PtxBatch(input_ids=input_ids, attention_mask=attention)
    trainer = make_trainer(learner_cfg(ptx_coef=0.5), ptx_sampler=lambda: ptx)
    # slow reference: per-row unpadded NLL of next-token predictions, token mean
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in text:
            logits = trainer.policy(input_ids=torch.tensor([row])).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1)
            nll -= float(logp.gather(-1, torch.tensor(row[1:])[:, None]).sum())
            count += len(row) - 1
    stats = trainer.step(on_policy(trainer, ragged_batch()), current_version=3)
    assert stats["loss/ptx"] == pytest.approx(nll / count, abs=1e-5)


def test_kl_loss_with_k1_is_refused_with_the_fix():
    """k1 as a loss term has expected gradient 0: the config refuses the combination."""
    with pytest.raises(ValueError, match="kl_estimator") as err:
        LearnerSection(kl_penalty="loss", kl_estimator="k1")
    assert "k2" in str(err.value) and "k3" in str(err.value)
    for estimator in ("k2", "k3"):
        assert LearnerSection(kl_penalty="loss", kl_estimator=estimator).kl_estimator.value == estimator
    assert LearnerSection(kl_penalty="reward", kl_estimator="k1").kl_penalty.value == "reward"


def test_disable_dropout_zeroes_every_dropout_and_keeps_eval_mode():
    from transformers import GPT2Config, GPT2LMHeadModel

    from streamrl.services.learner.trainer import disable_dropout

    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2)).train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.1 for m in dropouts)
    disable_dropout(model)
    assert all(m.p == 0.0 for m in dropouts) and not model.training
    ids = torch.arange(10).unsqueeze(0)
    model.train()  # even if someone switches it back, the Dropout modules are off
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_trainer_models_stay_in_eval_mode():
    trainer = make_trainer(learner_cfg(advantage="gae"))
    trainer.step(on_policy(trainer, ragged_batch()), current_version=3)
    for model in (trainer.policy, trainer.reference, trainer.value_head):
        assert not any(m.training for m in model.modules())


def test_correction_none_with_a_huge_stale_ratio_is_finite_and_dual_clipped():
    """log(pi/mu) = 100 on every token: good rows (A = +1) are clipped at 1 + eps, bad rows
    (A = -1) are held at c = 3 by the dual clip: loss = mean(-1.2, +3) = 0.9, and the update
    is not skipped."""
    trainer = make_trainer(learner_cfg(correction="none", normalize_rewards=False))
    batch = on_policy(trainer, preference_batch())
    batch.behaviour_logprobs = batch.behaviour_logprobs - 100 * batch.mask
    stats = trainer.step(batch, current_version=7)
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["skipped_updates"] == 0.0
    assert stats["dual_clip_fraction"] == pytest.approx(0.5)
    assert stats["loss/policy"] == pytest.approx(0.9, abs=1e-4)


def test_adaptive_controller_is_fed_the_kl_per_sequence():
    """Ziegler et al. 2019 (and TRL) adapt beta on the KL of whole samples: the trainer
    gives the controller the mean over sequences of sum_t KL_t (nats per sequence)."""
    trainer = make_trainer(learner_cfg(kl_coef=0.1, kl_target_per_sequence=0.5, kl_horizon=10))
    batch = ragged_batch()
    trainer.step(on_policy(trainer, batch), current_version=3)  # the policy leaves the reference
    pi, ref = policy_logprobs(trainer.policy, batch), policy_logprobs(trainer.reference, batch)
    per_sequence = float(((pi - ref) * batch.mask).sum(1).mean())
    beta = trainer.kl_controller.value
    stats = trainer.step(on_policy(trainer, batch), current_version=4)
    assert stats["kl_per_sequence"] == pytest.approx(per_sequence, abs=1e-5)
    error = min(max(per_sequence / 0.5 - 1, -0.2), 0.2)
    assert trainer.kl_controller.value == pytest.approx(beta * (1 + error * 4 / 10), rel=1e-6)
    per_token = float(((pi - ref) * batch.mask).sum() / batch.mask.sum())
    assert abs(per_sequence - per_token) > 1e-3  # the units differ on this batch


def test_tis_per_token_equals_decoupled_on_stale_data():
    stats = {}
    for name, cfg in {
        "tis_token": learner_cfg(correction="tis", is_level="token"),
        "decoupled": learner_cfg(correction="decoupled"),
    }.items():
        trainer = make_trainer(cfg)
        batch, _ = shifted_batch(trainer)
        stats[name] = trainer.step(batch, current_version=3)
    for key in ("loss/policy", "importance_ratio_mean", "truncated_fraction", "ess"):
        assert stats["tis_token"][key] == pytest.approx(stats["decoupled"][key], abs=1e-6), key
    assert stats["tis_token"]["truncated_fraction"] == pytest.approx(2 / 20)


def test_mask_mode_drops_the_tokens_over_the_cap():
    """shifted_batch: 2 of 20 tokens have pi_old/mu = e > C = 2: masked (weight 0), logged."""
    trainer = make_trainer(learner_cfg(correction="decoupled", is_mode="mask"))
    batch, _ = shifted_batch(trainer)
    stats = trainer.step(batch, current_version=3)
    assert stats["masked_fraction"] == pytest.approx(2 / 20)
    assert stats["truncated_fraction"] == 0.0
    weights = [1.0] * 15 + [math.exp(-0.5)] * 3 + [0.0] * 2
    assert stats["ess"] == pytest.approx(sum(weights) ** 2 / sum(w * w for w in weights), abs=1e-3)


def test_is_options_apply_only_to_their_corrections():
    with pytest.raises(ValueError, match="is_level"):
        LearnerSection(correction="decoupled", is_level="token")
    with pytest.raises(ValueError, match="is_mode"):
        LearnerSection(correction="none", is_mode="mask")
    assert LearnerSection(correction="tis", is_level="token", is_mode="mask").is_mode.value == "mask"


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "fixed_length_sum"])
def test_loss_aggregation_reaches_the_policy_loss(aggregation):
    """First update on-policy: r = w = 1, so loss/policy = -aggregate(A) in the chosen mode
    (fixed_length_sum: over rows x max(max_new_tokens 8, longest completion 9))."""
    from streamrl.services.learner.losses import aggregate_tokens

    cfg = learner_cfg(loss_aggregation=aggregation)
    probe = make_trainer(cfg)
    expected = -aggregate_tokens(
        probe.targets(on_policy(probe, ragged_batch())).advantages, ragged_batch().mask, aggregation, max_tokens=9
    )
    trainer = make_trainer(cfg)
    stats = trainer.step(on_policy(trainer, ragged_batch()), current_version=3)
    assert stats["loss/policy"] == pytest.approx(expected.item(), abs=1e-6)


def test_scale_rewards_options_reach_the_advantages():
    batch = preference_batch()
    batch.scores = torch.tensor([1.0, 0.0, 3.0, 0.0])  # group stds 0.5 and 1.5, batch std 1.2247
    advantages = {}
    for scale in ("group", "batch", "none"):
        trainer = make_trainer(learner_cfg(scale_rewards=scale, normalize_rewards=False))
        advantages[scale] = trainer.targets(on_policy(trainer, batch)).advantages[:, 0]
    torch.testing.assert_close(advantages["none"], torch.tensor([0.5, -0.5, 1.5, -1.5]))
    torch.testing.assert_close(advantages["group"], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    torch.testing.assert_close(advantages["batch"], torch.tensor([0.5, -0.5, 1.5, -1.5]) / math.sqrt(1.5))


def test_vtrace_targets_on_policy_equal_gae_returns_and_off_policy_use_the_ratios():
    """correction = "vtrace": on-policy the value targets are GAE's returns (c = lam); on
    stale data they are the V-trace recursion of pi_old / mu (checked against vtrace())."""
    from streamrl.services.learner.advantages import per_token_rewards, vtrace

    cfg = dict(advantage="gae", gamma=0.9, lam=0.95, kl_coef=0.1, whiten_advantages=False, normalize_rewards=False)
    gae_trainer = make_trainer(learner_cfg(**cfg))
    vt_trainer = make_trainer(learner_cfg(correction="vtrace", vtrace_rho_bar=1.5, vtrace_c_bar=1.0, **cfg))
    with torch.no_grad():  # a non-zero critic, the same in both
        for t in (gae_trainer, vt_trainer):
            weight = t.value_head.weight
            weight.copy_(torch.linspace(-0.1, 0.1, weight.numel()).view_as(weight))
    on = on_policy(gae_trainer, ragged_batch())
    g, v = gae_trainer.targets(on), vt_trainer.targets(copy.deepcopy(on))
    torch.testing.assert_close(v.returns, g.returns, atol=1e-5, rtol=0)
    assert not torch.allclose(v.advantages, g.advantages, atol=1e-3)  # rho (r + gamma v') - V, not GAE's

    stale, shift = shifted_batch(make_trainer(learner_cfg(**cfg)))
    trainer = make_trainer(learner_cfg(correction="vtrace", vtrace_rho_bar=1.5, vtrace_c_bar=1.0, **cfg))
    with torch.no_grad():
        trainer.value_head.weight.copy_(gae_trainer.value_head.weight)
    targets = trainer.targets(stale)
    kl = (targets.old.logprobs - targets.ref_logprobs) * stale.mask
    rewards = per_token_rewards(stale.scores, kl, stale.mask, kl_coef=0.1)
    vs, adv = vtrace(
        rewards,
        targets.old.values,
        targets.old.logprobs - stale.behaviour_logprobs,
        stale.mask,
        gamma=0.9,
        lam=0.95,
        rho_bar=1.5,
        c_bar=1.0,
    )
    torch.testing.assert_close(targets.returns, vs, atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.advantages, adv, atol=1e-5, rtol=0)
    stats = trainer.step(stale, current_version=3)
    assert stats["truncated_fraction"] == pytest.approx(2 / 20)  # pi_old/mu = e > rho_bar = 1.5 on 2 tokens
    assert math.isfinite(stats["loss/value"]) and math.isfinite(stats["loss/policy"])


def test_vtrace_needs_the_critic():
    with pytest.raises(ValueError, match="vtrace"):
        LearnerSection(correction="vtrace", advantage="grpo")


def bandit_vtrace_gradient(whiten: bool) -> float:
    """The one-step bandit of two actions, the better one first: pi_old = (.5, .5),
    mu = (.9, .1), rewards (1, 0), V = -0.5, rho-bar = 10. The batch holds the actions in
    mu's proportions (9 x A, 1 x B), so its token mean is the expectation under mu. The
    trainer's V-trace advantages (pi_old / mu set through the behaviour log-probs, V through
    the value head's bias) go into the policy loss of a two-logit softmax at pi_old; returns
    the ascent direction of the better action's logit, -d loss / d z_A."""
    trainer = make_trainer(
        learner_cfg(
            advantage="gae",
            correction="vtrace",
            vtrace_rho_bar=10.0,
            vtrace_c_bar=10.0,
            gamma=1.0,
            lam=1.0,
            normalize_rewards=False,
            reward_clip=None,
            whiten_advantages=whiten,
        )
    )
    batch = collate(
        [scored(f"g{i}", "x", "A" if i < 9 else "B", 1.0 if i < 9 else 0.0) for i in range(10)],
        pad_id=TOKENIZER.pad_token_id,
    )
    pi_old = torch.tensor([0.5] * 9 + [0.5]).log().unsqueeze(1)
    mu = torch.tensor([0.9] * 9 + [0.1]).log().unsqueeze(1)
    # log rho = log pi_old - log mu whatever the tiny model's own pi_old is
    batch.behaviour_logprobs = policy_logprobs(trainer.policy, batch) - (pi_old - mu)
    with torch.no_grad():
        trainer.value_head.bias.fill_(-0.5)
    advantages = trainer.targets(batch).advantages
    logits = torch.zeros(2, requires_grad=True)
    actions = torch.tensor([0] * 9 + [1])
    logprobs = torch.log_softmax(logits, -1)[actions].unsqueeze(1)
    loss, _ = policy_loss(logprobs, pi_old, mu, advantages, batch.mask, correction="vtrace", clip_eps=0.2, is_cap=10.0)
    loss.backward()
    return -float(logits.grad[0])


def test_vtrace_whitening_keeps_the_sign_of_the_policy_gradient():
    """By hand: A_s = rho_s (r_s - V): A = 0.5/0.9 * 1.5 = 5/6, B = 5 * 0.5 = 2.5; d log pi / d z_A =
    +0.5 (A), -0.5 (B); E_mu = 0.9 * 5/6 * 0.5 - 0.1 * 2.5 * 0.5 = +0.25. Subtracting the batch
    mean (E_mu A = 1, std 0.5) gave 0.9 * (-1/3) * 0.5 - 0.1 * 3 * 0.5 = -0.30: the better action
    pushed down. Whitening V-trace advantages only rescales them (1 / std): +0.25 / 0.5 = +0.5."""
    assert bandit_vtrace_gradient(whiten=False) == pytest.approx(0.25, abs=1e-5)
    assert bandit_vtrace_gradient(whiten=True) == pytest.approx(0.25 / 0.5, abs=1e-4)


class FixedDistribution(torch.nn.Module):
    """A stand-in causal LM whose next-token distribution is ``probs`` at every position
    (a constant hidden state 1 and an output projection holding the log-probabilities)."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.head = torch.nn.Linear(1, len(probs), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(probs).log().unsqueeze(1))
        self.base_model = lambda input_ids, attention_mask: SimpleNamespace(
            last_hidden_state=torch.ones(*input_ids.shape, 1)
        )

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def token_rollout(i: int, token: int, behaviour_logprob: float, top_p: float) -> ScoredRollout:
    return ScoredRollout(
        rollout=Rollout(
            prompt_id=f"p{i}",
            group_id=f"g{i}",
            rollout_id=f"r{i}",
            generator_id="g0",
            group_size=1,
            prompt_tokens=np.asarray([0], np.int32),
            completion_tokens=np.asarray([token], np.int32),
            behaviour_logprobs=np.asarray([behaviour_logprob], np.float32),
            policy_version=0,
            finish_reason=FinishReason.LENGTH,
            sampling=SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=1),
        ),
        reward=0.0,
    )


@pytest.mark.parametrize(
    "probs, ref, top_p, tokens, kl",
    [
        # one-token nucleus: pi_top-p = (1, 0); KL(pi_top-p || ref) = log(1 / 0.01) = 4.605 nats (the
        # untruncated KL(pi || ref) = 0.95 log(95) + 0.05 log(0.05 / 0.99) = 4.18); read under the
        # policy's nucleus the reference became (1, 0) too and the KL was 0
        ([0.95, 0.05], [0.01, 0.99], 0.5, [0], math.log(100.0)),
        # nucleus {A, B} of top_p 0.8: pi_top-p = (2/3, 1/3, 0), rows in those proportions, so the mean
        # of k1 is KL(pi_top-p || ref) = 2/3 log((2/3) / 0.2) + 1/3 log((1/3) / 0.3) = 0.8378
        (
            [0.6, 0.3, 0.1],
            [0.2, 0.3, 0.5],
            0.8,
            [0, 0, 1],
            2 / 3 * math.log((2 / 3) / 0.2) + 1 / 3 * math.log((1 / 3) / 0.3),
        ),
    ],
)
def test_kl_penalty_under_top_p_is_against_the_untruncated_reference(probs, ref, top_p, tokens, kl):
    assert kl > 0.8
    policy, reference = FixedDistribution(probs), FixedDistribution(ref)
    trainer = PPOTrainer(policy, reference, learner_cfg(kl_coef=0.1))
    kept = sum(sorted(probs, reverse=True)[: len(set(tokens))])
    batch = collate([token_rollout(i, t, math.log(probs[t] / kept), top_p) for i, t in enumerate(tokens)], pad_id=0)
    targets = trainer.targets(batch)
    torch.testing.assert_close(targets.old.logprobs, batch.behaviour_logprobs)  # pi_old = the sampler's mu
    assert targets.kl_mean == pytest.approx(kl, abs=1e-5)
    assert targets.kl_per_sequence == pytest.approx(kl, abs=1e-5)


def test_kl_loss_term_is_importance_weighted_to_the_policy():
    """kl_penalty = "loss", k2: the tokens come from mu = (.9, .1) (9 x A, 1 x B) while pi = pi_old
    = (.5, .5). Weighted by pi_old / mu, the term's gradient is E_pi[(log pi - log ref) grad log pi]
    = grad KL(pi || ref), computed here by autograd from the two distributions; unweighted it was
    E_mu[...] instead (by hand 0.9 * 0.916 * 0.5 - 0.1 * (-0.470) * 0.5 = 0.436 for d/dz_A, against
    0.5 * 0.916 * 0.5 + 0.5 * 0.470 * 0.5 = 0.347)."""
    pi, ref = [0.5, 0.5], [0.2, 0.8]
    trainer = PPOTrainer(
        FixedDistribution(pi),
        FixedDistribution(ref),
        learner_cfg(
            kl_penalty="loss", kl_estimator="k2", kl_coef=1.0, is_cap=10.0, max_grad_norm=1e6, normalize_rewards=False
        ),
    )
    tokens, mu = [0] * 9 + [1], [0.9, 0.1]
    batch = collate([token_rollout(i, t, math.log(mu[t]), 1.0) for i, t in enumerate(tokens)], pad_id=0)
    grads = []
    trainer.optimizer.step = lambda *a, **k: grads.append(trainer.policy.head.weight.grad.clone().squeeze(1))
    stats = trainer.step(batch, current_version=0)
    assert stats["loss/policy"] == 0.0  # groups of one: zero advantages, the KL term alone
    logits = torch.tensor(pi).log().requires_grad_()
    p = torch.softmax(logits, -1)
    (p * (p.log() - torch.tensor(ref).log())).sum().backward()
    torch.testing.assert_close(grads[0], logits.grad, atol=1e-5, rtol=0)
    assert float(grads[0][0]) == pytest.approx(0.5 * math.log(2.5) * 0.5 + 0.5 * math.log(0.5 / 0.8) * -0.5, abs=1e-5)
