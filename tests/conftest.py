"""Shared fixtures; helpers live in tests/support.py (importable as ``support``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Services  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny char-level Llama + tokenizer saved as a Hugging Face folder."""
    from common.models import save_tiny_model

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


