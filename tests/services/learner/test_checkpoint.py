"""Learner checkpoints: atomic layout, half-written ones ignored, RNG restored (the published
version file: tests/services/learner/test_versions.py)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.services.learner.checkpoint import (
    MARKER,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
)

TOKENIZER = build_char_tokenizer()


def save(root, step, model, **state):
    return save_checkpoint(
        root,
        step=step,
        version=step + 100,
        policy=model,
        tokenizer=TOKENIZER,
        trainer_state={"optimizer": {"lr": torch.tensor(0.5)}, **state},
        keep=2,
    )


def test_round_trip_weights_state_and_rng(tmp_path):
    model = build_tiny_model(TOKENIZER, seed=3)
    torch.manual_seed(7)
    path = save(tmp_path, 4, model, extra=[1, 2])
    expected_draw = torch.rand(3)  # what the RNG gives right after the checkpoint
    torch.rand(10)  # move the RNG on
    state = load_trainer_state(path)
    assert torch.equal(torch.rand(3), expected_draw)
    assert (state["step"], state["version"], state["extra"]) == (4, 104, [1, 2])
    assert state["optimizer"]["lr"].item() == 0.5
    loaded = AutoModelForCausalLM.from_pretrained(path / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_half_written_checkpoints_are_never_picked(tmp_path):
    model = build_tiny_model(TOKENIZER, seed=0)
    good = save(tmp_path, 1, model)
    # a crash mid-save leaves a temp folder, and a folder without the marker
    (tmp_path / ".tmp-step-000002-999").mkdir()
    partial = tmp_path / "step-000003"
    (partial / "model").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == good
    (partial / MARKER).write_text("{}")
    assert latest_checkpoint(tmp_path) == partial


def test_keeps_the_newest(tmp_path):
    model = build_tiny_model(TOKENIZER, seed=0)
    for step in (1, 2, 3):
        save(tmp_path, step, model)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]


def test_a_full_disk_says_so_and_leaves_no_partial_checkpoint(tmp_path):
    """A tmpfs too small for the next checkpoint: a clear error naming the cause and the path, no
    ``.tmp-step-*`` left behind, the last complete checkpoint intact (before: ``basic_ios::clear:
    iostream error`` and a temporary folder that was never cleaned up)."""
    import os
    import subprocess

    import pytest

    from streamrl.services.learner.checkpoint import CheckpointError

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    model = build_tiny_model(TOKENIZER, seed=1)
    probe = save(tmp_path / "probe", 1, model)
    size = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(disk)], check=True)
    try:
        good = save(disk, 1, model)
        with pytest.raises(
            CheckpointError,
            match=rf"cannot write checkpoint step 2 to {disk}: no space left on "
            r"device \(\d+ bytes free\); fix: free space",
        ):
            save(disk, 2, model)
        assert not list(disk.glob(".tmp-step-*"))
        assert list_checkpoints(disk) == [good]
        assert load_trainer_state(good)["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)
