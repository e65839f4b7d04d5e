"""The generator's version rules: fetch newer weights, pause past max_staleness, refuse weights that do not fit."""

from __future__ import annotations

import pytest
import torch

from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.modes import WeightDtype
from streamrl.common.weights import pack_state_dict, tied_duplicates, unpack_state_dict
from streamrl.services.generator.versions import check_fit, needs_fetch, too_stale


def test_needs_fetch_only_for_a_newer_version():
    assert needs_fetch(None, 0)  # nothing loaded: even version 0
    assert needs_fetch(3, 4)
    assert not needs_fetch(4, 4)
    assert not needs_fetch(5, 4)  # an older announcement (a restarted learner resumed behind) is not loaded


@pytest.mark.parametrize(
    ("loaded", "announced", "eta", "stale"),
    [
        (None, 0, 4, True),  # nothing to sample with
        (3, 3, 0, False),  # on-policy, up to date
        (3, 4, 0, True),  # on-policy, one behind: pause
        (3, 5, 2, False),  # exactly eta behind: still trainable
        (3, 6, 2, True),  # eta + 1 behind: the buffer would drop it
        (7, 5, 0, False),  # loaded is newer than the announcement seen
    ],
)
def test_too_stale_is_more_than_eta_behind(loaded, announced, eta, stale):
    assert too_stale(loaded, announced, eta) is stale


def test_check_fit_accepts_the_learners_weights_without_tied_copies():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    learner, generator = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    packed = pack_state_dict(
        learner.state_dict(), version=1, dtype=WeightDtype.FLOAT32, chunk_bytes=1 << 16, sender="learner-0"
    )
    tensors = unpack_state_dict(packed.announce, bytearray(packed.blob.tobytes()))
    tied = tied_duplicates(generator.state_dict())
    assert tied == {"lm_head.weight"} and "lm_head.weight" not in tensors
    missing, unexpected = generator.load_state_dict(tensors, strict=False)
    check_fit(missing, unexpected, tied)
    assert torch.equal(generator.lm_head.weight, learner.model.embed_tokens.weight)  # the tie carried it

    partial = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(RuntimeError, match=r"missing \['model.norm.weight'\], unexpected \[\]"):
        check_fit(*generator.load_state_dict(partial, strict=False), tied)
    foreign = {**tensors, "value_head.weight": torch.zeros(1, 64)}
    with pytest.raises(RuntimeError, match=r"unexpected \['value_head.weight'\]"):
        check_fit(*generator.load_state_dict(foreign, strict=False), tied)
