"""Tests for services/learner/advantages.py."""

from __future__ import annotations

import math

import pytest
import torch

from streamrl.common.modes import AdvantageEstimator
from streamrl.services.learner.advantages import gae, group_advantages, per_token_rewards, vtrace
from support import fill_garbage, ragged_mask

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
    ret = [[adv[b][t] + values[b][t].item() if t < lengths[b] else 0.0 for t in range(t_size)] for b in range(b_size)]
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
    dirty = gae(fill_garbage(rewards, mask), fill_garbage(values.detach(), mask), mask.float(), gamma=0.99, lam=0.95)
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
    torch.testing.assert_close(out, torch.tensor([[-0.05, 0.02, 0.9], [-3.2, 0.0, 0.0]]), atol=ATOL, rtol=0)
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


# --------------------------------------------------------------------------- V-trace


def vtrace_reference(rewards, values, log_rhos, lengths, bootstrap, gamma, lam, rho_bar, c_bar):
    """The n-step V-trace target of IMPALA (Espeholt et al. 2018), eq. 1, as written: for each
    s a sum over t >= s of gamma^(t-s) (prod_{i=s}^{t-1} c_i) delta_t V, with
    delta_t V = rho_t (r_t + gamma V(x_{t+1}) - V(x_t)), rho_t = min(rho_bar, pi/mu),
    c_i = lam min(c_bar, pi/mu), n = to the end of the row (V after it: the bootstrap);
    the policy-gradient advantage rho_s (r_s + gamma v_{s+1} - V(x_s)) (sec. 4.2)."""
    b_size, t_size = rewards.shape
    vs = [[0.0] * t_size for _ in range(b_size)]
    adv = [[0.0] * t_size for _ in range(b_size)]
    for b in range(b_size):
        n = lengths[b]
        ratio = [math.exp(log_rhos[b][t].item()) for t in range(n)]
        rho = [min(rho_bar, r) for r in ratio]
        c = [lam * min(c_bar, r) for r in ratio]
        value = [values[b][t].item() for t in range(n)] + [float(bootstrap[b])]
        delta = [rho[t] * (rewards[b][t].item() + gamma * value[t + 1] - value[t]) for t in range(n)]
        for s in range(n):
            total = 0.0
            for t in range(s, n):
                total += gamma ** (t - s) * math.prod(c[s:t]) * delta[t]
            vs[b][s] = value[s] + total
        for s in range(n):
            v_next = vs[b][s + 1] if s + 1 < n else float(bootstrap[b])
            adv[b][s] = rho[s] * (rewards[b][s].item() + gamma * v_next - value[s])
    return torch.tensor(vs, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)


@pytest.mark.parametrize(
    "gamma,lam,rho_bar,c_bar",
    [(1.0, 1.0, 1.0, 1.0), (0.9, 0.95, 1.0, 1.0), (0.99, 1.0, 2.0, 0.5), (0.8, 0.7, 0.6, 1.5)],
)
def test_vtrace_matches_a_slow_loop_of_the_paper_on_random_inputs(gamma, lam, rho_bar, c_bar):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10 + rho_bar))
    lengths = [7, 1, 4, 0, 7, 3]
    mask = ragged_mask(lengths, 7)
    rewards = torch.randn(6, 7, generator=g, dtype=torch.float64)
    values = torch.randn(6, 7, generator=g, dtype=torch.float64)
    log_rhos = torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.7
    bootstrap = torch.randn(6, generator=g, dtype=torch.float64)
    vs, adv = vtrace(
        fill_garbage(rewards, mask),
        fill_garbage(values, mask),
        fill_garbage(log_rhos, mask),
        mask,
        gamma=gamma,
        lam=lam,
        rho_bar=rho_bar,
        c_bar=c_bar,
        bootstrap=bootstrap,
    )
    ref_vs, ref_adv = vtrace_reference(
        rewards, values, log_rhos, lengths, bootstrap.tolist(), gamma, lam, rho_bar, c_bar
    )
    torch.testing.assert_close(vs, ref_vs, atol=1e-12, rtol=0)
    torch.testing.assert_close(adv, ref_adv, atol=1e-12, rtol=0)
    assert (vs[~mask] == 0).all() and (adv[~mask] == 0).all()


def test_vtrace_on_policy_is_the_n_step_return():
    """pi = mu, rho_bar, c_bar >= 1, lambda = 1: v_s = sum_{t>=s} gamma^(t-s) r_t +
    gamma^(n-s) V(x_n) (IMPALA sec. 4.1), and the advantage is r_s + gamma v_{s+1} - V(x_s)."""
    g = torch.Generator().manual_seed(3)
    lengths, gamma = [5, 2, 5], 0.9
    mask = ragged_mask(lengths, 5)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    bootstrap = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    vs, adv = vtrace(
        rewards,
        values,
        torch.zeros(3, 5, dtype=torch.float64),
        mask,
        gamma=gamma,
        lam=1.0,
        rho_bar=1.0,
        c_bar=1.0,
        bootstrap=bootstrap,
    )
    for b, n in enumerate(lengths):
        for s in range(n):
            ret = sum(gamma ** (t - s) * rewards[b, t].item() for t in range(s, n)) + gamma ** (n - s) * bootstrap[b]
            assert vs[b, s].item() == pytest.approx(float(ret), abs=1e-12)
            nxt = vs[b, s + 1].item() if s + 1 < n else bootstrap[b].item()
            assert adv[b, s].item() == pytest.approx(
                rewards[b, s].item() + gamma * nxt - values[b, s].item(), abs=1e-12
            )
    # with a terminal end (no bootstrap) and lambda = 1, on-policy V-trace is GAE(lambda = 1)'s return
    vs0, _ = vtrace(
        rewards, values, torch.zeros(3, 5, dtype=torch.float64), mask, gamma=gamma, lam=1.0, rho_bar=1.0, c_bar=1.0
    )
    torch.testing.assert_close(vs0, gae(rewards, values, mask, gamma=gamma, lam=1.0)[1], atol=1e-12, rtol=0)


def test_vtrace_zero_ratio_and_errors():
    """pi_old = 0 (log-ratio -inf, a token outside the nucleus): rho = c = 0, no NaN."""
    mask = ragged_mask([3], 3)
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)
    log_rhos = torch.tensor([[0.0, -math.inf, 0.0]], dtype=torch.float64)
    vs, adv = vtrace(rewards, values, log_rhos, mask, gamma=1.0, lam=1.0, rho_bar=1.0, c_bar=1.0)
    assert torch.isfinite(vs).all() and torch.isfinite(adv).all()
    assert adv[0, 1].item() == 0.0 and vs[0, 1].item() == 0.5  # rho = 0: v = V, no correction
    with pytest.raises(ValueError, match="rho_bar"):
        vtrace(rewards, values, log_rhos, mask, gamma=1.0, lam=1.0, rho_bar=0.0, c_bar=1.0)
    with pytest.raises(ValueError, match="shape"):
        vtrace(rewards, values[:, :2], log_rhos, mask, gamma=1.0, lam=1.0, rho_bar=1.0, c_bar=1.0)
