"""A LoRA policy in the learner (``learner.lora``): the reference is the base with the adapters
disabled, bit for bit a separate frozen copy's, after training moved the adapters; only the
adapters (and a value head) train; the policy is built, checkpointed and resumed as an adapter."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from streamrl.common.config import Config, LearnerSection, LoraSection
from streamrl.common.lora import adapter_tensors, apply_lora, is_adapter_folder, is_lora
from streamrl.common.models import build_char_tokenizer, build_tiny_model, save_tiny_model
from streamrl.common.modes import AdvantageEstimator
from streamrl.services.learner.batch import collate, forward_completions
from streamrl.services.learner.build import build_trainer
from streamrl.services.learner.checkpoint import save_checkpoint
from streamrl.services.learner.trainer import PPOTrainer
from support import scored_item

TOKENIZER = build_char_tokenizer()
LORA = LoraSection(rank=4, alpha=8.0)


def rewarded_batch():
    """Two groups of two; in each, reward 1 for completion ``[20, 21]`` and 0 for ``[8, 9]``: non-zero
    group advantages on different completions (a policy-gradient step moves the policy)."""
    items = [scored_item(g, k) for g in ("a", "b") for k in (0, 1)]
    for item in items:
        if item.reward == 1.0:
            item.rollout.completion_tokens = np.array([20, 21], dtype=np.int32)
    return collate(items, pad_id=TOKENIZER.pad_token_id)


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("advantage", [AdvantageEstimator.GRPO, AdvantageEstimator.GAE])
def test_reference_is_the_base_with_adapters_disabled_exactly(advantage):
    base = build_tiny_model(TOKENIZER, seed=0)
    frozen = copy.deepcopy(base).eval()  # what the reference was before: a second full copy
    policy = apply_lora(base, LORA)
    cfg = LearnerSection(lora=LORA, lr=1e-2, advantage=advantage, kl_coef=0.05)
    trainer = PPOTrainer(policy, None, cfg)
    assert trainer.reference is policy  # no second copy
    batch = rewarded_batch()
    before = lora_parameters(policy)
    for step in range(3):
        trainer.step(batch, current_version=step)
    after = lora_parameters(policy)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapters moved
    trainable = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    want = {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    if trainer.value_head is not None:  # gae: a value head on the adapted trunk
        want |= {id(p) for p in trainer.value_head.parameters()}
        assert trainer.value_head.weight.abs().sum() > 0  # it trained (it starts at 0)
    assert trainable == want
    inner = {
        n.replace(".base_layer", ""): t for n, t in policy.get_base_model().state_dict().items() if "lora_" not in n
    }
    assert inner.keys() == frozen.state_dict().keys()
    assert all(torch.equal(t, inner[n]) for n, t in frozen.state_dict().items())  # the base never moved
    targets = trainer.targets(batch.to(trainer.device))
    with torch.no_grad():
        separate = forward_completions(frozen, batch, truncate=False).logprobs
        adapted = forward_completions(policy, batch, truncate=False).logprobs
    assert torch.equal(targets.ref_logprobs, separate)  # exact: the same ops on the same weights
    assert not torch.allclose(adapted, separate, atol=1e-4)  # while the policy itself moved away
    assert targets.kl_mean != 0.0


def test_reference_none_needs_a_lora_policy():
    with pytest.raises(ValueError, match="LoRA"):
        PPOTrainer(build_tiny_model(TOKENIZER, seed=0), None, LearnerSection())


def test_build_checkpoint_and_resume_an_adapter(tmp_path):
    folder = save_tiny_model(tmp_path / "base", seed=0)
    cfg = Config(model={"path": str(folder)}, learner={"lora": LORA.model_dump(), "lr": 1e-2})
    trainer, tokenizer, state = build_trainer(cfg, torch.device("cpu"), None)
    assert is_lora(trainer.policy) and trainer.reference is trainer.policy and state is None
    batch = rewarded_batch()
    for step in range(2):
        trainer.step(batch, current_version=step)
    saved = save_checkpoint(
        tmp_path / "checkpoints",
        step=2,
        version=2,
        policy=trainer.policy,
        tokenizer=tokenizer,
        trainer_state=trainer.state_dict(),
    )
    assert is_adapter_folder(saved / "model")
    assert not (saved / "model" / "model.safetensors").exists()  # the adapter only, not the base
    resumed, _, state = build_trainer(cfg, torch.device("cpu"), saved)
    assert state["step"] == 2 and is_lora(resumed.policy)
    want, got = adapter_tensors(trainer.policy), adapter_tensors(resumed.policy)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # the resumed run continues exactly: one more step on both gives the same adapter
    for model in (trainer, resumed):
        torch.manual_seed(0)  # the same minibatch order
        model.step(batch, current_version=2)
    want, got = adapter_tensors(trainer.policy), adapter_tensors(resumed.policy)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) == 0.0
    with pytest.raises(RuntimeError, match="holds a LoRA adapter but learner.lora is not set"):
        build_trainer(Config(model={"path": str(folder)}), torch.device("cpu"), saved)


def test_target_modules_the_model_lacks_are_refused_with_the_key(tmp_path):
    folder = save_tiny_model(tmp_path / "base", seed=0)
    cfg = Config(model={"path": str(folder)}, learner={"lora": {"target_modules": ["c_attn"]}})
    with pytest.raises(RuntimeError, match=r"learner.lora.target_modules \['c_attn'\] do not fit"):
        build_trainer(cfg, torch.device("cpu"), None)
