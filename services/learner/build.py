"""The learner's model and trainer, built the same way on every rank of a data-parallel learner.

Rank 0 (:class:`~streamrl.services.learner.loop.LearnerService`) and the other ranks
(:func:`streamrl.services.learner.launch.run_worker`) call :func:`build_trainer`, so
every rank starts from the same weights, optimizer state, KL controller and reward
statistics (the newest checkpoint when there is one, else the base model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamrl.common.config import Config
from streamrl.common.lora import apply_lora, is_adapter_folder, load_lora
from streamrl.common.models import load_causal_lm, load_tokenizer, resolve_model_path
from streamrl.common.prompts import run_split
from streamrl.services.learner.checkpoint import load_trainer_state
from streamrl.services.learner.distributed import make_trainer
from streamrl.services.learner.ptx import PtxSampler
from streamrl.services.learner.value_model import ValueModel


def load_policy(cfg: Config, base: str, device: torch.device, resume: Path | None):
    """``(policy, reference)``: the policy from ``resume`` (its ``model/`` folder) or the base, and a
    frozen copy of the base; with ``learner.lora`` the policy is a PEFT model (fresh adapters, or the
    checkpoint's adapter folder on the base) and the reference is None: the policy with its adapters
    disabled (:class:`~streamrl.services.learner.trainer.PPOTrainer`).

    Raises:
        RuntimeError: the checkpoint holds a whole model and ``learner.lora`` is set, or an adapter and
            it is not (the fix says which to change).
    """
    lora = cfg.learner.lora
    saved = resume / "model" if resume is not None else None
    if saved is not None and is_adapter_folder(saved) != (lora is not None):
        held = "a LoRA adapter" if is_adapter_folder(saved) else "a whole model"
        raise RuntimeError(
            f"checkpoint {resume} holds {held} but learner.lora is {'set' if lora else 'not set'}; fix: "
            f"{'remove' if lora else 'add'} [learner.lora] to resume it, or start in a new run.output_dir"
        )
    if lora is None:
        policy = load_causal_lm(str(saved) if saved else base, device=device)
        return policy, load_causal_lm(base, device=device).eval()
    model = load_causal_lm(base, device=device)
    if saved is not None:
        return load_lora(model, saved, trainable=True), None
    try:
        return apply_lora(model, lora), None
    except ValueError as err:  # PEFT: no module of the model matches a target
        raise RuntimeError(
            f"learner.lora.target_modules {lora.target_modules} do not fit {base} ({err}); fix: name linear "
            "layers of the model (the last part of their module names, e.g. q_proj, v_proj)"
        ) from err


def build_trainer(cfg: Config, device: torch.device, resume: Path | None, *, dist=None):
    """The policy (from ``resume`` when given, else ``model.path``), the frozen reference, the
    PPO-ptx sampler and critic when configured, and the trainer holding them.

    Args:
        cfg: the run config.
        device: where the models live (``cuda:<local rank>`` for a data-parallel rank).
        resume: a checkpoint folder (``checkpoints/step-NNNNNN``) or None.
        dist: a :class:`~streamrl.services.learner.distributed.DistContext` for a data-parallel
            learner (``learner.world_size > 1``): the trainer is then a
            :class:`~streamrl.services.learner.distributed.DistributedPPOTrainer`.

    Returns:
        ``(trainer, tokenizer, state)``: ``state`` is the checkpoint's trainer state (already
        loaded into the trainer; it also holds ``step`` and ``version``), None without ``resume``.
    """
    lc = cfg.learner
    base = resolve_model_path(cfg.model.path, cfg.model.cache_path)
    tokenizer = load_tokenizer(base)
    policy, reference = load_policy(cfg, base, device, resume)
    ptx = None
    if lc.ptx_coef > 0:
        assert lc.ptx_data is not None  # the config's cross checks require it with ptx_coef > 0
        ptx = PtxSampler(
            lc.ptx_data,
            tokenizer,
            batch_size=lc.groups_per_step,
            max_tokens=cfg.generator.max_prompt_tokens + cfg.generator.max_new_tokens,
            seed=cfg.run.seed,
            held_out=run_split(cfg.generator.prompts, cfg.run.seed)[1],
        )
    critic = None  # InstructGPT: the value function initialised from the reward model
    if lc.value_model is not None:  # the config allows it with advantage = "gae" only
        critic = ValueModel.from_reward_model(lc.value_model, device=device, tokenizer=tokenizer)
    trainer = make_trainer(policy, reference, lc, dist, ptx_sampler=ptx, value_model=critic)
    state = None
    if resume is not None:
        state = load_trainer_state(resume)
        trainer.load_state_dict(state)
    return trainer, tokenizer, state
