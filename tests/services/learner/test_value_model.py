"""The critic initialised from the reward model (InstructGPT): equality at initialisation, its
own learning rate, checkpoint state, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from streamrl.common.config import ConfigError, LearnerSection, LoraSection, validate_config
from streamrl.common.lora import apply_lora
from streamrl.common.messages import FinishReason, Rollout, SamplingParams, ScoredRollout
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.reward_model import REWARD_INFO_KEY, RewardModel, RewardModelInfo
from streamrl.services.learner.batch import collate
from streamrl.services.learner.trainer import PPOTrainer
from streamrl.services.learner.value_model import ValueModel

CPU = torch.device("cpu")
TOKENIZER = build_char_tokenizer()


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model (random score head, stored bias -0.4) with the policy's vocabulary."""
    folder = tmp_path_factory.mktemp("critic") / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    setattr(model.config, REWARD_INFO_KEY, RewardModelInfo(bias=-0.4, max_length=128).to_dict())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def scored(group: str, prompt: str, completion: str, reward: float) -> ScoredRollout:
    p = TOKENIZER(prompt, add_special_tokens=False)["input_ids"]
    c = TOKENIZER(completion, add_special_tokens=False)["input_ids"]
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
            policy_version=0,
            finish_reason=FinishReason.LENGTH,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8),
        ),
        reward=reward,
    )


def batch():
    return collate(
        [
            scored("a", "Say:", "good!!", 1.0),
            scored("a", "Say:", "no", 0.0),
            scored("b", "A longer prompt", "abc", 0.5),
            scored("b", "A longer prompt", "zz top!", 0.2),
        ],
        pad_id=TOKENIZER.pad_token_id,
    )


def test_first_values_equal_the_reward_models_scores(rm_dir):
    """V(s_t) before training = the RM's (normalised) score of the text s_t = prompt + the
    first t completion tokens, as the scorer computes it from the text."""
    critic = ValueModel.from_reward_model(str(rm_dir), device=CPU, tokenizer=TOKENIZER)
    rm = RewardModel(str(rm_dir), device=CPU)
    tb = batch()
    with torch.no_grad():
        values = critic(tb)
    for b in range(tb.size):
        for t in range(int(tb.mask[b].sum())):
            prefix = tb.input_ids[b, : int(tb.positions[b, t]) + 1].tolist()
            assert values[b, t].item() == pytest.approx(rm.score_texts([TOKENIZER.decode(prefix)])[0], abs=1e-5)
    last = [int(tb.mask[b].sum()) - 1 for b in range(tb.size)]
    assert len({round(values[b, t].item(), 4) for b, t in enumerate(last)}) == tb.size  # not a constant


@pytest.mark.parametrize("lora", [None, LoraSection(rank=4, alpha=8.0)], ids=["full", "lora"])
def test_trainer_trains_the_value_model_with_its_own_learning_rate(rm_dir, lora):
    """Also with a LoRA policy (``learner.lora``): the critic from the RM is a model of its own, trained
    in full with its own learning rate, while the policy trains only its adapters."""
    cfg = LearnerSection(advantage="gae", lr=1e-2, value_lr=3e-3, kl_coef=0.0, device="cpu", lora=lora)

    def policy_and_reference():
        policy = build_tiny_model(TOKENIZER, seed=0)
        return (apply_lora(policy, lora), None) if lora else (policy, build_tiny_model(TOKENIZER, seed=0))

    critic = ValueModel.from_reward_model(str(rm_dir), device=CPU, tokenizer=TOKENIZER)
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    trainer = PPOTrainer(*policy_and_reference(), cfg, value_model=critic)
    assert trainer.value_head is None and trainer.value_model is critic
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, 3e-3]
    policy_group, critic_group = (g["params"] for g in trainer.optimizer.param_groups)
    assert len(critic_group) == len(list(critic.parameters()))
    trained = [p for n, p in trainer.policy.named_parameters() if "lora_" in n or not lora]
    assert {id(p) for p in policy_group} == {id(p) for p in trained}
    with torch.no_grad():
        first = critic(batch())
    assert torch.equal(trainer.targets(batch()).old.values, first)  # GAE bootstraps from the RM's values
    stats = trainer.step(batch(), current_version=0)
    assert stats["loss/value"] > 0
    assert not torch.equal(critic.state_dict()["bias"], before["bias"])
    state = trainer.state_dict()
    fresh = ValueModel.from_reward_model(str(rm_dir), device=CPU)
    other = PPOTrainer(*policy_and_reference(), cfg, value_model=fresh)
    other.load_state_dict(state)
    for key, value in critic.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_another_vocabulary_is_refused(rm_dir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    )
    with pytest.raises(ValueError, match="another vocabulary than the policy"):
        ValueModel.from_reward_model(str(rm_dir), device=CPU, tokenizer=other)


def test_config_allows_a_value_model_with_gae_only():
    with pytest.raises(ConfigError, match="applies only when advantage"):
        validate_config({"learner": {"value_model": "rm", "advantage": "grpo"}})
    cfg = validate_config({"learner": {"value_model": "rm", "advantage": "gae"}}).learner
    assert cfg.value_model == "rm" and cfg.value_lr is None
