"""Why the learner gets no batch, in words: the cause when a peer can tell it, else the usual suspects."""

from __future__ import annotations

from streamrl.common.config import Config
from streamrl.common.peers import reward_troubles


def data_wait_reason(cfg: Config) -> str:
    """The learner's wait message: a reward that fails or raises on some inputs when a scorer reports
    one (:func:`streamrl.common.peers.reward_troubles`, e.g. ``the reward is failing in scorer-0 (5
    micro-batches in a row raised ValueError: boom; no scored rollout reaches the buffer; see its
    log)``), else what may be slow or down."""
    wanted = f"no batch of {cfg.learner.groups_per_step} groups from the buffer at {cfg.endpoints.batches}"
    troubles = reward_troubles(cfg)
    if troubles:
        return f"{wanted}: " + "; ".join(troubles)
    return f"{wanted} (buffer down, or generators/scorers slow or not running)"
