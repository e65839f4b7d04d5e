"""Rules that tie several sections together (:func:`cross_problems`), run by
:class:`~streamrl.common.config.schema.Config`'s validator: one line (key, rule, fix) each; and
:func:`cross_hints`, settings that are valid but measured to work poorly (``streamrl check`` prints
them as hints and still passes)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

from streamrl.common.modes import AdvantageEstimator

if TYPE_CHECKING:
    from streamrl.common.config.schema import Config


def cross_problems(cfg: Config) -> list[str]:
    """Rules that tie several sections together, one line (key, rule, fix) per broken rule."""
    problems = []
    lr = cfg.learner
    if lr.advantage is AdvantageEstimator.RLOO and cfg.generator.group_size < 2:
        problems.append(
            "generator.group_size: rloo needs groups of at least 2; "
            'fix: set generator.group_size >= 2 or learner.advantage = "grpo"/"gae"'
        )
    batch = lr.groups_per_step * cfg.generator.group_size
    if lr.minibatches > batch:
        problems.append(
            f"learner.minibatches: {lr.minibatches} minibatches of a {batch}-rollout batch "
            "leave some empty; fix: lower learner.minibatches or raise learner.groups_per_step"
        )
    if lr.ptx_coef > 0 and lr.ptx_data is None:
        problems.append(
            "learner.ptx_data: ptx_coef > 0 needs an SFT data set; fix: add [learner.ptx_data] or set ptx_coef = 0"
        )
    if cfg.buffer.capacity_groups < lr.groups_per_step:
        problems.append(
            "buffer.capacity_groups: must hold one learner step; "
            f"fix: set it >= learner.groups_per_step ({lr.groups_per_step})"
        )
    problems += _security_problems(cfg)
    problems += _feedback_problems(cfg)
    problems += _gold_problems(cfg)
    if cfg.model.chat_template:
        problems += [
            f"scorer.rewards[{i}].chat_template: the policy's prompts already carry a chat template "
            "(model.chat_template = true), so the reward model would see two; fix: remove it (the prompt is "
            "scored as the policy saw it) or set model.chat_template = false"
            for i, spec in enumerate(cfg.scorer.rewards)
            if spec is not None and spec.chat_template
        ]
    return problems


LORA_MIN_LR = 1e-4
"""Below this ``learner.lr`` a LoRA policy gets a hint (:func:`cross_hints`; the measurement is in docs/lora.md)."""


def cross_hints(cfg: Config) -> list[str]:
    """Valid settings that measured poorly, one line (key, what was measured, suggestion) each; never refusals.

    * ``learner.lora`` (rank >= 1) with ``learner.lr`` below :data:`LORA_MIN_LR`: LoRA adapters start with
      ``B = 0`` and are scaled by ``alpha / rank``, so they need a larger learning rate than the whole
      model (docs/lora.md: rank 4 at lr 1e-4 barely moved in 60 steps of the default job; start at 3e-4).
    """
    hints = []
    learner = cfg.learner
    if learner.lora is not None and learner.lora.rank > 0 and learner.lr < LORA_MIN_LR:
        hints.append(
            f"learner.lr: {learner.lr:g} is low for LoRA adapters (learner.lora.rank = {learner.lora.rank}): on the "
            "default job rank 4 at lr 1e-4 barely moved in 60 steps; suggestion: start LoRA at learner.lr = 3e-4 "
            "(docs/lora.md)"
        )
    return hints


def _gold_problems(cfg: Config) -> list[str]:
    """With ``rm.gold``: PPO (scorer, critic) must use ``<rm>/proxy``, never the gold model or the bare folder."""
    if not cfg.rm.gold:
        return []
    root = Path(cfg.rm.output_dir or Path(cfg.run.output_dir) / "rm").expanduser().resolve()
    uses = [
        (f"scorer.rewards[{i}].model", spec.model)
        for i, spec in enumerate(cfg.scorer.rewards)
        if spec is not None and spec.model
    ] + [("learner.value_model", cfg.learner.value_model)]
    problems = []
    for key, value in uses:
        where = Path(value).expanduser().resolve() if value else None
        if where == root:
            problems.append(
                f"{key}: with rm.gold = true, {root} holds two reward models (proxy/, gold/) and none at "
                f'its top; fix: set it to "{root / "proxy"}"'
            )
        elif where == root / "gold":
            problems.append(
                f"{key}: {where} is the gold reward model, which PPO must never optimise (it measures "
                f'over-optimisation); fix: use "{root / "proxy"}" here and list the gold model in '
                "[[eval.rewards]]"
            )
    return problems


def _feedback_problems(cfg: Config) -> list[str]:
    fb = cfg.feedback
    problems = []
    if (fb.tls_cert is None) != (fb.tls_key is None):
        problems.append("feedback.tls_cert: HTTPS needs both tls_cert and tls_key; fix: set both or neither")
    if fb.credit_delay_max_s and fb.credit_delay_min_s >= fb.credit_delay_max_s:
        problems.append(
            f"feedback.credit_delay_min_s: {fb.credit_delay_min_s} is not below credit_delay_max_s = "
            f"{fb.credit_delay_max_s}; fix: set min < max (e.g. 1 and 3), or max = 0 to turn it off"
        )
    loopback = fb.http_host == "localhost" or _is_loopback_host(fb.http_host)
    if not loopback and fb.tls_cert is None and not cfg.security.allow_insecure:
        problems.append(
            f"feedback.http_host: {fb.http_host} is not a loopback address, and without TLS the "
            "labellers' tokens would cross the network in clear; fix: set feedback.tls_cert and "
            "feedback.tls_key, or bind 127.0.0.1 behind a TLS proxy, or set security.allow_insecure = "
            "true on a trusted network"
        )
    return problems


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints only this host can reach: ``ipc://``, ``inproc://``, ``tcp://`` on loopback."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _security_problems(cfg: Config) -> list[str]:
    sec = cfg.security
    if sec.keys_dir is not None:
        if not (Path(sec.keys_dir) / "server.key").is_file():
            return [
                f"security.keys_dir: {sec.keys_dir}/server.key does not exist; "
                f"fix: streamrl keys generate --dir {sec.keys_dir}"
            ]
        return []
    if sec.allow_insecure:
        return []
    e = cfg.endpoints
    named = (
        [(f"endpoints.scorers[{i}]", ep) for i, ep in enumerate(e.scorers)]
        + [
            (f"endpoints.{k}", getattr(e, k))
            for k in ("buffer", "batches", "weights_announce", "weights", "feedback", "human_model")
        ]
        + [(f"endpoints.bind.{k}", v) for k, v in e.bind.model_dump().items() if v is not None]
    )
    return [
        f"{key}: {ep} is not a loopback address and security.keys_dir is unset, so anyone who reaches it can "
        "send data or read the weights; fix: streamrl keys generate --dir keys and set security.keys_dir = "
        '"keys", or set security.allow_insecure = true on a trusted network'
        for key, ep in named
        if not is_local_endpoint(ep)
    ]
