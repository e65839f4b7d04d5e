"""The SFT and reward-model losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from streamrl.stages.rlhf_losses import kwise_ranking_loss, pairwise_loss, ranking_accuracy, response_nll, sft_loss


def softplus_neg(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def test_pairwise_loss_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigma(1) = 0.313261687518, -log sigma(-2) = 2.126928011043; mean 1.220094849281
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(1.2200948492805979, abs=1e-6)
    assert pairwise_loss(torch.tensor([0.3]), torch.tensor([0.3])).item() == pytest.approx(math.log(2), abs=1e-7)


def test_kwise_loss_hand_values_with_padding():
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 99.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    # row 0: (2 * -log sigma(1) + -log sigma(2)) / C(3,2) = (0.626523 + 0.126928) / 3 = 0.251150
    # row 1 (K = 2, the padded 99 ignored): -log sigma(0 - 3) = 3.048587
    assert kwise_ranking_loss(rewards, valid).item() == pytest.approx(1.6498689068001073, abs=1e-6)
    assert kwise_ranking_loss(rewards[:1]).item() == pytest.approx(
        (2 * softplus_neg(1) + softplus_neg(2)) / 3, abs=1e-6
    )


def test_kwise_with_k2_equals_pairwise():
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    kwise = kwise_ranking_loss(torch.stack([chosen, rejected], dim=1))
    assert kwise.item() == pytest.approx(pairwise_loss(chosen, rejected).item(), abs=1e-6)


def test_kwise_gradient_pushes_the_better_response_up():
    rewards = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    kwise_ranking_loss(rewards).backward()
    grad = rewards.grad[0]
    assert grad[0] < 0 < grad[2] and grad[1] == pytest.approx(0.0, abs=1e-7)  # descent raises r_0, lowers r_2


def test_kwise_rejects_rows_without_a_comparison():
    with pytest.raises(ValueError, match="at least 2 valid"):
        kwise_ranking_loss(torch.zeros(2, 3), torch.tensor([[True, True, False], [True, False, False]]))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        kwise_ranking_loss(torch.zeros(3))


def test_response_nll_counts_response_tokens_only():
    # tokens 0, 1, 1; tokens 0 and 1 are the prompt, token 2 the response.
    input_ids = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[0, 0, 1]])
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]]])
    total, count = response_nll(logits, input_ids, mask)
    # only position 1 predicts a response token: p(1) = 3 / 4, nll = log(4 / 3); position 0 (a
    # prompt target, nll log 2) and position 2 (predicts nothing) do not count.
    assert count.item() == 1
    assert total.item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    with_prompt = response_nll(logits, input_ids, torch.tensor([[0, 1, 1]]))[0].item()
    assert with_prompt == pytest.approx(math.log(4 / 3) + math.log(2), abs=1e-6)
    assert sft_loss(logits, input_ids, mask).item() == pytest.approx(math.log(4 / 3), abs=1e-6)


def test_response_nll_ignores_prompt_logits_and_gives_them_no_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    input_ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    sft_loss(logits, input_ids, mask).backward()
    assert torch.all(logits.grad[0, [0, 3, 4]] == 0) and torch.all(logits.grad[1, 4] == 0)
    assert torch.any(logits.grad[0, 1] != 0)


def test_ranking_accuracy_standard_error_and_margin():
    chosen = torch.tensor([1.0, 2.0, 0.0, 5.0])
    rejected = torch.tensor([0.0, 3.0, 0.0, 1.0])
    result = ranking_accuracy(chosen, rejected)
    # wins 1, 0, tie (half), 1 -> 2.5 / 4; SE sqrt(0.625 * 0.375 / 4); margins 1, -1, 0, 4
    assert result.accuracy == pytest.approx(0.625)
    assert result.stderr == pytest.approx(math.sqrt(0.625 * 0.375 / 4))
    assert result.margin == pytest.approx(1.0)
    assert result.margin_stderr == pytest.approx(torch.tensor([1.0, -1, 0, 4]).std().item() / 2)
    assert result.n == 4
