"""Tests for services/learner/advantages.py."""

from __future__ import annotations

import math

import pytest
import torch
from support import fill_garbage, ragged_mask

from streamrl.common.modes import AdvantageEstimator
from streamrl.services.learner.advantages import gae, group_advantages, per_token_rewards

ATOL = 1e-6


def gae_reference(rewards, values, lengths, gamma, lam):
    """Plain python double loop: one episode per row, V = 0 after the last token."""
    b_size, t_size = rewards.shape
    adv = [[0.0] * t_size for _ in range(b_size)]
    for b in range(b_size):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b][t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t].item() + gamma * next_v - values[b][t].item()
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [
        [adv[b][t] + values[b][t].item() if t < lengths[b] else 0.0 for t in range(t_size)]
        for b in range(b_size)
    ]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


# --------------------------------------------------------------------------- gae


def test_gae_hand_computed_three_tokens():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma = 0.9, lam = 0.8 (gamma*lam = 0.72)
    # delta2 = 1 + 0.9*0     - 0.7 = 0.3
    # delta1 = 0 + 0.9*0.7   - 0.6 = 0.03
    # delta0 = 0 + 0.9*0.6   - 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712
    # R = A + V = [0.71712, 0.846, 1.0]
    # a 4th padded column holds garbage
    rewards = torch.tensor([[0.0, 0.0, 1.0, math.nan]])
    values = torch.tensor([[0.5, 0.6, 0.7, math.inf]])
    mask = ragged_mask([3], 4)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0]]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_python_double_loop(gamma, lam):
    g = torch.Generator().manual_seed(10)
    lengths = [7, 1, 4, 0, 7, 3]
    t = 7
    mask = ragged_mask(lengths, t)
    rewards = torch.randn(len(lengths), t, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), t, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-12, rtol=0)


def test_gae_lambda_one_gives_monte_carlo_returns():
    # gamma = lam = 1: R_t = sum_{k >= t} r_k (reward-to-go), A_t = R_t - V_t
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, -1.0, 2.0], [1.0, 9.0, 9.0]])
    mask = ragged_mask([3, 1], 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[5.5, 6.0, 1.0], [3.0, 0.0, 0.0]]))


def test_gae_garbage_in_padding_changes_nothing_and_output_is_detached():
    g = torch.Generator().manual_seed(11)
    mask = ragged_mask([5, 2, 3], 5)
    rewards = torch.randn(3, 5, generator=g)
    values = torch.randn(3, 5, generator=g, requires_grad=True)
    clean = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    dirty = gae(fill_garbage(rewards, mask), fill_garbage(values.detach(), mask), mask.float(),
                gamma=0.99, lam=0.95)
    assert torch.isfinite(clean[0]).all()
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    assert not clean[0].requires_grad and not clean[1].requires_grad


def test_gae_rejects_bad_input():
    r = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="right-padded"):
        gae(r, r, torch.tensor([[0, 1, 1]]), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, torch.ones(1, 3), gamma=1.5, lam=1.0)
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, torch.ones(1, 3), gamma=1.0, lam=-0.1)
    with pytest.raises(ValueError, match="shape"):
        gae(r, torch.zeros(1, 2), torch.ones(1, 3), gamma=1.0, lam=1.0)


# --------------------------------------------------------------------------- group_advantages


SCORES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
GROUPS = torch.tensor([7, 3, 7, 3, 7])  # interleaved, sizes 3 and 2


def test_grpo_hand_computed():
    # group 7: [1, 3, 5], mean 3, population std sqrt((4 + 0 + 4)/3) = sqrt(8/3) = 1.6329932
    # group 3: [2, 4],    mean 3, population std 1
    s73 = math.sqrt(8 / 3)
    expected = torch.tensor([-2 / s73, -1.0, 0.0, 1.0, 2 / s73])
    out = group_advantages(SCORES, GROUPS, estimator=AdvantageEstimator.GRPO)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert out.dtype == torch.float32


def test_grpo_without_std_scaling_is_mean_centred():
    # Dr. GRPO: s - mean_g = [1-3, 2-3, 3-3, 4-3, 5-3]
    out = group_advantages(SCORES, GROUPS, estimator="grpo", scale="none")
    torch.testing.assert_close(out, torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]), atol=ATOL, rtol=0)


def test_grpo_batch_scale_divides_by_the_std_of_all_scores():
    # TRL scale_rewards = "batch": centred per group, scaled by the std of the whole batch's
    # scores [1..5]: population std sqrt(2)
    out = group_advantages(SCORES, GROUPS, estimator="grpo", scale="batch")
    torch.testing.assert_close(out, torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]) / math.sqrt(2), atol=ATOL, rtol=0)


def test_grpo_near_identical_group_rewards_give_near_zero_advantages():
    """A 1e-6 spread (float noise of a reward model) must not become +-0.5 or +-1
    advantages: the std is floored at std_floor (1e-3 by default)."""
    scores = torch.tensor([0.3, 0.3 + 1e-6, 2.0, 3.0], dtype=torch.float64)
    out = group_advantages(scores, torch.tensor([0, 0, 1, 1]), estimator="grpo")
    assert out[:2].abs().max().item() < 1e-3
    torch.testing.assert_close(out[2:], torch.tensor([-1.0, 1.0], dtype=torch.float64), atol=1e-9, rtol=0)
    floored = group_advantages(scores, torch.tensor([0, 0, 1, 1]), estimator="grpo", std_floor=1e-2)
    assert floored[0].item() == pytest.approx(-0.5e-6 / 1e-2, rel=1e-6)


def test_grpo_constant_group_and_singleton_give_zero():
    scores = torch.tensor([0.7, 0.7, 0.7, 5.0])
    out = group_advantages(scores, torch.tensor([1, 1, 1, 2]), estimator=AdvantageEstimator.GRPO)
    assert torch.equal(out, torch.zeros(4))


def test_rloo_hand_computed():
    # group 7 [1, 3, 5]: 1 - (3+5)/2 = -3; 3 - (1+5)/2 = 0; 5 - (1+3)/2 = 3
    # group 3 [2, 4]:    2 - 4 = -2;       4 - 2 = 2
    out = group_advantages(SCORES, GROUPS, estimator=AdvantageEstimator.RLOO)
    torch.testing.assert_close(out, torch.tensor([-3.0, -2.0, 0.0, 2.0, 3.0]), atol=ATOL, rtol=0)


def test_rloo_equals_scaled_mean_centring_on_random_data():
    """Identity: s_i - (sum_g - s_i)/(n-1) = n/(n-1) * (s_i - mean_g)."""
    g = torch.Generator().manual_seed(12)
    sizes = [2, 5, 3, 8]
    ids = torch.cat([torch.full((n,), 100 + k) for k, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=g)
    ids = ids[perm]
    scores = torch.randn(len(ids), generator=g, dtype=torch.float64)
    out = group_advantages(scores, ids, estimator=AdvantageEstimator.RLOO)
    for gid in ids.unique():
        sel = ids == gid
        n = int(sel.sum())
        expected = n / (n - 1) * (scores[sel] - scores[sel].mean())
        torch.testing.assert_close(out[sel], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("estimator", [AdvantageEstimator.GRPO, AdvantageEstimator.RLOO])
def test_group_advantages_permutation_equivariant(estimator):
    g = torch.Generator().manual_seed(13)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    scores = torch.randn(9, generator=g)
    perm = torch.randperm(9, generator=g)
    out = group_advantages(scores, ids, estimator=estimator)
    out_perm = group_advantages(scores[perm], ids[perm], estimator=estimator)
    torch.testing.assert_close(out_perm, out[perm], atol=ATOL, rtol=0)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), estimator="rloo")
    with pytest.raises(ValueError, match="gae"):
        group_advantages(SCORES, GROUPS, estimator=AdvantageEstimator.GAE)
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]), estimator="grpo")
    with pytest.raises(ValueError, match="integer"):
        group_advantages(SCORES, GROUPS.float(), estimator="grpo")
    with pytest.raises(ValueError, match="shape"):
        group_advantages(SCORES, GROUPS[:3], estimator="grpo")


# --------------------------------------------------------------------------- per_token_rewards


def test_per_token_rewards_hand_computed():
    # row 0, len 3: -0.1 * [0.5, -0.2, 1.0] = [-0.05, 0.02, -0.1], + score 1.0 on t=2 -> 0.9
    # row 1, len 1: -0.1 * 2.0 = -0.2, + score -3.0 on t=0 -> -3.2; padding stays 0
    scores = torch.tensor([1.0, -3.0])
    kl = torch.tensor([[0.5, -0.2, 1.0], [2.0, math.nan, math.inf]])
    mask = ragged_mask([3, 1], 3)
    out = per_token_rewards(scores, kl, mask, kl_coef=0.1)
    torch.testing.assert_close(
        out, torch.tensor([[-0.05, 0.02, 0.9], [-3.2, 0.0, 0.0]]), atol=ATOL, rtol=0
    )
    # no KL: score only on the last real token
    out0 = per_token_rewards(scores, None, mask.float(), kl_coef=0.1)
    assert torch.equal(out0, torch.tensor([[0.0, 0.0, 1.0], [-3.0, 0.0, 0.0]]))


def test_per_token_rewards_then_gae_credits_score_to_all_tokens():
    # gamma = lam = 1, V = 0: A_t = reward-to-go = score - kl_coef * sum_{k>=t} kl_k
    scores = torch.tensor([2.0])
    kl = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    r = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    adv, _ = gae(r, torch.zeros(1, 3), mask, gamma=1.0, lam=1.0)
    # [2 - 1.5, 2 - 1.0, 2 - 0.5]
    torch.testing.assert_close(adv, torch.tensor([[0.5, 1.0, 1.5]]), atol=ATOL, rtol=0)


def test_per_token_rewards_errors():
    mask = ragged_mask([2, 0], 2)
    with pytest.raises(ValueError, match="no real token"):
        per_token_rewards(torch.zeros(2), None, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="right-padded"):
        per_token_rewards(torch.zeros(1), None, torch.tensor([[0, 1]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        per_token_rewards(torch.zeros(1), None, torch.ones(1, 2), kl_coef=-1.0)
    with pytest.raises(ValueError, match="shape"):
        per_token_rewards(torch.zeros(3), None, torch.ones(1, 2), kl_coef=0.1)
