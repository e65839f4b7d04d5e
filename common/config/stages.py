"""Sections of the offline stages (``[sft]``, ``[rm]`` and their data) and of held-out
evaluation (``[eval]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from streamrl.common.config.base import LOCAL_PATH, MAYBE_LOCAL_PATH, _rule, _Section
from streamrl.common.config.learner import LoraSection
from streamrl.common.config.sources import PromptSource, RewardSpec
from streamrl.common.modes import Device


class StageData(_Section):
    """Training data of ``streamrl sft`` / ``streamrl rm`` (layouts: :mod:`streamrl.stages.rlhf_data`)."""

    path: str | None = Field(
        None,
        description="`.jsonl`, `.jsonl.gz` or `.parquet`: prompt+response, "
        "messages, prompt+chosen+rejected, hh-rlhf chosen+rejected dialogues or "
        "prompt+responses (ranked best first); required by the stage",
        json_schema_extra=LOCAL_PATH,
    )
    eval_rows: int = Field(
        500,
        ge=0,
        description="rows held out (never trained on), chosen by a seeded hash of "
        "the prompt: the same rows in `sft` and `rm` for the same file and `split_seed`",
    )
    split_seed: int = Field(0, ge=0, description="seed of the held-out hash")
    train_rows: int | None = Field(
        None,
        ge=1,
        description="train on at most this many rows (the next in hash "
        "order after the held-out ones); unset = all the others",
    )


class _StageSection(_Section):
    """Fields every offline training stage shares."""

    base_model: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="model the stage starts from: a folder, a hub id or a built-in name (as `model.path`)",
        json_schema_extra=MAYBE_LOCAL_PATH,
    )
    data: StageData = Field(default_factory=StageData, description="training data")
    epochs: int = Field(1, ge=1, description="passes over the training rows")
    batch_size: int = Field(8, ge=1, description="rows per optimizer step")
    lr: float = Field(2e-5, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of the steps with a linear warm-up")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after the warm-up (`transformers.get_scheduler`)"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    max_length: int = Field(256, ge=8, description="tokens per text; longer texts lose the start of the prompt")
    trainable_layers: int | None = Field(
        None,
        ge=0,
        description="train only the top N transformer blocks (embeddings and lower blocks frozen); unset = every block",
    )
    cache_frozen: bool = Field(
        True,
        description="compute the frozen blocks' output once per text and reuse it "
        "every epoch (with `trainable_layers`)",
    )
    threads: int = Field(2, ge=1, description="torch threads")
    device: Device = Field(Device.AUTO, description="`auto` = CUDA when available, else CPU")
    lora: LoraSection | None = Field(
        None,
        description="train LoRA adapters on every block instead of the weights (keys as `[learner.lora]`; "
        "`rm`: the score head trains too); the output is the merged model",
        json_schema_extra={"list_keys": True},
    )

    @model_validator(mode="after")
    def _lora_or_frozen_blocks(self) -> _StageSection:
        if self.lora is not None and self.trainable_layers is not None:
            raise _rule(
                "`lora` adapts every block and `trainable_layers` freezes the lower ones; fix: set one of them",
                "trainable_layers",
            )
        return self


class SFTSection(_StageSection):
    """``streamrl sft``: supervised fine-tuning on demonstrations (loss on response tokens only)."""

    output_dir: str | None = Field(
        None,
        description="the fine-tuned model (Hugging Face folder, usable as `model.path`) and `summary.json`",
        json_schema_extra={**LOCAL_PATH, "default_text": "`<run.output_dir>/sft`"},
    )
    eval_limit: int | None = Field(
        200, ge=1, description="held-out rows whose response loss is measured before and after; unset = all `eval_rows`"
    )


class RewardModelSection(_StageSection):
    """``streamrl rm``: reward-model training on ranked responses (pairwise / K-wise loss)."""

    output_dir: str | None = Field(
        None,
        description="the reward model (Hugging Face sequence-classification "
        "folder, usable in `[[scorer.rewards]] model`) and `summary.json`",
        json_schema_extra={**LOCAL_PATH, "default_text": "`<run.output_dir>/rm`"},
    )
    lr: float = Field(5e-5, gt=0, description="AdamW peak learning rate")
    normalize: bool = Field(
        True,
        description="store a bias so that the demonstrations (best responses of the "
        "training rows, both halves with `gold`) score 0 on average (InstructGPT)",
    )
    gold: bool = Field(
        False,
        description="train two reward models from `base_model` on disjoint halves of the "
        "training rows (split by a seeded hash of the prompt): `<output_dir>/proxy`, for the scorer "
        "and the critic (PPO optimises it), and `<output_dir>/gold`, never optimised, for "
        "`[[eval.rewards]]` (over-optimisation, Gao et al. 2022); both measured on the same held-out "
        "rows, the frozen blocks' output computed once for both",
    )


class EvalSection(_Section):
    """Held-out evaluation of a policy (`streamrl eval`, `streamrl run --eval`, `streamrl pipeline`):
    mean reward +- standard error over prompts and KL to the reference model."""

    prompts: PromptSource | None = Field(
        None,
        description="held-out prompts (all of the file; e.g. "
        "`heldout_prompts.jsonl` written by `streamrl sft`); unset = the "
        "`eval_fraction` split of `generator.prompts`",
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="further rewards scored on the same "
        "completions and reported beside the training reward (`scorer.rewards`), "
        "each by its `name` (required): e.g. the never-optimised gold reward model "
        "(`rm.gold`)",
    )
    limit: int | None = Field(None, ge=1, description="held-out prompts used (the first in order); unset = all")
    samples_per_prompt: int = Field(
        4,
        ge=1,
        description="completions per prompt (a prompt's reward is their mean; the standard error is over prompts)",
    )
    seed: int = Field(1234, ge=0, description="sampling seed (both policies see the same prompts and random stream)")

    @model_validator(mode="after")
    def _named(self) -> EvalSection:
        names = [spec.name for spec in self.rewards]
        if any(name is None for name in names):
            raise _rule('each eval reward is reported by its name; fix: set `name` (e.g. name = "gold")', "rewards")
        if len(set(names)) != len(names):
            raise _rule(f"names {names} repeat; fix: give each eval reward its own `name`", "rewards")
        return self
