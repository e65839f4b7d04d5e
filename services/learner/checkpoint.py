"""Learner checkpoints: a Hugging Face model folder plus the training state, written atomically.

Layout of ``<output_dir>/checkpoints/step-000050/``:

* ``model/``: ``save_pretrained`` of the policy and its tokenizer (loadable by
  ``AutoModelForCausalLM.from_pretrained``);
* ``trainer_state.pt``: optimizer, value head, KL controller, reward statistics,
  torch (and CUDA) RNG state, step and version (plain tensors and primitives: read back
  with ``torch.load(..., weights_only=True)``);
* ``COMPLETE``: written last. A checkpoint is assembled in a temporary folder and
  renamed into place, so a half-written one is never picked up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MARKER = "COMPLETE"


def save_checkpoint(
    root: Path, *, step: int, version: int, policy, tokenizer, trainer_state: dict, keep: int = 3
) -> Path:
    """Write checkpoint ``step`` under ``root`` and keep the newest ``keep`` ones.

    Returns:
        The checkpoint folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    state = dict(trainer_state, step=step, version=version, torch_rng=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / MARKER).write_text(json.dumps({"step": step, "version": version}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint step %d (version %d) -> %s", step, version, final)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).exists())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    """Read ``trainer_state.pt`` safely (``weights_only=True``) and restore the torch RNG."""
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state
