"""TAMER+RL on the pipeline's side: control sharing in the generator, and how the learner takes the
shaping term and the control-sharing weight."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from feedback_support import scored
from streamrl.common.config import LearnerSection, validate_config
from streamrl.common.human import human_terms
from streamrl.common.messages import HumanScore, Selection
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.modes import HumanCombination
from streamrl.services.generator.control import candidate_law, select_candidates
from streamrl.services.generator.sampling import Completion
from streamrl.services.learner.batch import collate
from streamrl.services.learner.loop import LearnerService
from streamrl.services.learner.trainer import PPOTrainer


class StubView:
    """H-hat = the completion's first token id / 10; eligibility = 1 - 0.1 * first token id."""

    version = 9

    def score(self, prompts, completions, now):
        first = np.array([float(c[0]) for c in completions])
        return first / 10, 1 - first / 10


def completion(token):
    return Completion(
        prompt_tokens=np.array([1], np.int32),
        completion_tokens=np.array([token], np.int32),
        logprobs=np.array([-1.0], np.float32),
        finish_reason=None,
        text=str(token),
    )


def share_control(*args, **kwargs):
    return select_candidates(*args, combination=HumanCombination.CONTROL_SHARING, **kwargs)


def test_share_control_keeps_hhat_best_with_the_recorded_rule():
    # one prompt, G = 2 slots of K = 3 candidates: slot 0 = tokens 1, 5, 3; slot 1 = 2, 2, 0
    candidates = [[completion(t) for t in (1, 5, 3, 2, 2, 0)]]
    kept, selections = share_control(
        StubView(), candidates, group_size=2, k=3, beta_t=10.0, rng=np.random.default_rng(0), now=0.0
    )
    # beta_t * max eligibility >= 1 -> p = 1: H-hat's pick every time; slot 1 ties tokens 2 and 2
    assert [c.completion_tokens[0] for c in kept[0]] == [5, 2]
    first, second = selections[0]
    assert (first.candidates, first.probability, first.by_model, first.model_version) == (3, 1.0, True, 9)
    assert first.density_ratio == pytest.approx(3.0) and first.human_value == pytest.approx(0.5)
    assert second.density_ratio == pytest.approx(1.5)  # K * P(kept) = 3 * (1/2) between the two tied
    # p = beta_t * max eligibility: slot 0's best eligibility is 1 - 0.1 = 0.9
    _, low = share_control(StubView(), candidates, group_size=2, k=3, beta_t=0.5, rng=np.random.default_rng(1), now=0.0)
    assert low[0][0].probability == pytest.approx(0.45) and low[0][1].probability == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 x 3"):
        share_control(
            StubView(), [candidates[0][:5]], group_size=2, k=3, beta_t=1.0, rng=np.random.default_rng(0), now=0.0
        )


def test_the_learner_weights_advantages_by_one_over_rho_and_shapes_rewards():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_model(tokenizer, seed=0)
    cfg = LearnerSection(groups_per_step=2, kl_coef=0.0, advantage="rloo", normalize_rewards=False, reward_clip=None)
    trainer = PPOTrainer(policy, copy.deepcopy(policy).eval(), cfg)
    rollouts = [scored(f"r{i}", group=f"g{i // 2}", reward=float(i)) for i in range(4)]
    rollouts[1].rollout.selection = Selection(candidates=4, probability=0.5, by_model=True, density_ratio=2.5)
    rollouts[2].human = HumanScore(value=-1.0, eligibility=0.5, model_version=1)
    rollouts[3].human = HumanScore(value=1.0, eligibility=1.0, model_version=1, active=False)  # paused
    plain = trainer.targets(collate(rollouts, pad_id=tokenizer.pad_token_id)).advantages
    terms = human_terms(rollouts, combination=HumanCombination.REWARD_SHAPING, beta_t=2.0)
    tb = collate(rollouts, pad_id=tokenizer.pad_token_id)
    tb.scores = tb.scores + torch.from_numpy(terms.shaping)
    tb.weights = torch.from_numpy(terms.weights)
    weighted = trainer.targets(tb).advantages
    # rloo with groups of 2: A_i = r_i - r_other; shaping: r_2 = 2 + 2 * 0.5 * (-1) = 1, r_3 = 3 (paused)
    want = torch.tensor([-1.0, 1.0 / 2.5, 1 - 3.0, 3.0 - 1])
    assert weighted[:, 0].tolist() == pytest.approx(want.tolist())
    assert plain[:, 0].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])
    # the weight survives minibatch selection
    assert tb.select(torch.tensor([1])).weights.tolist() == pytest.approx([0.4])


def test_action_biasing_keeps_a_candidate_by_softmax_of_beta_e_hhat_and_records_its_exact_probability():
    # one prompt, G = 1 slot of K = 3 candidates, tokens 1, 5, 3: H = 0.1, 0.5, 0.3; E = 0.9, 0.5, 0.7
    candidates = [[completion(t) for t in (1, 5, 3)]]
    beta_t = 4.0
    logits = [beta_t * e * h for h, e in ((0.1, 0.9), (0.5, 0.5), (0.3, 0.7))]  # 0.36, 1.0, 0.84
    want = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    got = {}
    for seed in range(200):
        kept, selections = select_candidates(
            StubView(),
            candidates,
            group_size=1,
            k=3,
            beta_t=beta_t,
            rng=np.random.default_rng(seed),
            now=0.0,
            combination=HumanCombination.ACTION_BIASING,
        )
        token, selection = int(kept[0][0].completion_tokens[0]), selections[0][0]
        got[token] = selection
        assert selection.human_value == pytest.approx(token / 10) and selection.model_version == 9
    assert sorted(got) == [1, 3, 5]
    for j, token in enumerate((1, 5, 3)):
        assert got[token].probability == pytest.approx(want[j])
        assert got[token].density_ratio == pytest.approx(3 * want[j])  # the learner weights by 1 / rho
        assert got[token].by_model == (token == 5)  # H-hat's best
    # the law the evaluation averages over is the one the rule draws from
    h, e = np.array([0.1, 0.5, 0.3]), np.array([0.9, 0.5, 0.7])
    assert candidate_law(HumanCombination.ACTION_BIASING, h, e, beta_t) == pytest.approx(want, abs=1e-15)
    # control sharing: p = min(beta_t * max E, 1) = 0.45 on H-hat's best, the rest uniform
    law = candidate_law(HumanCombination.CONTROL_SHARING, h, e, 0.5)
    assert law == pytest.approx([0.55 / 3, 0.55 / 3 + 0.45, 0.55 / 3], abs=1e-15)
    with pytest.raises(ValueError, match="does not select"):
        candidate_law(HumanCombination.Q_AUGMENTATION, h, e, 1.0)
    with pytest.raises(ValueError, match="does not select"):
        select_candidates(
            StubView(),
            candidates,
            group_size=1,
            k=3,
            beta_t=1.0,
            rng=np.random.default_rng(0),
            now=0.0,
            combination=HumanCombination.REWARD_SHAPING,
        )


def learner_targets(combination: HumanCombination, rollouts, advantage: str = "rloo"):
    """The trainer's targets of ``rollouts`` after the learner service applied the human terms (beta_t = 2)."""
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_model(tokenizer, seed=0)
    cfg = validate_config(
        {
            "feedback": {"enabled": True, "combination": combination.value, "beta": 2.0, "beta_decay": 1.0},
            "learner": {
                "groups_per_step": 2,
                "kl_coef": 0.0,
                "advantage": advantage,
                "normalize_rewards": False,
                "reward_clip": None,
                "whiten_advantages": False,
                "lam": 1.0,
                "gamma": 1.0,
            },
        }
    )
    trainer = PPOTrainer(policy, copy.deepcopy(policy).eval(), cfg.learner)
    tb = collate(rollouts, pad_id=tokenizer.pad_token_id)
    LearnerService._human_terms(SimpleNamespace(cfg=cfg, step=0), SimpleNamespace(rollouts=rollouts), tb)
    return trainer.targets(tb)


def test_q_augmentation_adds_beta_e_hhat_to_the_advantage_not_to_the_reward():
    rollouts = [scored(f"r{i}", group=f"g{i // 2}", reward=float(i)) for i in range(4)]
    rollouts[0].human = HumanScore(value=1.0, eligibility=1.0, model_version=1)
    rollouts[2].human = HumanScore(value=-1.0, eligibility=0.5, model_version=1)
    rollouts[3].human = HumanScore(value=1.0, eligibility=1.0, model_version=1, active=False)  # paused
    augmented = learner_targets(HumanCombination.Q_AUGMENTATION, copy.deepcopy(rollouts)).advantages[:, 0]
    shaped = learner_targets(HumanCombination.REWARD_SHAPING, copy.deepcopy(rollouts)).advantages[:, 0]
    # rloo, groups of 2 on R = 0, 1 | 2, 3: A = -1, 1 | -1, 1; bonus = 2 * E * H = 2, 0 | -1, 0 (r3 paused)
    assert augmented.tolist() == pytest.approx([-1 + 2, 1, -1 - 1, 1])
    # reward shaping instead moves the rewards (2, 1 | 1, 3), so the group baseline moves with them
    assert shaped.tolist() == pytest.approx([1, -1, -2, 2])
    # GAE: the critic's targets (returns) stay R's; only the advantages move, by the bonus on every token
    plain = learner_targets(HumanCombination.NONE, copy.deepcopy(rollouts), advantage="gae")
    gae = learner_targets(HumanCombination.Q_AUGMENTATION, copy.deepcopy(rollouts), advantage="gae")
    mask = plain.returns != 0
    assert torch.equal(gae.returns, plain.returns)
    bonus = torch.tensor([2.0, 0.0, -1.0, 0.0]).unsqueeze(1).expand_as(mask)
    assert torch.allclose((gae.advantages - plain.advantages)[mask], bonus[mask])
