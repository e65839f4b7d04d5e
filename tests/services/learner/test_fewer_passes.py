"""Fewer and cheaper learner passes: the first minibatch's forward pass reused as
pi_old gives the same step as a separate pi_old pass; length buckets carry less padding."""

from __future__ import annotations

import pytest
import torch

from streamrl.common.config import LearnerSection
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.services.learner import trainer as trainer_module
from streamrl.services.learner.batch import collate
from streamrl.services.learner.trainer import PPOTrainer
from support import PROMPT_COMPLETIONS, text_rollout

TOKENIZER = build_char_tokenizer()
PAD = TOKENIZER.pad_token_id
TEXTS = PROMPT_COMPLETIONS


def batch(top_p: float = 1.0):
    items = [
        text_rollout(TOKENIZER, i, p, c, reward=float(i % 3), behaviour_logprob=-2.0, temperature=0.8, top_p=top_p)
        for i, (p, c) in enumerate(TEXTS)
    ]
    return collate(items, pad_id=PAD)


def run(cfg: LearnerSection, *, top_p: float = 1.0, count=None):
    torch.manual_seed(0)
    policy = build_tiny_model(TOKENIZER, seed=0)
    reference = build_tiny_model(TOKENIZER, seed=1)
    trainer = PPOTrainer(policy, reference, cfg)
    torch.manual_seed(7)
    stats = trainer.step(batch(top_p), current_version=0)
    return stats, trainer.policy.state_dict()


@pytest.mark.parametrize(
    "advantage,minibatches,epochs,top_p",
    [("grpo", 2, 1, 1.0), ("grpo", 4, 2, 1.0), ("gae", 2, 2, 1.0), ("grpo", 1, 1, 1.0), ("gae", 2, 2, 0.9)],
)
def test_reusing_the_first_pass_gives_the_same_step(advantage, minibatches, epochs, top_p):
    base = dict(lr=1e-2, kl_coef=0.1, advantage=advantage, minibatches=minibatches, ppo_epochs=epochs, device="cpu")
    s0, w0 = run(LearnerSection(**base, reuse_first_pass=False), top_p=top_p)
    s1, w1 = run(LearnerSection(**base, reuse_first_pass=True), top_p=top_p)
    for key in ("kl", "loss/total", "loss/policy", "clip_fraction", "importance_ratio_mean", "grad_norm", "entropy"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-5), key
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-4, rtol=1e-3)


def test_the_pi_old_pass_covers_only_the_rows_outside_the_first_minibatch(monkeypatch):
    rows_seen = []
    real = trainer_module.forward_completions

    def counting(model, mb, **kw):
        if not torch.is_grad_enabled():
            rows_seen.append(mb.size)
        return real(model, mb, **kw)

    monkeypatch.setattr(trainer_module, "forward_completions", counting)
    cfg = dict(lr=1e-2, minibatches=4, device="cpu")
    run(LearnerSection(**cfg, reuse_first_pass=True))
    # 8 rows, first minibatch of 2 reused: the no-grad policy pass sees 6 (the reference arrives with none here,
    # so the learner's reference pass sees all 8)
    assert rows_seen == [6, 8]
    rows_seen.clear()
    run(LearnerSection(**cfg, reuse_first_pass=False))
    assert rows_seen == [8, 8]
    rows_seen.clear()
    run(LearnerSection(**cfg, reuse_first_pass=True), top_p=0.9)  # the untruncated reference needs no pi_old
    assert rows_seen == [6, 8]


def test_length_buckets_carry_less_padding():
    cfg = LearnerSection(lr=1e-2, minibatches=4, device="cpu", bucket_by_length=True)
    trainer = PPOTrainer(build_tiny_model(TOKENIZER, seed=0), build_tiny_model(TOKENIZER, seed=1), cfg)
    b = batch()
    lengths = b.attention_mask.sum(1)

    def padding(parts):
        return sum(int((lengths[rows].max() - lengths[rows]).sum()) for rows in parts)

    torch.manual_seed(0)
    random_pad = [
        padding(
            PPOTrainer(trainer.policy, trainer.reference, LearnerSection(lr=1e-2, minibatches=4, device="cpu"))._order(
                b
            )
        )
        for _ in range(20)
    ]
    for _ in range(20):
        parts = trainer._order(b)
        assert sorted(torch.cat(parts).tolist()) == list(range(b.size))  # every row once
        assert padding(parts) <= min(random_pad)
    # sorted and split: the minimum possible for 4 parts of 2 rows of these lengths
    ordered = sorted(lengths.tolist())
    assert padding(trainer._order(b)) == sum(ordered[i + 1] - ordered[i] for i in range(0, 8, 2))


def test_bf16_autocast_is_opt_in_and_close_to_fp32():
    assert LearnerSection().autocast_bf16 is False
    base = dict(lr=1e-2, kl_coef=0.1, minibatches=2, device="cpu")
    s32, _ = run(LearnerSection(**base))
    s16, w16 = run(LearnerSection(**base, autocast_bf16=True))
    assert all(torch.isfinite(w).all() for w in w16.values())
    assert s16["kl"] == pytest.approx(s32["kl"], rel=0.05, abs=1e-3)  # bf16's error, not another computation
    assert s16["loss/total"] == pytest.approx(s32["loss/total"], rel=0.05, abs=1e-3)
