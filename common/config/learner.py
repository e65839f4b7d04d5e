"""``[learner]``: the PPO learner's settings (optimisation, off-policy correction,
advantages, KL penalty, rewards, checkpoints)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from streamrl.common.config.base import LOCAL_PATH, BF16Setting, _rule, _Section
from streamrl.common.config.sources import PromptSource
from streamrl.common.modes import (
    AdvantageEstimator,
    Correction,
    Device,
    ISLevel,
    ISMode,
    KLEstimator,
    KLPenaltyMode,
    LossAggregation,
    RewardScale,
)

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Default LoRA target modules: every linear layer of a Llama-style decoder block (attention and MLP)."""


class LoraSection(_Section):
    """LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): train
    ``W = W0 + (alpha / rank) B A`` on the target linear layers, with PEFT; the base ``W0`` stays frozen."""

    rank: int = Field(
        4,
        ge=1,
        description="r: the rank of A ([r, in]) and B ([out, r]); 4 on every projection sends 0.91% of "
        "SmolLM2-135M's bytes per version (docs/lora.md), and an RL update carries little information per "
        'step (Schulman et al. 2025, "LoRA Without Regret": low ranks match full fine-tuning in RL)',
    )
    alpha: float = Field(8.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="must stay 0: generators merge the adapters and compute the same function as the "
        "learner (a dropout would make pi differ from the behaviour policy mu in every learner pass)",
    )
    target_modules: list[str] = Field(
        list(LLAMA_LORA_TARGETS),
        min_length=1,
        description="names of the linear layers to adapt (PEFT `target_modules`, matched against the "
        "last part of a module name); the default fits Llama-style models (SmolLM2, Llama, Qwen, Mistral)",
    )

    @model_validator(mode="after")
    def _no_dropout(self) -> LoraSection:
        if self.dropout != 0:
            raise _rule(
                f"lora dropout {self.dropout} makes the learner's pi a random function that no generator "
                "computes (generators merge the adapter into their weights): the importance ratios would "
                "compare two different functions; fix: set dropout = 0",
                "dropout",
            )
        return self

    @property
    def scaling(self) -> float:
        """``alpha / rank``: the factor of ``B A`` in the merged weight."""
        return self.alpha / self.rank


class LearnerSection(_Section):
    """The PPO learner."""

    threads: int = Field(1, ge=1, description="torch threads of the learner process")
    device: Device = Field(Device.AUTO, description="`auto` = CUDA when available, else CPU")
    world_size: int = Field(
        1,
        ge=1,
        description="data-parallel learner ranks (DistributedDataParallel; gloo on "
        "CPU, NCCL on CUDA, one GPU per rank): start the learner with `torchrun "
        "--nproc-per-node N -m streamrl.services.learner`; rank 0 owns the sockets, "
        "checkpoints and metrics, every rank trains on its shard of each minibatch",
    )
    total_steps: int = Field(100, ge=1, description="learner steps (= policy versions) to train")
    groups_per_step: int = Field(4, ge=1, description="groups per batch")
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch")
    minibatches: int = Field(1, ge=1, description="minibatches per pass")
    reuse_first_pass: bool = Field(
        True,
        description="the first minibatch's forward pass (nothing updated yet) is "
        "pi_old for its rows, so the no-grad pi_old pass covers only the other rows "
        "(exact, at any top_p)",
    )
    bucket_by_length: bool = Field(
        False,
        description="minibatches of rows of similar length (sorted, split, "
        "shuffled) instead of random rows: less padding per pass; changes which rows "
        "share an update",
    )
    autocast_bf16: BF16Setting = Field(
        False,
        description="run the learner's model passes under bf16 autocast "
        "(`true`, `false`, or `auto`: where the device computes bf16 natively, CPUs "
        "with AVX512-BF16 or AMX, CUDA GPUs with bf16): ~1.4x faster learner steps "
        "of SmolLM2 on one CPU core (`bench/learner_passes.py`); it adds a policy "
        "mismatch (|log pi_old/mu| ~0.03 nats per token) that the importance ratios "
        "correct; log-probs, losses and the optimizer stay float32",
    )
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    correction: Correction = Field(
        Correction.DECOUPLED,
        description="off-policy correction: `none` (PPO ratio "
        "pi/mu), `tis` (truncated importance weight on PPO at pi_old), `decoupled` "
        "(decoupled PPO), `vtrace` (IMPALA's V-trace targets and advantages; needs "
        '`advantage = "gae"`)',
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clipping epsilon")
    dual_clip: float | None = Field(
        3.0,
        gt=1,
        description="c of dual-clip PPO: tokens with a negative "
        "advantage use max(min(r A, clip(r) A), c A), bounding the loss of a huge "
        "ratio (unset = plain clipping)",
    )
    is_cap: float = Field(2.0, ge=1, description="C: truncation of the importance weight pi_old/mu")
    vtrace_rho_bar: float = Field(
        1.0,
        gt=0,
        description="V-trace rho-bar: truncation of pi_old/mu in the "
        "temporal differences and the policy-gradient advantages (IMPALA eq. 1)",
        json_schema_extra={"applies_to": {"correction": "vtrace"}},
    )
    vtrace_c_bar: float = Field(
        1.0,
        gt=0,
        description="V-trace c-bar: truncation of the traces c_t = lam "
        "min(c-bar, pi_old/mu) (with rho-bar >= c-bar, as IMPALA requires for its fixed point)",
        json_schema_extra={"applies_to": {"correction": "vtrace"}},
    )
    is_level: ISLevel = Field(
        ISLevel.SEQUENCE,
        description="`tis` weights: one per `sequence` (the product of "
        "its token ratios) or one per `token` (IMPALA's per-step truncation; the same "
        "objective as `decoupled`)",
        json_schema_extra={"applies_to": {"correction": "tis"}},
    )
    is_mode: ISMode = Field(
        ISMode.TRUNCATE,
        description="a weight above `is_cap`: `truncate` it to C, or `mask` "
        "it to 0 (AReaL), dropping the token or sequence; logged as `masked_fraction`",
        json_schema_extra={"applies_to": {"correction": ["tis", "decoupled"]}},
    )
    advantage: AdvantageEstimator = Field(
        AdvantageEstimator.GRPO, description="`gae` (critic), `grpo` (group-normalised), `rloo` (leave-one-out)"
    )
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    value_clip: float | None = Field(0.2, gt=0, description="value-loss clipping (unset = none)")
    vf_coef: float = Field(0.1, ge=0, description="value-loss weight")
    value_model: str | None = Field(
        None,
        description="reward-model folder (`streamrl rm` output, same vocabulary "
        "as the policy): a separate critic initialised from it (InstructGPT) instead "
        "of the value head on the policy's trunk",
        json_schema_extra={**LOCAL_PATH, "applies_to": {"advantage": "gae"}},
    )
    value_lr: float | None = Field(
        None,
        gt=0,
        description="AdamW learning rate of `value_model`; unset = `lr`",
        json_schema_extra={"applies_to": {"advantage": "gae"}},
    )
    whiten_advantages: bool = Field(
        True,
        description="masked whitening of GAE advantages (group baselines are "
        'already normalised per group); with `correction = "vtrace"` the advantages '
        "are only divided by their std, never shifted: they carry the importance weight, "
        "and subtracting an unweighted batch mean can flip the gradient's sign",
    )
    scale_rewards: RewardScale = Field(
        RewardScale.GROUP,
        description="GRPO divides centred scores by the `group`'s "
        "std (GRPO), the whole `batch`'s std (TRL) or nothing (`none`: Dr. GRPO)",
        json_schema_extra={"applies_to": {"advantage": "grpo"}},
    )
    scale_std_floor: float = Field(
        1e-3,
        gt=0,
        description="GRPO divides by max(std, this): a group whose scores "
        "differ by float noise gets near-zero advantages, not +-1 (scores' units: "
        "normalised rewards with `normalize_rewards`)",
        json_schema_extra={"applies_to": {"advantage": "grpo"}},
    )
    loss_aggregation: LossAggregation = Field(
        LossAggregation.TOKEN_MEAN,
        description="how per-token losses "
        "(policy, value, entropy, KL) are reduced: `token_mean` (every token "
        "weighs the same), `sequence_mean` (mean of per-sequence means: GRPO) "
        "or `fixed_length_sum` (sum / (sequences x max_new_tokens): Dr. GRPO)",
    )
    kl_coef: float = Field(0.05, ge=0, description="beta of the KL penalty to the reference model")
    kl_target_per_sequence: float | None = Field(
        None,
        gt=0,
        description="set to adapt beta (Ziegler et al. 2019's controller) towards this KL to the "
        "reference in nats per sequence: the per-token estimates summed over a completion, averaged over the batch "
        "(logged as `kl_per_sequence`; `kl` is the per-token mean)",
    )
    kl_horizon: int = Field(10000, ge=1, description="horizon of the adaptive KL controller, in samples")
    kl_estimator: KLEstimator = Field(
        KLEstimator.K1,
        description="per-token KL estimator: `k1` (log-ratio), `k2` "
        "(half squared log-ratio) or `k3`; as a `loss` term `k2` has the gradient of "
        "KL(pi || ref), `k3` that of KL(ref || pi) (GRPO), `k1` none (refused)",
    )
    kl_penalty: KLPenaltyMode = Field(
        KLPenaltyMode.REWARD,
        description="KL penalty in the `reward` or as a "
        "`loss` term (its tokens come from mu: each is weighted by min(pi_old/mu, "
        "`is_cap`), rho-bar for `vtrace`)",
    )
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus")
    normalize_rewards: bool = Field(True, description="running mean/std normalisation of rewards")
    reward_clip: float | None = Field(5.0, gt=0, description="clip normalised rewards to +-this (unset = none)")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx gamma: weight of the SFT loss on `ptx_data`")
    ptx_data: PromptSource | None = Field(
        None, description="SFT texts for PPO-ptx: a table with the keys of `generator.prompts`"
    )
    lora: LoraSection | None = Field(
        None,
        description="train LoRA adapters instead of the whole policy ([learner.lora]; docs/lora.md): the "
        "reference is the base with the adapters disabled (no second copy) and only the adapters go to "
        "the generators",
        json_schema_extra={"list_keys": True},
    )
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="newest complete checkpoints kept; older ones are deleted")
    batch_timeout_s: float = Field(600.0, gt=0, description="give up when no batch arrives for this long, seconds")

    @model_validator(mode="before")
    @classmethod
    def _renamed_kl_target(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kl_target" in data:
            raise _rule(
                "`kl_target` is now `kl_target_per_sequence`, in nats per sequence (the per-token KL summed "
                "over a completion, as Ziegler et al. 2019), no longer per token; fix: rename it to "
                "learner.kl_target_per_sequence and multiply a per-token target by the mean completion "
                "length",
                "kl_target",
            )
        return data

    @model_validator(mode="after")
    def _kl_loss_estimator(self) -> LearnerSection:
        if self.kl_penalty is KLPenaltyMode.LOSS and self.kl_estimator is KLEstimator.K1:
            raise _rule(
                '`kl_estimator = "k1"` as a loss term has expected gradient exactly 0 (it only adds noise); '
                'fix: set learner.kl_estimator = "k2" (gradient of KL(pi || ref)) or "k3" (gradient of '
                'KL(ref || pi), as GRPO), or learner.kl_penalty = "reward"',
                "kl_estimator",
            )
        return self

    @model_validator(mode="after")
    def _vtrace_needs_a_critic(self) -> LearnerSection:
        if self.correction is Correction.VTRACE and self.advantage is not AdvantageEstimator.GAE:
            raise _rule(
                '`correction = "vtrace"` corrects the critic\'s value targets and needs a critic; fix: set '
                'learner.advantage = "gae" or another correction',
                "correction",
            )
        return self
