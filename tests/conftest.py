"""Shared fixtures; helpers live in tests/support.py (importable as ``support``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streamrl.testing import Services


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread in the test process: on 2 shared cores, more threads make the tiny
    models' steps far slower (service processes the tests start set their own)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny char-level Llama + tokenizer saved as a Hugging Face folder."""
    from streamrl.common.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def services(tmp_path):
    """Factory: ``services(config_path)`` -> :class:`Services`; all processes die after the test."""
    started: list[Services] = []

    def make(config: Path) -> Services:
        s = Services(config, tmp_path)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()
