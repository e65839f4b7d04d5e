"""Cross-component tests: the real generator sampling code (``sample_completions``) feeds
the real learner (``collate``, ``forward_completions``, ``PPOTrainer``) in-process with a
tiny model. At staleness 0 the learner's pi_old must be the generator's mu on every token,
under every sampling setting the config accepts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from streamrl.common.config import Config, LearnerSection
from streamrl.common.messages import Rollout, SamplingParams, ScoredRollout
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.modes import KLEstimator, KLPenaltyMode
from streamrl.services.generator.sampling import encode_prompts, sample_completions
from streamrl.services.learner.batch import TrainBatch, collate
from streamrl.services.learner.trainer import PPOTrainer
from support import slow_nucleus

TOKENIZER = build_char_tokenizer()
PROMPTS = ["The film was", "I think that", "abc"]
RATIO_ATOL = 1e-4  # float32 logits through a KV cache vs one padded forward pass


def generate(model, sampling: SamplingParams, *, seed: int = 0, version: int = 0, group_size: int = 4) -> TrainBatch:
    """Sample with the real generator code and collate as the learner does (rewards: row index)."""
    torch.manual_seed(seed)
    ids = encode_prompts(TOKENIZER, PROMPTS, max_prompt_tokens=32, add_special_tokens=False)
    groups = sample_completions(model, TOKENIZER, ids, group_size=group_size, sampling=sampling)
    rows = []
    for g, group in enumerate(groups):
        for j, c in enumerate(group):
            rollout = Rollout(
                prompt_id=str(g),
                group_id=f"g{g}",
                rollout_id=f"g{g}-{j}",
                generator_id="gen-0",
                group_size=group_size,
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.completion_tokens,
                behaviour_logprobs=c.logprobs,
                policy_version=version,
                finish_reason=c.finish_reason,
                sampling=sampling,
            )
            rows.append(ScoredRollout(rollout=rollout, reward=float(len(rows) % 3)))
    return collate(rows, pad_id=TOKENIZER.pad_token_id)


def trainer_for(policy, **learner) -> PPOTrainer:
    cfg = LearnerSection(**{"lr": 1e-3, "device": "cpu", **learner})
    return PPOTrainer(policy, copy.deepcopy(policy), cfg)


def raw_log_ratios(trainer: PPOTrainer, batch: TrainBatch) -> torch.Tensor:
    """log(pi_old / mu) on every real token (1-D)."""
    old = trainer.targets(batch).old.logprobs
    return (old - batch.behaviour_logprobs)[batch.mask > 0]


def assert_exact_ratios(trainer: PPOTrainer, batch: TrainBatch) -> None:
    log_ratio = raw_log_ratios(trainer, batch)
    assert log_ratio.numel() >= 20
    assert log_ratio.abs().max().item() < RATIO_ATOL, log_ratio.abs().max()
    stats = trainer.step(batch, current_version=0)  # staleness 0
    assert stats["importance_ratio_mean"] == pytest.approx(1.0, abs=RATIO_ATOL)
    assert stats["importance_ratio_max"] == pytest.approx(1.0, abs=RATIO_ATOL)
    assert stats["ess_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_fraction"] == 0.0  # first update: pi == pi_old
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-10)


def test_learner_uses_the_temperature_recorded_in_the_rollouts():
    """A generator started with --set generator.temperature=0.6 while the learner's config
    says 1.0: the learner's ratios stay exact because it reads the rollouts' temperature."""
    cfg = Config()
    assert cfg.generator.temperature == 1.0
    model = build_tiny_model(TOKENIZER, seed=0)
    batch = generate(model, SamplingParams(temperature=0.6, top_p=1.0, max_new_tokens=10))
    assert batch.sampling.temperature == 0.6
    assert_exact_ratios(trainer_for(build_tiny_model(TOKENIZER, seed=0)), batch)
    # the control: read at the config's temperature the same tokens are far from mu
    at_config = copy.deepcopy(batch)
    at_config.sampling = SamplingParams(temperature=cfg.generator.temperature, top_p=1.0, max_new_tokens=10)
    assert raw_log_ratios(trainer_for(build_tiny_model(TOKENIZER, seed=0)), at_config).abs().max() > 0.05


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_ratios_are_exact_under_the_learner_side_nucleus(temperature):
    """top_p < 1: mu is the nucleus-truncated distribution; the learner computes pi_old
    under the same truncation (the nucleus of the policy being evaluated), so at staleness
    0 pi_old/mu = 1 on every token and every correction's weights are 1 (ESS fraction 1)."""
    model = build_tiny_model(TOKENIZER, seed=0)
    batch = generate(model, SamplingParams(temperature=temperature, top_p=0.7, max_new_tokens=10), seed=3)
    for correction in ("none", "tis", "decoupled"):
        trainer = trainer_for(build_tiny_model(TOKENIZER, seed=0), correction=correction, kl_coef=0.1)
        assert_exact_ratios(trainer, copy.deepcopy(batch))
    # the KL penalty compares the truncated policy with the untruncated reference: at pi == ref each
    # token's k1 is log(p / Z_t) - log p = -log Z_t, Z_t the nucleus mass (from an unpadded pass)
    trainer = trainer_for(build_tiny_model(TOKENIZER, seed=0), kl_coef=0.1)
    floor = []
    with torch.no_grad():
        for row in range(batch.size):
            n, length = int(batch.mask[row].sum()), int(batch.attention_mask[row].sum())
            logits = model(input_ids=batch.input_ids[row : row + 1, :length]).logits[0].double() / temperature
            logits = logits[batch.positions[row, :n]]
            mass = torch.where(slow_nucleus(logits, 0.7), torch.softmax(logits, -1), 0.0).sum(-1)
            floor += (-mass.log()).tolist()
    assert 0 < np.mean(floor) <= -np.log(0.7) + 1e-6
    assert trainer.targets(batch).kl_mean == pytest.approx(np.mean(floor), abs=1e-5)


@pytest.mark.parametrize("correction", ["none", "tis", "decoupled"])
def test_top_p_with_a_different_behaviour_policy_is_finite_and_seen_by_the_diagnostics(correction):
    """mu from other weights at top_p 0.5: some sampled tokens lie outside pi_old's nucleus
    (pi_old = 0). Their weight is 0, the ratio and ESS diagnostics report it, and the
    step stays finite (no NaN from -inf log-probs in losses, KL or statistics)."""
    behaviour = build_tiny_model(TOKENIZER, seed=1)
    batch = generate(behaviour, SamplingParams(temperature=1.0, top_p=0.5, max_new_tokens=10), seed=5)
    trainer = trainer_for(
        build_tiny_model(TOKENIZER, seed=0), correction=correction, kl_coef=0.1, ppo_epochs=2, minibatches=2
    )
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    stats = trainer.step(batch, current_version=1)
    assert all(np.isfinite(v) for v in stats.values()), stats
    assert stats["outside_nucleus_fraction"] > 0.05
    assert stats["importance_ratio_mean"] < 0.9
    if correction != "none":
        assert stats["ess_fraction"] < 0.9
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_a_model_with_its_own_generation_config_keeps_ratios_exact():
    """A checkpoint whose generation_config carries sampling defaults (repetition penalty,
    n-gram ban, top-k, typical-p, its own temperature): the generator overrides them, so
    the learner's pi_old is mu on every token."""
    model = build_tiny_model(TOKENIZER, seed=0)
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k, gc.typical_p, gc.temperature = 1.3, 2, 5, 0.8, 0.3
    batch = generate(model, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10), seed=7)
    assert_exact_ratios(trainer_for(build_tiny_model(TOKENIZER, seed=0)), batch)


def tiny_gpt2(dropout: float = 0.1):
    """A random tiny GPT-2 (dropout 0.1 in embeddings, attention and residuals, as GPT-2
    ships) with the char tokenizer's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(TOKENIZER),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=TOKENIZER.bos_token_id,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


def tiny_llama_with_attention_dropout():
    """The tiny Llama with attention dropout 0.3 (functional dropout keyed on ``training``,
    which ``nn.Dropout`` module surgery alone does not reach)."""
    model = build_tiny_model(TOKENIZER, seed=0)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    return model


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama_with_attention_dropout], ids=["gpt2", "llama"])
def test_dropout_never_makes_a_spurious_ratio(make):
    """A model with dropout: pi_old (no-grad pass) and pi (the update's pass) must be the
    same function, so at staleness 0 every ratio is exactly 1 in the first update."""
    batch = generate(make(), SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10), seed=8)
    trainer = trainer_for(make(), kl_coef=0.1, kl_penalty="loss", kl_estimator="k3")
    assert_exact_ratios(trainer, batch)
    stats = trainer.step(copy.deepcopy(batch), current_version=1)  # a second step: the policy moved
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-10)  # still pi == pi_old in its first update
    assert not any(m.training for m in trainer.reference.modules())


@torch.no_grad()
def exact_kl_to_reference(policy, reference, batch: TrainBatch) -> float:
    """KL(pi || ref) summed over the vocabulary at every completion position, averaged over
    real tokens (not a sampled estimate)."""

    def logp(model):
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        hidden = hidden.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return torch.log_softmax(model.get_output_embeddings()(hidden).double(), -1)

    lp, lq = logp(policy), logp(reference)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float((kl * batch.mask).sum() / batch.mask.sum())


def kl_loss_run(estimator: str, steps: int = 6) -> list[float]:
    """Exact KL(pi || ref) over ``steps`` learner steps whose only force is the KL loss term:
    the policy starts away from the reference, every reward is 0 (zero advantages)."""
    reference = build_tiny_model(TOKENIZER, seed=0)
    policy = build_tiny_model(TOKENIZER, seed=0)
    with torch.no_grad():
        policy.get_output_embeddings().weight[40:50] += 0.5
    cfg = LearnerSection(lr=3e-3, device="cpu", kl_coef=1.0, normalize_rewards=False)
    # k1 as a loss is refused by the config; built past validation here as the control
    cfg = cfg.model_copy(update={"kl_penalty": KLPenaltyMode.LOSS, "kl_estimator": KLEstimator(estimator)})
    trainer = PPOTrainer(policy, reference, cfg)
    kls = []
    for step in range(steps):
        batch = generate(
            trainer.policy, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8), seed=step, version=step
        )
        batch.scores = torch.zeros_like(batch.scores)
        kls.append(exact_kl_to_reference(trainer.policy, reference, batch))
        trainer.step(batch, current_version=step)
    kls.append(exact_kl_to_reference(trainer.policy, reference, batch))
    return kls


def test_the_kl_loss_term_pulls_the_policy_towards_the_reference():
    """k2 and k3 as loss terms drive the exact KL(pi || ref) from ~2 nats to ~0.1 and keep it
    there; k1, whose expected gradient is 0, only adds noise: its KL wanders back up."""
    runs = {estimator: kl_loss_run(estimator) for estimator in ("k1", "k2", "k3")}
    for estimator in ("k2", "k3"):
        kls = runs[estimator]
        assert kls[0] > 1.0
        assert max(kls[-3:]) < 0.1 * kls[0], (estimator, kls)
    assert runs["k1"][-1] > 3 * max(runs["k2"][-1], runs["k3"][-1]), runs


@pytest.mark.parametrize("correction", ["decoupled", "vtrace"])
def test_the_value_head_learns_a_fixed_task(correction):
    """Critic path on a fixed batch with fixed rewards (gamma = lam = 1: the targets are the
    sequence scores): the value loss falls well below its start."""
    model = build_tiny_model(TOKENIZER, seed=0)
    batch = generate(model, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8), seed=11)
    batch.scores = torch.linspace(-1.0, 1.0, batch.size)
    trainer = trainer_for(
        model,
        advantage="gae",
        correction=correction,
        gamma=1.0,
        lam=1.0,
        lr=1e-3,
        vf_coef=1.0,
        kl_coef=0.0,
        normalize_rewards=False,
        value_clip=None,
    )
    losses = []
    for step in range(25):
        losses.append(trainer.step(copy.deepcopy(batch), current_version=step)["loss/value"])
    assert losses[0] > 0.1
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
