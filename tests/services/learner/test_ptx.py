"""PtxSampler: right-padded SFT minibatches (InstructGPT's PPO-ptx data), truncation, seeded epochs."""

from __future__ import annotations

import json

import pytest
import torch

from streamrl.common.config import PromptSource
from streamrl.common.models import build_char_tokenizer
from streamrl.services.learner.ptx import PtxSampler

TEXTS = ["a", "hello there", "abc", "the quick brown fox", "ok"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def source(tmp_path) -> PromptSource:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return PromptSource(kind="jsonl", path=str(path))


def rows(batch, tokenizer) -> list[str]:
    return [tokenizer.decode(ids[mask.bool()].tolist()) for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def test_batches_are_right_padded_token_ids_of_the_texts(source, tokenizer):
    batch = PtxSampler(source, tokenizer, batch_size=3, max_tokens=64, seed=0)()
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    texts = rows(batch, tokenizer)
    assert len(texts) == 3 and set(texts) <= set(TEXTS)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert batch.input_ids.shape == (3, max(lengths))
    for b, (text, n) in enumerate(zip(texts, lengths)):
        assert batch.input_ids[b, :n].tolist() == tokenizer(text)["input_ids"]
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (max(lengths) - n)  # right padding
        assert set(batch.input_ids[b, n:].tolist()) <= {tokenizer.pad_token_id}


def test_texts_are_truncated_to_max_tokens(source, tokenizer):
    sampler = PtxSampler(source, tokenizer, batch_size=5, max_tokens=4, seed=0)
    batch = sampler()
    assert batch.input_ids.shape == (5, 4)
    assert sorted(rows(batch, tokenizer)) == sorted(t[:4] for t in TEXTS)  # one char per token


def test_epochs_cover_every_text_once_in_a_seeded_order(source, tokenizer):
    first = PtxSampler(source, tokenizer, batch_size=5, max_tokens=64, seed=3)
    epochs = [rows(first(), tokenizer) for _ in range(3)]
    assert all(sorted(epoch) == sorted(TEXTS) for epoch in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    again = PtxSampler(source, tokenizer, batch_size=5, max_tokens=64, seed=3)
    assert [rows(again(), tokenizer) for _ in range(3)] == epochs  # same seed, same batches
    other = PtxSampler(source, tokenizer, batch_size=5, max_tokens=64, seed=4)
    assert [rows(other(), tokenizer) for _ in range(3)] != epochs


def test_an_empty_data_set_is_refused(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError):
        PtxSampler(PromptSource(kind="jsonl", path=str(empty)), tokenizer, batch_size=2, max_tokens=8, seed=0)
