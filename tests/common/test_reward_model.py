"""Reward-model inference: last-token pooling, left truncation, the stored bias, HF round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from streamrl.common.reward_model import (
    REWARD_INFO_KEY,
    RewardModel,
    RewardModelInfo,
    encode_texts,
    last_token_index,
    pad_right,
    sequence_scores,
    token_scores,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """A tiny one-label classifier with a random score head and a stored bias of 0.25."""
    folder = tmp_path_factory.mktemp("rm") / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(1)))
    setattr(model.config, REWARD_INFO_KEY, RewardModelInfo(bias=0.25, max_length=40).to_dict())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_last_token_index_any_padding_side():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 1]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_encode_texts_keeps_the_end(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_texts(tokenizer, ["abcdef", "xy"], max_length=3)
    assert [tokenizer.decode(i) for i in ids] == ["def", "xy"]
    with pytest.raises(ValueError, match="no tokens"):
        encode_texts(tokenizer, ["a", ""], max_length=3)


def test_scores_match_the_hf_classifier_and_add_the_bias(rm_dir):
    rm = RewardModel(str(rm_dir), device=CPU, batch_size=2)
    assert rm.info.bias == 0.25 and rm.max_length == 40
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    texts = ["hello there", "a", "a much longer text than the others, with commas", "x" * 60]
    scores = rm.score_texts(texts)
    for text, score in zip(texts, scores):
        ids = torch.tensor([rm.tokenizer(text)["input_ids"][-40:]])
        with torch.no_grad():
            expected = hf(input_ids=ids).logits[0, 0].item()
        assert score == pytest.approx(expected + 0.25, abs=1e-5)
    assert rm.score(["hello", "a"], [" there", ""]) == pytest.approx(scores[:2], abs=1e-6)


def test_token_scores_are_prefix_scores(rm_dir):
    rm = RewardModel(str(rm_dir), device=CPU)
    ids, mask = pad_right(
        [rm.tokenizer("abcdef")["input_ids"], rm.tokenizer("xy")["input_ids"]], pad_id=rm.tokenizer.pad_token_id
    )
    with torch.no_grad():
        per_token = token_scores(rm.model, ids, mask)
        for t in range(1, 7):
            prefix = sequence_scores(rm.model, ids[:1, :t], mask[:1, :t])
            assert per_token[0, t - 1].item() == pytest.approx(prefix.item(), abs=1e-5)
        assert per_token[1, 1].item() == pytest.approx(sequence_scores(rm.model, ids, mask)[1].item(), abs=1e-5)


def test_bad_reward_models_are_refused(tiny_model_dir, tmp_path):
    two = tmp_path / "two"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(two)
    with pytest.raises(ValueError, match="2 labels"):
        RewardModel(str(two), device=CPU)
    with pytest.raises(ValueError, match="bias must be a finite number"):
        RewardModelInfo.from_config(type("C", (), {REWARD_INFO_KEY: {"bias": "x"}})())
