"""PtxSampler: right-padded SFT minibatches (InstructGPT's PPO-ptx data), truncation, seeded epochs."""

from __future__ import annotations

import json

import pytest
import torch

from streamrl.common.config import PromptSource
from streamrl.common.models import build_char_tokenizer
from streamrl.common.prompts import load_prompts, run_split
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
    batch = PtxSampler(source, tokenizer, batch_size=3, max_tokens=64, seed=0, held_out=[])()
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
    sampler = PtxSampler(source, tokenizer, batch_size=5, max_tokens=4, seed=0, held_out=[])
    batch = sampler()
    assert batch.input_ids.shape == (5, 4)
    assert sorted(rows(batch, tokenizer)) == sorted(t[:4] for t in TEXTS)  # one char per token


def test_epochs_cover_every_text_once_in_a_seeded_order(source, tokenizer):
    first = PtxSampler(source, tokenizer, batch_size=5, max_tokens=64, seed=3, held_out=[])
    epochs = [rows(first(), tokenizer) for _ in range(3)]
    assert all(sorted(epoch) == sorted(TEXTS) for epoch in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    again = PtxSampler(source, tokenizer, batch_size=5, max_tokens=64, seed=3, held_out=[])
    assert [rows(again(), tokenizer) for _ in range(3)] == epochs  # same seed, same batches
    other = PtxSampler(source, tokenizer, batch_size=5, max_tokens=64, seed=4, held_out=[])
    assert [rows(other(), tokenizer) for _ in range(3)] != epochs


def test_an_empty_data_set_is_refused(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError):
        PtxSampler(
            PromptSource(kind="jsonl", path=str(empty)), tokenizer, batch_size=2, max_tokens=8, seed=0, held_out=[]
        )


# --------------------------------------------------------------------------- demonstrations and held-out prompts


def gsm8k_source(tmp_path, n: int = 30) -> PromptSource:
    """The first n lines of the real GSM8K training file."""
    from support import SHARED_DATA

    path = tmp_path / "gsm8k.jsonl"
    lines = (SHARED_DATA / "gsm8k_train.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return PromptSource(kind="gsm8k", path=str(path), eval_fraction=0.3)


def test_gsm8k_ptx_trains_on_full_demonstrations(tmp_path, tokenizer):
    """kind = "gsm8k": the SFT text is the question *and* its worked answer (ending in
    '#### <number>'), then EOS, not the question alone."""
    source = gsm8k_source(tmp_path)
    sampler = PtxSampler(source, tokenizer, batch_size=30, max_tokens=4096, seed=0, held_out=[])
    batch = sampler()
    rows_text = rows(batch, tokenizer)
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        assert ids[mask.bool()][-1].item() == tokenizer.eos_token_id
    questions = {p.text: p.metadata["answer"] for p in load_prompts(source)}
    for text in rows_text:
        question = next(q for q in questions if tokenizer.decode(tokenizer(q)["input_ids"]) in text)
        answer = tokenizer.decode(tokenizer(questions[question])["input_ids"])
        assert answer in text and "####" in text


def test_no_held_out_prompt_is_ever_in_ptx_data(tmp_path, tokenizer):
    """The generators' held-out (evaluation) prompts never reach the SFT data, whether the
    ptx data is the same file or another file holding the same question under another id."""
    source = gsm8k_source(tmp_path)
    _, held_out = run_split(source, 0)
    assert 3 <= len(held_out) < 30
    copy = tmp_path / "copy.jsonl"  # the held-out questions again, under other ids, among new ones
    copy.write_text(
        "".join(json.dumps({"id": f"x{i}", "text": "  " + p.text.upper() + " "}) + "\n" for i, p in enumerate(held_out))
        + json.dumps({"id": "new", "text": "a new text"})
        + "\n"
    )
    for data in (source, PromptSource(kind="jsonl", path=str(copy))):
        sampler = PtxSampler(data, tokenizer, batch_size=8, max_tokens=4096, seed=0, held_out=held_out)
        seen = set()
        for _ in range(12):
            seen.update(rows(sampler(), tokenizer))
        for p in held_out:
            q = tokenizer.decode(tokenizer(p.text)["input_ids"])
            assert not any(q.casefold() in s.casefold() for s in seen), p.prompt_id
        assert seen  # something is trained on
    assert rows(
        PtxSampler(
            PromptSource(kind="jsonl", path=str(copy)),
            tokenizer,
            batch_size=1,
            max_tokens=64,
            seed=0,
            held_out=held_out,
        )(),
        tokenizer,
    ) == ["a new text"]


def test_ptx_data_of_only_held_out_prompts_is_refused(tmp_path, tokenizer):
    source = gsm8k_source(tmp_path)
    held_out = load_prompts(source)
    with pytest.raises(ValueError, match="held-out"):
        PtxSampler(source, tokenizer, batch_size=2, max_tokens=64, seed=0, held_out=held_out)
