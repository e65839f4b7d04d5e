"""Tests for services/learner/losses.py: hand-computed values, invariants,
reference implementations, and garbage in padded positions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamrl.common.modes import Correction, KLEstimator
from streamrl.services.learner.losses import (
    aggregate_tokens,
    entropy_from_logits,
    kl_to_reference,
    nucleus_mask,
    policy_loss,
    sft_loss,
    token_logprobs,
    value_loss,
)
from support import fill_garbage, ragged_mask, slow_nucleus

ATOL = 1e-6
ALL_CORRECTIONS = list(Correction)


def lp_leaf(values: list[list[float]] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    return t.clone().requires_grad_(True)


def run_policy(lp, old, beh, adv, mask, correction, clip_eps=0.2, is_cap=2.0):
    leaf = lp.detach().clone().requires_grad_(True)
    loss, stats = policy_loss(leaf, old, beh, adv, mask, correction=correction, clip_eps=clip_eps, is_cap=is_cap)
    loss.backward()
    return loss.detach(), stats, leaf.grad


# --------------------------------------------------------------------------- policy_loss


@pytest.fixture
def onpolicy_batch():
    g = torch.Generator().manual_seed(0)
    mask = ragged_mask([5, 3, 1, 4], 5)
    lp = -torch.rand(4, 5, generator=g) * 3
    adv = torch.randn(4, 5, generator=g)
    return lp, adv, mask


@pytest.mark.parametrize("correction", ALL_CORRECTIONS)
def test_on_policy_invariant(onpolicy_batch, correction):
    """pi == pi_old == mu: every correction is the plain policy gradient:
    loss = -mean(A), d loss / d logprob_t = -A_t / n_tokens; ratios are 1, ESS = n."""
    lp, adv, mask = onpolicy_batch
    n = int(mask.sum())  # 13
    loss, stats, grad = run_policy(lp, lp.clone(), lp.clone(), adv, mask, correction)
    expected_loss = -(adv * mask).sum() / n
    assert loss.item() == pytest.approx(expected_loss.item(), abs=ATOL)
    torch.testing.assert_close(grad, torch.where(mask, -adv / n, 0.0), atol=ATOL, rtol=0)
    assert stats.floats() == {
        "clip_fraction": 0.0,
        "approx_kl": 0.0,
        "importance_ratio_mean": 1.0,
        "importance_ratio_max": 1.0,
        "truncated_fraction": 0.0,
        "effective_sample_size": pytest.approx(13.0, abs=1e-9),
        "ess_fraction": pytest.approx(1.0, abs=1e-9),
        "outside_nucleus_fraction": 0.0,
        "dual_clip_fraction": 0.0,
        "masked_fraction": 0.0,
    }
    # statistics stay detached 0-d tensors (no device sync in the loss); floats() converts them at once
    for value in stats.tensors().values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert all(type(v) is float for v in stats.floats().values())


def test_on_policy_all_corrections_agree(onpolicy_batch):
    lp, adv, mask = onpolicy_batch
    results = [run_policy(lp, lp.clone(), lp.clone(), adv, mask, c) for c in ALL_CORRECTIONS]
    for loss, _, grad in results[1:]:
        assert loss.item() == pytest.approx(results[0][0].item(), abs=ATOL)
        torch.testing.assert_close(grad, results[0][2], atol=ATOL, rtol=0)


def test_none_hand_computed():
    # r = pi/mu = [1.5, 0.5, 1.1], A = [1, 1, -1], eps = 0.2
    # t0: min(1.5*1, 1.2*1) = 1.2 (clipped)   -> L = -1.2, grad 0
    # t1: min(0.5*1, 0.8*1) = 0.5             -> L = -0.5, dL/dlp = -r A = -0.5
    # t2: min(-1.1, clip(1.1)*-1 = -1.1)      -> L = +1.1, dL/dlp = -r A = +1.1
    # loss = (-1.2 - 0.5 + 1.1) / 3 = -0.2; grads / 3
    beh = torch.log(torch.tensor([[0.2, 0.4, 0.5]]))
    lp = beh + torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = beh.clone()  # pi_old == mu: raw ratio stats are 1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats, grad = run_policy(lp, old, beh, adv, mask, Correction.NONE)
    assert loss.item() == pytest.approx(-0.2, abs=ATOL)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5 / 3, 1.1 / 3]]), atol=ATOL, rtol=0)
    # |r - 1| > 0.2 for t0 (0.5) and t1 (0.5); t2 has 0.1
    assert stats.clip_fraction == pytest.approx(2 / 3, abs=ATOL)
    # approx_kl: rho = pi/pi_old = r here; k3 = (rho-1) - log rho
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert stats.approx_kl == pytest.approx(sum(k3) / 3, abs=ATOL)
    # none: ESS over w = pi/mu unclipped = [1.5, 0.5, 1.1]
    # (3.1)^2 / (2.25 + 0.25 + 1.21) = 9.61 / 3.71
    assert stats.effective_sample_size == pytest.approx(9.61 / 3.71, abs=1e-5)
    assert stats.ess_fraction == pytest.approx(9.61 / 3.71 / 3, abs=1e-5)
    assert stats.truncated_fraction == 0.0
    assert stats.importance_ratio_mean == pytest.approx(1.0, abs=ATOL)


def test_none_reports_raw_pi_old_over_mu_and_truncates_nothing():
    # pi_old/mu = [4, 0.5] with cap 2: none applies no weight, reports raw stats
    beh = torch.log(torch.tensor([[0.1, 0.4]]))
    old = beh + torch.log(torch.tensor([[4.0, 0.5]]))
    lp = beh.clone()  # r = pi/mu = 1 -> loss = -mean(A)
    adv = torch.tensor([[2.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats, _ = run_policy(lp, old, beh, adv, mask, Correction.NONE, is_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 - 1.0) / 2, abs=ATOL)
    assert stats.importance_ratio_mean == pytest.approx(2.25, abs=1e-5)  # (4 + 0.5)/2
    assert stats.importance_ratio_max == pytest.approx(4.0, abs=1e-5)
    assert stats.truncated_fraction == 0.0
    assert stats.effective_sample_size == pytest.approx(2.0, abs=1e-6)  # w = pi/mu = 1


def test_decoupled_hand_computed():
    # per-token w = min(pi_old/mu, C=1.5): raw [2, 0.5] -> w = [1.5, 0.5]
    # r = pi/pi_old = [1.1, 0.7], A = [1, -2], eps = 0.2
    # t0: min(1.1, 1.1) = 1.1            -> L = -1.5*1.1  = -1.65, dL/dlp = -w r A = -1.65
    # t1: min(0.7*-2 = -1.4, 0.8*-2 = -1.6) = -1.6 (clipped) -> L = -0.5*-1.6 = 0.8, grad 0
    # loss = (-1.65 + 0.8)/2 = -0.425
    beh = torch.log(torch.tensor([[0.2, 0.6]]))
    old = beh + torch.log(torch.tensor([[2.0, 0.5]]))
    lp = old + torch.log(torch.tensor([[1.1, 0.7]]))
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats, grad = run_policy(lp, old, beh, adv, mask, Correction.DECOUPLED, is_cap=1.5)
    assert loss.item() == pytest.approx(-0.425, abs=ATOL)
    torch.testing.assert_close(grad, torch.tensor([[-1.65 / 2, 0.0]]), atol=ATOL, rtol=0)
    assert stats.importance_ratio_mean == pytest.approx(1.25, abs=1e-6)  # (2 + 0.5)/2
    assert stats.importance_ratio_max == pytest.approx(2.0, abs=1e-6)
    assert stats.truncated_fraction == pytest.approx(0.5, abs=ATOL)
    # ESS over truncated w = [1.5, 0.5]: 2^2 / (2.25 + 0.25) = 1.6
    assert stats.effective_sample_size == pytest.approx(1.6, abs=1e-6)
    assert stats.ess_fraction == pytest.approx(0.8, abs=1e-6)
    assert stats.clip_fraction == pytest.approx(0.5, abs=ATOL)  # |0.7 - 1| > 0.2


def test_tis_uses_one_weight_per_sequence():
    # row 0: pi_old/mu = [2, 0.5] -> product 1 -> w = 1 for both tokens
    # row 1: pi_old/mu = [3]      -> w = min(3, C=2) = 2
    # r = pi/pi_old = 1 everywhere, A = [[1, 1], [1, pad]]
    # tis loss = -(1 + 1 + 2)/3 = -4/3
    # decoupled instead uses per-token w = [min(2,2)=2, 0.5, 2] -> -(2 + 0.5 + 2)/3 = -1.5
    beh = torch.log(torch.tensor([[0.2, 0.6], [0.1, 0.5]]))
    old = beh + torch.log(torch.tensor([[2.0, 0.5], [3.0, 1.0]]))
    lp = old.clone()
    adv = torch.tensor([[1.0, 1.0], [1.0, 7.0]])
    mask = ragged_mask([2, 1], 2)
    loss, stats, grad = run_policy(lp, old, beh, adv, mask, Correction.TIS, is_cap=2.0)
    assert loss.item() == pytest.approx(-4 / 3, abs=ATOL)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, -1 / 3], [-2 / 3, 0.0]]), atol=ATOL, rtol=0)
    # raw sequence weights broadcast to tokens: [1, 1, 3]
    assert stats.importance_ratio_mean == pytest.approx(5 / 3, abs=1e-5)
    assert stats.importance_ratio_max == pytest.approx(3.0, abs=1e-5)
    assert stats.truncated_fraction == pytest.approx(1 / 3, abs=ATOL)
    # ESS over truncated w = [1, 1, 2]: 16 / 6
    assert stats.effective_sample_size == pytest.approx(8 / 3, abs=1e-5)
    assert stats.ess_fraction == pytest.approx(8 / 9, abs=1e-5)

    loss_dec, _, _ = run_policy(lp, old, beh, adv, mask, Correction.DECOUPLED, is_cap=2.0)
    assert loss_dec.item() == pytest.approx(-1.5, abs=ATOL)


def test_tis_long_sequence_weight_does_not_overflow():
    # sum of log(pi_old/mu) = 200 * 1.0 -> raw weight e^200 overflows float32;
    # the truncated weight must still be exactly C
    t = 200
    beh = torch.full((1, t), -3.0)
    old = beh + 1.0
    lp = old.clone()
    adv = torch.ones(1, t)
    mask = torch.ones(1, t, dtype=torch.bool)
    loss, stats, grad = run_policy(lp, old, beh, adv, mask, Correction.TIS, is_cap=2.0)
    assert loss.item() == pytest.approx(-2.0, abs=ATOL)
    assert torch.isfinite(grad).all()
    assert stats.truncated_fraction == 1.0
    assert stats.effective_sample_size == pytest.approx(200.0, abs=1e-6)


@pytest.mark.parametrize("correction", ALL_CORRECTIONS)
def test_policy_loss_garbage_in_padding_changes_nothing(correction):
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([6, 2, 4], 6)
    beh = -torch.rand(3, 6, generator=g) * 2
    old = beh + 0.3 * torch.randn(3, 6, generator=g)
    lp = old + 0.2 * torch.randn(3, 6, generator=g)
    adv = torch.randn(3, 6, generator=g)
    clean = run_policy(lp, old, beh, adv, mask, correction, is_cap=1.3)
    dirty = run_policy(
        fill_garbage(lp, mask),
        fill_garbage(old, mask),
        fill_garbage(beh, mask),
        fill_garbage(adv, mask),
        mask.float(),  # float mask works the same as bool
        correction,
        is_cap=1.3,
    )
    assert torch.isfinite(clean[0])
    assert dirty[0].item() == clean[0].item()
    assert dirty[1] == clean[1]
    assert torch.equal(dirty[2], clean[2])
    assert torch.equal(dirty[2][~mask], torch.zeros(int((~mask).sum())))


def test_policy_loss_matches_slow_reference():
    """Per-token python loop reference for every correction on random data."""
    g = torch.Generator().manual_seed(2)
    lengths = [4, 1, 3]
    mask = ragged_mask(lengths, 4)
    beh = (-torch.rand(3, 4, generator=g) * 2).double()
    old = beh + 0.5 * torch.randn(3, 4, generator=g).double()
    lp = old + 0.3 * torch.randn(3, 4, generator=g).double()
    adv = torch.randn(3, 4, generator=g).double()
    eps, cap = 0.2, 1.2
    for correction in ALL_CORRECTIONS:
        total, n = 0.0, 0
        for b, length in enumerate(lengths):
            seq_log_w = sum(old[b, t].item() - beh[b, t].item() for t in range(length))
            seq_w = min(math.exp(seq_log_w), cap)
            for t in range(length):
                a = adv[b, t].item()
                if correction is Correction.NONE:
                    r, w = math.exp(lp[b, t].item() - beh[b, t].item()), 1.0
                elif correction is Correction.VTRACE:  # rho lives in the advantages
                    r, w = math.exp(lp[b, t].item() - old[b, t].item()), 1.0
                else:
                    r = math.exp(lp[b, t].item() - old[b, t].item())
                    tok_w = min(math.exp(old[b, t].item() - beh[b, t].item()), cap)
                    w = seq_w if correction is Correction.TIS else tok_w
                total += -w * min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
                n += 1
        loss, _ = policy_loss(lp, old, beh, adv, mask, correction=correction, clip_eps=eps, is_cap=cap)
        assert loss.item() == pytest.approx(total / n, abs=1e-9), correction


def test_policy_loss_empty_mask():
    z = torch.zeros(2, 3)
    loss, stats = policy_loss(
        z.clone().requires_grad_(True),
        z,
        z,
        z,
        torch.zeros(2, 3, dtype=torch.bool),
        correction=Correction.DECOUPLED,
        clip_eps=0.2,
        is_cap=2.0,
    )
    assert loss.item() == 0.0
    assert stats.effective_sample_size == 0.0 and stats.ess_fraction == 0.0
    assert stats.clip_fraction == 0.0 and stats.truncated_fraction == 0.0


def test_policy_loss_accepts_string_correction_and_rejects_bad_args():
    z = torch.zeros(1, 2)
    m = torch.ones(1, 2)
    loss, _ = policy_loss(z, z, z, torch.ones(1, 2), m, correction="tis", clip_eps=0.2, is_cap=2.0)
    assert loss.item() == pytest.approx(-1.0, abs=ATOL)
    with pytest.raises(ValueError):
        policy_loss(z, z, z, z, m, correction="retrace", clip_eps=0.2, is_cap=2.0)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(z, z, z, z, m, correction=Correction.NONE, clip_eps=0.0, is_cap=2.0)
    with pytest.raises(ValueError, match="is_cap"):
        policy_loss(z, z, z, z, m, correction=Correction.TIS, clip_eps=0.2, is_cap=0.0)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(z, torch.zeros(1, 3), z, z, m, correction="tis", clip_eps=0.2, is_cap=2.0)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(z, z, z, z, torch.ones(2, 2), correction="tis", clip_eps=0.2, is_cap=2.0)


# --------------------------------------------------------------------------- value_loss


def test_value_loss_hand_computed():
    # t0: v=1.5 old=1.0 R=2.0 c=0.2: unclipped (1.5-2)^2 = 0.25; v_clip = 1.2 -> (1.2-2)^2 = 0.64
    #     max = 0.64 (clipped term wins -> gradient 0)
    # t1: v=0.9 old=1.0 R=0.0: |v-old| = 0.1 <= c -> both 0.81; grad = (v - R) / n = 0.45
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625; clip fraction 1/2
    values = torch.tensor([[1.5, 0.9]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0]])
    ret = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, frac = value_loss(values, old, ret, mask, clip_range=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.3625, abs=ATOL)
    assert frac == 0.5
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.45]]), atol=ATOL, rtol=0)

    # unclipped: 0.5 * (0.25 + 0.81) / 2 = 0.265
    loss_u, frac_u = value_loss(values, old, ret, mask, clip_range=None)
    assert loss_u.item() == pytest.approx(0.265, abs=ATOL)
    assert frac_u == 0.0


@pytest.mark.parametrize("clip_range", [0.1, None])
def test_value_loss_garbage_in_padding_changes_nothing(clip_range):
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask([3, 1, 4], 4)
    v = torch.randn(3, 4, generator=g)
    old = v + 0.3 * torch.randn(3, 4, generator=g)
    ret = torch.randn(3, 4, generator=g)

    def run(v_, old_, ret_, m_):
        leaf = v_.clone().requires_grad_(True)
        loss, frac = value_loss(leaf, old_, ret_, m_, clip_range=clip_range)
        loss.backward()
        return loss.detach(), frac, leaf.grad

    clean = run(v, old, ret, mask)
    dirty = run(fill_garbage(v, mask), fill_garbage(old, mask), fill_garbage(ret, mask), mask.float())
    assert torch.isfinite(clean[0])
    assert dirty[0].item() == clean[0].item() and dirty[1] == clean[1]
    assert torch.equal(dirty[2], clean[2])
    assert (dirty[2][~mask] == 0).all()


def test_value_loss_rejects_bad_clip_range():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_range"):
        value_loss(z, z, z, torch.ones(1, 1), clip_range=-0.1)


# --------------------------------------------------------------------------- entropy / logprobs


def test_entropy_hand_computed():
    # uniform over 4 -> log 4; one-hot-ish (one logit 0, rest -inf) -> 0
    # [0, log 3] -> p = [1/4, 3/4] -> H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf], [0.0, math.log(3.0), -math.inf, -math.inf]]]
    )
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.tensor([[math.log(4.0), 0.0, 0.5623351446]]), atol=ATOL, rtol=0)


def test_entropy_matches_reference_and_is_stable_for_huge_logits():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=g) * 3
    ref = -(F.softmax(logits.double(), -1) * F.log_softmax(logits.double(), -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits).double(), ref, atol=ATOL, rtol=0)
    # shifting every logit by 1e4 changes nothing mathematically; naive exp overflows
    shifted = entropy_from_logits(logits + 1e4)
    assert torch.isfinite(shifted).all()
    # fp32 spacing at 1e4 is ~1e-3, so the shifted logits themselves carry that error
    torch.testing.assert_close(shifted.double(), ref, atol=5e-3, rtol=0)
    # bf16 input is upcast: output float32
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_entropy_gradient_finite_with_neg_inf_logits():
    logits = torch.tensor([[[0.5, -math.inf, 1.0]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 1].item() == 0.0
    # dH/dl_i = -p_i (log p_i + H); check the finite entries
    p = F.softmax(torch.tensor([0.5, 1.0]).double(), -1)
    h = -(p * p.log()).sum()
    expected = -p * (p.log() + h)
    torch.testing.assert_close(logits.grad[0, 0, [0, 2]].double(), expected, atol=ATOL, rtol=0)


def test_token_logprobs_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 11, generator=g) * 5
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    ref = F.log_softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens).double(), ref, atol=ATOL, rtol=0)
    # hand: logits [0, log 3] token 1 -> log(3/4)
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    got = token_logprobs(two, torch.tensor([[1]])).item()
    assert got == pytest.approx(math.log(0.75), abs=ATOL)
    # stability: +1e4 shift
    torch.testing.assert_close(token_logprobs(logits + 1e4, tokens).double(), ref, atol=5e-3, rtol=0)


def test_token_logprobs_rejects_bad_ids_and_shapes():
    logits = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        token_logprobs(logits, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        token_logprobs(logits, torch.tensor([[-100, 1]]))
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(logits, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, torch.tensor([[0.0, 1.0]]))


# --------------------------------------------------------------------------- kl_to_reference


def test_kl_estimators_hand_computed():
    # pi = 0.5, pi_ref = 0.25: k1 = log 2 = 0.693147; rho = 0.5 -> k3 = -0.5 + log 2 = 0.193147
    # pi = 0.25, pi_ref = 0.5: k1 = -log 2 (negative); rho = 2 -> k3 = 1 - log 2 = 0.306853
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    k1 = kl_to_reference(lp, ref, estimator=KLEstimator.K1)
    k3 = kl_to_reference(lp, ref, estimator="k3")
    torch.testing.assert_close(k1, torch.tensor([[math.log(2), -math.log(2)]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(k3, torch.tensor([[math.log(2) - 0.5, 1 - math.log(2)]]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("estimator", [KLEstimator.K1, KLEstimator.K3])
def test_kl_estimators_are_exactly_unbiased(estimator):
    """sum_x pi(x) k(x) = KL(pi || pi_ref) exactly, for k1 and k3 (k2 is biased)."""
    g = torch.Generator().manual_seed(6)
    logp = F.log_softmax(torch.randn(1, 9, generator=g, dtype=torch.float64), -1)
    logq = F.log_softmax(torch.randn(1, 9, generator=g, dtype=torch.float64), -1)
    kl_true = (logp.exp() * (logp - logq)).sum()
    k = kl_to_reference(logp, logq, estimator=estimator)
    assert (logp.exp() * k).sum().item() == pytest.approx(kl_true.item(), abs=1e-12)
    if estimator is KLEstimator.K3:
        assert (k >= 0).all()


def test_kl_k3_gradient_and_errors():
    # d k3 / d logp = 1 - rho; rho = pi_ref/pi = 0.5 -> 0.5
    lp = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25]]))
    kl_to_reference(lp, ref, estimator=KLEstimator.K3).sum().backward()
    assert lp.grad.item() == pytest.approx(0.5, abs=ATOL)
    with pytest.raises(ValueError):
        kl_to_reference(lp, lp.detach(), estimator="k4")
    with pytest.raises(ValueError, match="shape"):
        kl_to_reference(torch.zeros(1, 2), torch.zeros(1, 3), estimator=KLEstimator.K1)


def test_kl_k2_hand_computed():
    # k2 = 0.5 (log pi - log pi_ref)^2: pi = 0.5, pi_ref = 0.25 -> 0.5 (log 2)^2 either way round
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    k2 = kl_to_reference(lp, ref, estimator="k2")
    torch.testing.assert_close(k2, torch.full((1, 2), 0.5 * math.log(2) ** 2), atol=ATOL, rtol=0)


def expected_loss_gradient(theta: torch.Tensor, logq: torch.Tensor, estimator: str) -> torch.Tensor:
    """E_{x ~ pi_theta}[grad_theta k(x)]: the gradient a KL *loss* term gives in expectation
    when tokens are sampled from pi (the sampling distribution itself is not differentiated),
    by exact enumeration over the vocabulary."""
    theta = theta.detach().clone().requires_grad_(True)
    logp = F.log_softmax(theta, -1)
    k = kl_to_reference(logp, logq, estimator=estimator)
    (logp.exp().detach() * k).sum().backward()
    return theta.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_loss_gradients_in_expectation(seed):
    """As a loss term, k1 has expected gradient exactly 0 (it only adds noise), k2 has the
    gradient of KL(pi || ref), and k3 the gradient of KL(ref || pi) (GRPO's loss)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(1, 7, generator=g, dtype=torch.float64)
    logq = F.log_softmax(torch.randn(1, 7, generator=g, dtype=torch.float64), -1)

    def true_gradient(forward: bool) -> torch.Tensor:
        t = theta.clone().requires_grad_(True)
        logp = F.log_softmax(t, -1)
        kl = (logp.exp() * (logp - logq)).sum() if forward else (logq.exp() * (logq - logp)).sum()
        kl.backward()
        return t.grad

    k1 = expected_loss_gradient(theta, logq, "k1")
    assert k1.abs().max().item() < 1e-12
    torch.testing.assert_close(expected_loss_gradient(theta, logq, "k2"), true_gradient(True), atol=1e-12, rtol=0)
    torch.testing.assert_close(expected_loss_gradient(theta, logq, "k3"), true_gradient(False), atol=1e-12, rtol=0)
    assert true_gradient(True).abs().max().item() > 1e-3  # the targets are not trivially 0


# --------------------------------------------------------------------------- sft_loss


def test_sft_loss_hand_computed_and_matches_cross_entropy():
    # uniform logits over V = 4 -> NLL = log 4 on every token
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[0, 1, 2], [3, 0, 0]])
    mask = ragged_mask([3, 1], 3)
    assert sft_loss(logits, labels, mask).item() == pytest.approx(math.log(4), abs=ATOL)

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 6, generator=g)
    labels = torch.randint(0, 6, (2, 3), generator=g)
    ignore = torch.where(mask, labels, torch.tensor(-100))
    ref = F.cross_entropy(logits.reshape(-1, 6), ignore.reshape(-1), ignore_index=-100)
    assert sft_loss(logits, labels, mask).item() == pytest.approx(ref.item(), abs=ATOL)


def test_sft_loss_garbage_in_padding_changes_nothing():
    g = torch.Generator().manual_seed(8)
    mask = ragged_mask([2, 4], 4)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.randint(0, 5, (2, 4), generator=g)

    def run(lg, lb, m):
        leaf = lg.clone().requires_grad_(True)
        loss = sft_loss(leaf, lb, m)
        loss.backward()
        return loss.detach(), leaf.grad

    clean = run(logits, labels, mask)
    bad_logits = torch.where(mask.unsqueeze(-1), logits, torch.tensor(math.nan))
    bad_labels = torch.where(mask, labels, torch.tensor(-100))
    dirty = run(bad_logits, bad_labels, mask.float())
    assert dirty[0].item() == clean[0].item()
    assert torch.equal(dirty[1], clean[1])
    assert (dirty[1][~mask] == 0).all()


# --------------------------------------------------------------------------- top-p: nucleus and pi_old = 0


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95, 1.0])
def test_nucleus_mask_matches_hugging_face_and_slow_reference(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(int(top_p * 100))
    logits = torch.randn(3, 5, 40, generator=g) * 2
    keep = nucleus_mask(logits, top_p)
    assert keep.shape == logits.shape and keep.dtype == torch.bool
    hf = TopPLogitsWarper(top_p)(None, logits.reshape(15, 40)).reshape(3, 5, 40)
    assert torch.equal(keep, torch.isfinite(hf))
    assert torch.equal(keep, slow_nucleus(logits, top_p))
    kept_mass = (torch.softmax(logits, -1) * keep).sum(-1)
    assert (kept_mass >= top_p - 1e-6).all()
    assert keep.any(-1).all()


def test_nucleus_mask_keeps_the_top_token_and_rejects_bad_top_p():
    logits = torch.tensor([[10.0, 0.0, -1.0]])  # the top token alone holds > 0.99 of the mass
    assert nucleus_mask(logits, 0.5).tolist() == [[True, False, False]]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            nucleus_mask(logits, bad)


@pytest.mark.parametrize("correction", ALL_CORRECTIONS)
def test_pi_old_zero_gives_weight_zero_and_no_nan(correction):
    """A token mu sampled outside pi_old's nucleus has pi_old = 0 (log -inf): its importance
    weight is 0 (tis: its whole sequence), the ESS sees it, and nothing is NaN."""
    lp = lp_leaf([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
    old = torch.tensor([[-1.0, -math.inf, -0.5], [-1.5, -0.7, 0.0]])
    beh = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
    adv = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 0.0]])
    mask = ragged_mask([3, 2], 3)
    loss, stats, grad = run_policy(lp, old, beh, adv, mask, correction)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    s = stats.floats()
    assert s["outside_nucleus_fraction"] == pytest.approx(1 / 5)
    if correction is Correction.NONE:  # r = pi/mu does not involve pi_old
        assert grad[0, 1].item() == pytest.approx(-2.0 / 5, abs=ATOL)
        return
    if correction is Correction.VTRACE:  # rho = 0 is applied in the V-trace advantages, not here
        assert s["importance_ratio_mean"] == pytest.approx(4 / 5, abs=ATOL)
        return
    if correction is Correction.TIS:  # row 0's sequence weight is 0: rows 1 only
        zero = torch.tensor([[True, True, True], [False, False, False]])
        assert s["importance_ratio_mean"] == pytest.approx(2 / 5, abs=ATOL)
        assert s["effective_sample_size"] == pytest.approx(2.0, abs=1e-6)
    else:
        zero = torch.tensor([[False, True, False], [False, False, False]])
        assert s["importance_ratio_mean"] == pytest.approx(4 / 5, abs=ATOL)
        assert s["effective_sample_size"] == pytest.approx(4.0, abs=1e-6)
    assert (grad[zero] == 0).all()
    torch.testing.assert_close(grad[~zero & mask], (-adv / 5)[~zero & mask], atol=ATOL, rtol=0)


def test_pi_zero_gives_ratio_zero_and_zero_gradient():
    """pi = 0 (the current policy's nucleus excludes the token): finite loss, no gradient."""
    lp = lp_leaf([[-math.inf, -1.0]])
    old = torch.tensor([[-1.0, -1.0]])
    adv = torch.tensor([[1.0, -1.0]])
    for correction in ALL_CORRECTIONS:
        loss, stats, grad = run_policy(lp, old, old.clone(), adv, torch.ones(1, 2, dtype=torch.bool), correction)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[0, 0].item() == 0.0
        assert grad[0, 1].item() == pytest.approx(0.5, abs=ATOL)  # -A / n on the other token


# --------------------------------------------------------------------------- log-ratio clamp, dual clip


@pytest.mark.parametrize("correction", ALL_CORRECTIONS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_log_ratio_gives_a_finite_loss_and_gradient(correction, sign):
    """log(pi/mu) = 100 (or log(pi/pi_old) = 100): without a clamp exp overflows and the
    loss is NaN (A > 0: inf * 0 in the clipped branch) or inf (A < 0)."""
    lp = lp_leaf([[0.0, -1.0]])
    stale = torch.tensor([[-100.0, -1.0]])
    adv = torch.tensor([[sign, 0.5]])
    old = stale if correction is not Correction.NONE else lp.detach().clone()
    loss, stats, grad = run_policy(lp, old, stale, adv, torch.ones(1, 2, dtype=torch.bool), correction)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    assert all(math.isfinite(v) for v in stats.floats().values())


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    """r = e^5, A = -1 (Ye et al. 2020, dual-clip PPO): -max(min(rA, clip(r)A), cA) = c|A|
    = 3 with c = 3, no gradient; without the dual clip the loss is e^5 = 148.4."""
    lp = lp_leaf([[0.0]])
    beh = torch.tensor([[-5.0]])
    adv = torch.tensor([[-1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    leaf = lp.detach().clone().requires_grad_(True)
    loss, stats = policy_loss(
        leaf, leaf.detach(), beh, adv, mask, correction="none", clip_eps=0.2, is_cap=2.0, dual_clip=3.0
    )
    loss.backward()
    assert loss.item() == pytest.approx(3.0, abs=ATOL)
    assert leaf.grad.item() == 0.0
    assert stats.floats()["dual_clip_fraction"] == 1.0
    leaf = lp.detach().clone().requires_grad_(True)
    loss, stats = policy_loss(
        leaf, leaf.detach(), beh, adv, mask, correction="none", clip_eps=0.2, is_cap=2.0, dual_clip=None
    )
    assert loss.item() == pytest.approx(math.exp(5), rel=1e-5)
    assert stats.floats()["dual_clip_fraction"] == 0.0


@pytest.mark.parametrize("correction", ALL_CORRECTIONS)
def test_dual_clip_leaves_positive_advantages_and_small_ratios_alone(correction):
    g = torch.Generator().manual_seed(11)
    lp = lp_leaf(torch.randn(3, 4, generator=g) * 0.3 - 1)
    old = lp.detach() + torch.randn(3, 4, generator=g) * 0.1
    beh = old + torch.randn(3, 4, generator=g) * 0.1
    adv = torch.randn(3, 4, generator=g)
    mask = ragged_mask([4, 2, 3], 4)
    plain = run_policy(lp, old, beh, adv, mask, correction)
    leaf = lp.detach().clone().requires_grad_(True)
    loss, stats = policy_loss(leaf, old, beh, adv, mask, correction=correction, clip_eps=0.2, is_cap=2.0, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(plain[0].item(), abs=1e-7)  # every ratio < 3: no difference
    torch.testing.assert_close(leaf.grad, plain[2], atol=1e-7, rtol=0)
    assert stats.floats()["dual_clip_fraction"] == 0.0


def test_dual_clip_must_exceed_one():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(z, z, z, z, torch.ones(1, 1), correction="none", clip_eps=0.2, is_cap=2.0, dual_clip=1.0)


# --------------------------------------------------------------------------- per-token tis, AReaL masking, overflow


def test_tis_long_sequence_statistics_do_not_overflow():
    """sum of log(pi_old/mu) = 1000: exp of it overflows float64. The statistics saturate at
    a finite value (log-space mean and max), the loss uses the truncated weight C."""
    t = 200
    beh = torch.full((1, t), -6.0)
    old = beh + 5.0
    loss, stats, grad = run_policy(
        old.clone(), old, beh, torch.ones(1, t), torch.ones(1, t, dtype=torch.bool), Correction.TIS, is_cap=2.0
    )
    s = stats.floats()
    assert all(math.isfinite(v) for v in s.values()), s
    assert s["importance_ratio_max"] > 1e300 and s["importance_ratio_mean"] > 1e300
    assert loss.item() == pytest.approx(-2.0, abs=ATOL)


def test_tis_per_token_truncates_each_token_like_impala():
    """is_level = "token": w_t = min(pi_old_t / mu_t, C) per token (IMPALA eq. 1's rho-bar
    per step); the same weights and loss as decoupled."""
    beh = torch.log(torch.tensor([[0.2, 0.6], [0.1, 0.5]]))
    old = beh + torch.log(torch.tensor([[1.9, 0.5], [3.0, 1.0]]))
    adv = torch.tensor([[1.0, 1.0], [1.0, 7.0]])
    mask = ragged_mask([2, 1], 2)
    leaf = old.clone().requires_grad_(True)
    loss, stats = policy_loss(leaf, old, beh, adv, mask, correction="tis", clip_eps=0.2, is_cap=2.0, is_level="token")
    loss.backward()
    # per-token w = [1.9, 0.5, min(3, 2) = 2] -> -(1.9 + 0.5 + 2) / 3
    assert loss.item() == pytest.approx(-4.4 / 3, abs=ATOL)
    torch.testing.assert_close(leaf.grad, torch.tensor([[-1.9 / 3, -0.5 / 3], [-2 / 3, 0.0]]), atol=ATOL, rtol=0)
    s = stats.floats()
    assert s["importance_ratio_mean"] == pytest.approx((1.9 + 0.5 + 3) / 3, abs=1e-6)
    assert s["truncated_fraction"] == pytest.approx(1 / 3, abs=ATOL)
    decoupled, _, dgrad = run_policy(old, old, beh, adv, mask, Correction.DECOUPLED, is_cap=2.0)
    assert decoupled.item() == pytest.approx(loss.item(), abs=ATOL)
    torch.testing.assert_close(dgrad, leaf.grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_areal_mask_zeroes_tokens_over_the_cap_and_logs_the_fraction(level):
    """is_mode = "mask" (AReaL): a weight above C is set to 0 instead of truncated to C."""
    beh = torch.log(torch.tensor([[0.2, 0.6], [0.1, 0.5]]))
    old = beh + torch.log(torch.tensor([[1.9, 0.5], [3.0, 1.0]]))
    adv = torch.tensor([[1.0, 1.0], [1.0, 7.0]])
    mask = ragged_mask([2, 1], 2)
    for correction in ("tis", "decoupled") if level == "token" else ("tis",):
        leaf = old.clone().requires_grad_(True)
        loss, stats = policy_loss(
            leaf, old, beh, adv, mask, correction=correction, clip_eps=0.2, is_cap=2.0, is_level=level, is_mode="mask"
        )
        loss.backward()
        s = stats.floats()
        if level == "token":  # w = [1.9, 0.5, 3 -> 0]: -(1.9 + 0.5 + 0) / 3
            assert loss.item() == pytest.approx(-2.4 / 3, abs=ATOL)
            torch.testing.assert_close(leaf.grad, torch.tensor([[-1.9 / 3, -0.5 / 3], [0.0, 0.0]]), atol=ATOL, rtol=0)
            assert s["effective_sample_size"] == pytest.approx(2.4**2 / (1.9**2 + 0.25), abs=1e-5)
        else:  # sequence weights [0.95, 0.95 | 3 -> 0]
            assert loss.item() == pytest.approx(-1.9 / 3, abs=ATOL)
            torch.testing.assert_close(leaf.grad, torch.tensor([[-0.95 / 3, -0.95 / 3], [0.0, 0.0]]), atol=ATOL, rtol=0)
        assert s["masked_fraction"] == pytest.approx(1 / 3, abs=ATOL)
        assert s["truncated_fraction"] == 0.0


def test_is_level_and_mode_are_checked():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="is_level"):
        policy_loss(z, z, z, z, torch.ones(1, 1), correction="tis", clip_eps=0.2, is_cap=2.0, is_level="step")
    with pytest.raises(ValueError, match="is_mode"):
        policy_loss(z, z, z, z, torch.ones(1, 1), correction="tis", clip_eps=0.2, is_cap=2.0, is_mode="drop")


# --------------------------------------------------------------------------- loss aggregation


def test_aggregate_tokens_hand_computed():
    """x = [[1, 2, 3], [4, pad, pad]]: token mean 10/4; sequence mean (2 + 4)/2 = 3;
    fixed-length sum 10 / (2 rows * 5 tokens) = 1 (Dr. GRPO's constant normaliser)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = ragged_mask([3, 1], 3)
    garbage = fill_garbage(x, mask)
    assert aggregate_tokens(garbage, mask, "token_mean").item() == pytest.approx(2.5)
    assert aggregate_tokens(garbage, mask, "sequence_mean").item() == pytest.approx(3.0)
    assert aggregate_tokens(garbage, mask, "fixed_length_sum", max_tokens=5).item() == pytest.approx(1.0)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in ("token_mean", "sequence_mean", "fixed_length_sum"):
        assert aggregate_tokens(garbage, empty, mode, max_tokens=5).item() == 0.0
    # rows without tokens do not count as sequences
    assert aggregate_tokens(garbage, ragged_mask([3, 0], 3), "sequence_mean").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate_tokens(x, mask, "fixed_length_sum")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_tokens(x, mask, "sum")


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "fixed_length_sum"])
def test_policy_loss_aggregation_weights_tokens_as_documented(mode):
    """On-policy (r = 1, w = 1) the loss is the aggregate of -A and the gradient on token
    (b, t) is -A / n_tokens, -A / (B' * len_b) or -A / (B * L)."""
    lp = lp_leaf([[-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = ragged_mask([3, 1], 3)
    leaf = lp.detach().clone().requires_grad_(True)
    loss, _ = policy_loss(
        leaf,
        lp.detach(),
        lp.detach(),
        adv,
        mask,
        correction="decoupled",
        clip_eps=0.2,
        is_cap=2.0,
        aggregation=mode,
        max_tokens=5,
    )
    loss.backward()
    scale = {
        "token_mean": torch.tensor([[4.0] * 3, [4.0] * 3]),
        "sequence_mean": torch.tensor([[6.0] * 3, [2.0] * 3]),
        "fixed_length_sum": torch.full((2, 3), 10.0),
    }[mode]
    torch.testing.assert_close(leaf.grad, torch.where(mask, -adv / scale, 0.0), atol=ATOL, rtol=0)
    assert loss.item() == pytest.approx(-aggregate_tokens(adv, mask, mode, max_tokens=5).item(), abs=ATOL)
