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

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
NEARLY_FULL_BYTES = 64 * 1024 * 1024
"""Free space below which a failed write is reported as a full disk (torch.save hides ENOSPC
behind ``basic_ios::clear: iostream error``)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the folder, the cause and the fix."""


def save_checkpoint(
    root: Path, *, step: int, version: int, policy, tokenizer, trainer_state: dict, keep: int = 3
) -> Path:
    """Write checkpoint ``step`` under ``root`` and keep the newest ``keep`` ones.

    The checkpoint is assembled in ``.tmp-step-*`` and renamed into place; a failed write removes
    its temporary folder, and leftovers of an earlier crash are removed first (one learner owns
    the folder: see ``streamrl.common.runlock``). Earlier complete checkpoints are never touched
    by a failed write.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: the write failed (e.g. "no space left on device", with the path and the
            bytes free).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    try:
        policy.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        state = dict(trainer_state, step=step, version=version, torch_rng=torch.get_rng_state())
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / MARKER).write_text(json.dumps({"step": step, "version": version}))
    except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError, ...
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        full = getattr(err, "errno", None) == errno.ENOSPC or free < NEARLY_FULL_BYTES
        cause = "no space left on device" if full else f"{type(err).__name__}: {err}"
        raise CheckpointError(
            f"cannot write checkpoint step {step} to {root}: {cause} ({free} bytes free); fix: free space on "
            f"that file system or point run.output_dir at a larger one, then restart the learner (it resumes "
            f"from the last complete checkpoint)"
        ) from err
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
