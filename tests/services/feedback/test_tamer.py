"""TAMER+RL on the pipeline's side: control sharing in the generator, and how the learner takes the
shaping term and the control-sharing weight."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from feedback_support import scored
from streamrl.common.config import LearnerSection
from streamrl.common.human import human_terms
from streamrl.common.messages import HumanScore, Selection
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.modes import HumanCombination
from streamrl.services.generator.control import share_control
from streamrl.services.generator.sampling import Completion
from streamrl.services.learner.batch import collate
from streamrl.services.learner.trainer import PPOTrainer


class StubView:
    """H-hat = the completion's first token id / 10; eligibility = 1 - 0.1 * first token id."""

    version = 9

    def score(self, prompts, completions, now):
        first = np.array([float(c[0]) for c in completions])
        return first / 10, 1 - first / 10


def completion(token):
    return Completion(prompt_tokens=np.array([1], np.int32), completion_tokens=np.array([token], np.int32),
                      logprobs=np.array([-1.0], np.float32), finish_reason=None, text=str(token))


def test_share_control_keeps_hhat_best_with_the_recorded_rule():
    # one prompt, G = 2 slots of K = 3 candidates: slot 0 = tokens 1, 5, 3; slot 1 = 2, 2, 0
    candidates = [[completion(t) for t in (1, 5, 3, 2, 2, 0)]]
    kept, selections = share_control(StubView(), candidates, group_size=2, k=3, beta_t=10.0,
                                     rng=np.random.default_rng(0), now=0.0)
    # beta_t * max eligibility >= 1 -> p = 1: H-hat's pick every time; slot 1 ties tokens 2 and 2
    assert [c.completion_tokens[0] for c in kept[0]] == [5, 2]
    first, second = selections[0]
    assert (first.candidates, first.probability, first.by_model, first.model_version) == (3, 1.0, True, 9)
    assert first.density_ratio == pytest.approx(3.0) and first.human_value == pytest.approx(0.5)
    assert second.density_ratio == pytest.approx(1.5)  # K * P(kept) = 3 * (1/2) between the two tied
    # p = beta_t * max eligibility: slot 0's best eligibility is 1 - 0.1 = 0.9
    _, low = share_control(StubView(), candidates, group_size=2, k=3, beta_t=0.5,
                           rng=np.random.default_rng(1), now=0.0)
    assert low[0][0].probability == pytest.approx(0.45) and low[0][1].probability == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 x 3"):
        share_control(StubView(), [candidates[0][:5]], group_size=2, k=3, beta_t=1.0,
                      rng=np.random.default_rng(0), now=0.0)


def test_the_learner_weights_advantages_by_one_over_rho_and_shapes_rewards():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_model(tokenizer, seed=0)
    cfg = LearnerSection(groups_per_step=2, kl_coef=0.0, advantage="rloo", normalize_rewards=False,
                         reward_clip=None)
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
