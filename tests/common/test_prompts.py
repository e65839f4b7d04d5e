"""Tests for common/prompts.py (real IMDB / GSM8K files, default prompt file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from streamrl.common.config import PromptSource
from streamrl.common.prompt_text import format_prompt
from streamrl.common.prompts import (
    Prompt,
    PromptStream,
    clean_text,
    load_csv,
    load_gsm8k,
    load_jsonl,
    load_prompts,
    run_split,
    split_prompts,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"
DEFAULT_PROMPTS = REPO / "deploy" / "prompts" / "review_openings.jsonl"


# ------------------------------------------------------------------- loaders


@pytest.mark.parametrize("k", [1, 8, 16])
def test_load_imdb_csv_openings(k: int) -> None:
    prompts = load_csv(DATA / "imdb_reviews.csv", column="review", first_k_words=k, metadata_columns=("sentiment",))
    assert len(prompts) == 1100
    assert all("<br" not in p.text and "/>" not in p.text for p in prompts)
    assert all(len(p.text.split()) == k for p in prompts)
    assert prompts[0].prompt_id == "imdb_reviews:1"
    assert len({p.prompt_id for p in prompts}) == 1100
    assert {p.metadata["sentiment"] for p in prompts} == {"positive", "negative"}
    if k == 8:
        assert prompts[0].text == "One of the other reviewers has mentioned that"


def test_load_imdb_csv_full_text_is_cleaned() -> None:
    prompts = load_csv(DATA / "imdb_reviews.csv", column="review")
    assert len(prompts) == 1100
    assert all("<br" not in p.text for p in prompts)
    assert all("  " not in p.text and p.text == p.text.strip() for p in prompts)
    # "...with me.<br /><br />The first thing..." becomes one space.
    assert "happened with me. The first thing that struck me" in prompts[0].text
    raw = load_csv(DATA / "imdb_reviews.csv", column="review", strip_html=False)
    assert "<br />" in raw[0].text


def test_clean_text() -> None:
    assert clean_text("a<br />b<br/>c <BR> d") == "a b c d"
    assert clean_text("<i>Great</i> &amp; <a href='x'>fun</a>") == "Great & fun"
    assert clean_text("if a < b and c > d") == "if a < b and c > d"
    assert clean_text("  lots \n of\t space ") == "lots of space"


def test_load_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in CSV header"):
        load_csv(DATA / "imdb_reviews.csv", column="text")
    for bad in (0, True, 2.0, "3"):  # declared PositiveInt | None, strictly
        with pytest.raises(ValidationError, match="first_k_words"):
            load_csv(DATA / "imdb_reviews.csv", column="review", first_k_words=bad)
    f = tmp_path / "p.csv"
    f.write_text("id,text\nx,hello\nx,world\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate prompt id 'x'"):
        load_csv(f, column="text", id_column="id")
    assert [p.prompt_id for p in load_csv(f, column="text")] == ["p:1", "p:2"]


def test_load_gsm8k() -> None:
    prompts = load_gsm8k(DATA / "gsm8k_train.jsonl")
    assert len(prompts) == 7473
    assert len({p.prompt_id for p in prompts}) == 7473
    first = prompts[0]
    assert first.prompt_id == "gsm8k_train:1"
    assert first.text.startswith("Natalia sold clips to 48 of her friends")
    assert first.metadata["answer"].endswith("#### 72")
    assert all("####" in p.metadata["answer"] for p in prompts)


def test_default_prompt_file() -> None:
    prompts = load_jsonl(DEFAULT_PROMPTS)
    assert 150 <= len(prompts) <= 200
    ids = [p.prompt_id for p in prompts]
    assert len(set(ids)) == len(ids)
    assert all(p.prompt_id.startswith("r") for p in prompts)
    assert all(6 <= len(p.text.split()) <= 14 for p in prompts), [
        p.text for p in prompts if not 6 <= len(p.text.split()) <= 14
    ]
    assert len({p.text for p in prompts}) == len(prompts)
    assert all("<" not in p.text for p in prompts)


def test_load_jsonl_options_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "my_prompts.jsonl"
    rows = [
        {"prompt": "one", "key": 7, "answer": "1"},
        {"prompt": "two", "answer": "2"},
        {"prompt": "  ", "answer": "x"},
    ]
    f.write_text(
        "\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[1:]) + "\n"
    )
    prompts = load_jsonl(f, text_field="prompt", id_field="key", metadata_fields=("answer",))
    # The second record is on physical line 3 (line 2 is blank); the empty-text line is skipped.
    assert prompts == [Prompt("7", "one", {"answer": "1"}), Prompt("my_prompts:3", "two", {"answer": "2"})]
    assert [p.prompt_id for p in load_jsonl(f, text_field="prompt", id_field=None)] == ["my_prompts:1", "my_prompts:3"]
    with pytest.raises(ValueError, match="missing text field 'text'"):
        load_jsonl(f)
    with pytest.raises(ValueError, match="missing metadata field 'nope'"):
        load_jsonl(f, text_field="prompt", metadata_fields=("nope",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "missing.jsonl")


def test_load_prompts_takes_the_typed_section(tmp_path: Path) -> None:
    assert len(load_prompts(PromptSource(kind="gsm8k", path=str(DATA / "gsm8k_train.jsonl")))) == 7473
    csv_prompts = load_prompts(PromptSource(kind="csv", path=str(DATA / "imdb_reviews.csv"), first_k_words=5))
    assert len(csv_prompts) == 1100 and all(len(p.text.split()) == 5 for p in csv_prompts)
    assert load_prompts(PromptSource()) == load_jsonl(DEFAULT_PROMPTS)  # the default: the shipped openings
    f = tmp_path / "q.jsonl"
    f.write_text('{"q": "one", "key": 7}\n{"q": "two"}\n')
    assert load_prompts(PromptSource(path=str(f), text_field="q", id_field="key")) == [
        Prompt("7", "one"),
        Prompt("q:2", "two"),
    ]
    assert [p.prompt_id for p in load_prompts(PromptSource(path=str(f), text_field="q", id_field=None))] == [
        "q:1",
        "q:2",
    ]
    with pytest.raises(FileNotFoundError):
        load_prompts(PromptSource(path=str(tmp_path / "missing.jsonl")))
    # what the loader used to re-check by hand is refused by the section itself
    with pytest.raises(ValidationError, match="literal_error|Input should be 'jsonl', 'csv' or 'gsm8k'"):
        PromptSource(kind="parquet", path="x")
    with pytest.raises(ValidationError, match='applies only when kind is "csv"'):
        PromptSource(kind="gsm8k", path="x", column="question")


# --------------------------------------------------------------------- split


def _items(n: int) -> list[Prompt]:
    return [Prompt(f"id{i}", f"text {i}", {}) for i in range(n)]


def test_split_disjoint_complete_stable_and_fraction() -> None:
    prompts = _items(1000)
    train, evaluation = split_prompts(prompts, eval_fraction=0.2, seed=7)
    train_ids = {p.prompt_id for p in train}
    eval_ids = {p.prompt_id for p in evaluation}
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == {p.prompt_id for p in prompts}
    assert abs(len(evaluation) / 1000 - 0.2) <= 0.05
    # Stable across calls and independent of input order.
    assert split_prompts(prompts, eval_fraction=0.2, seed=7) == (train, evaluation)
    _, eval_rev = split_prompts(prompts[::-1], eval_fraction=0.2, seed=7)
    assert {p.prompt_id for p in eval_rev} == eval_ids
    # A different seed gives a different split; the fraction edges are exact.
    _, eval_other = split_prompts(prompts, eval_fraction=0.2, seed=8)
    assert {p.prompt_id for p in eval_other} != eval_ids
    assert split_prompts(prompts, eval_fraction=0.0, seed=1)[1] == []
    assert split_prompts(prompts, eval_fraction=1.0, seed=1)[0] == []
    # Growing the fraction only moves prompts from train to eval.
    _, eval_bigger = split_prompts(prompts, eval_fraction=0.3, seed=7)
    assert eval_ids <= {p.prompt_id for p in eval_bigger}


def test_run_split_takes_split_seed_over_the_run_seed() -> None:
    source = PromptSource(kind="jsonl", path=str(DEFAULT_PROMPTS))
    prompts = load_prompts(source)
    by_run_seed = {s: {p.prompt_id for p in run_split(source, s)[1]} for s in (0, 1)}
    assert by_run_seed[0] == {p.prompt_id for p in split_prompts(prompts, eval_fraction=0.1, seed=0)[1]}
    assert by_run_seed[0] != by_run_seed[1]
    # split_seed fixes the held-out prompts whatever the run seed: several seeds, one held-out set
    fixed = source.model_copy(update={"split_seed": 0})
    for run_seed in (0, 1, 5):
        train, held_out = run_split(fixed, run_seed)
        assert {p.prompt_id for p in held_out} == by_run_seed[0]
        assert len(train) + len(held_out) == len(prompts)


def test_split_stable_across_processes() -> None:
    prompts = _items(300)
    _, evaluation = split_prompts(prompts, eval_fraction=0.25, seed=3)
    code = (
        "from streamrl.common.prompts import Prompt, split_prompts\n"
        "ps=[Prompt(f'id{i}', 't', {}) for i in range(300)]\n"
        "print(','.join(p.prompt_id for p in split_prompts(ps, eval_fraction=0.25, seed=3)[1]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    assert out == ",".join(p.prompt_id for p in evaluation)


def test_split_bad_arguments() -> None:
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValidationError, match="eval_fraction"):
            split_prompts(_items(3), eval_fraction=bad, seed=0)
    with pytest.raises(ValidationError, match="instance of Prompt"):
        split_prompts(["not a prompt"], eval_fraction=0.5, seed=0)


# -------------------------------------------------------------------- stream


def test_stream_shards_disjoint_and_cover_each_epoch() -> None:
    prompts = _items(103)
    num_shards = 4
    streams = [PromptStream(prompts, seed=11, shard=s, num_shards=num_shards) for s in range(num_shards)]
    for epoch in range(3):
        per_shard = [[p.prompt_id for p in st.epoch_order(epoch)] for st in streams]
        flat = [i for ids in per_shard for i in ids]
        assert len(flat) == len(set(flat)) == 103
        assert set(flat) == {p.prompt_id for p in prompts}
        # Consuming the iterator yields exactly the epoch order.
        for st, ids in zip(streams, per_shard):
            assert [p.prompt_id for p in st.next_batch(len(ids))] == ids
            assert st.epoch == epoch
    # Epochs are shuffled differently.
    assert streams[0].epoch_order(0) != streams[0].epoch_order(1)


def test_stream_deterministic_and_infinite() -> None:
    prompts = _items(10)
    a = PromptStream(prompts, seed=5)
    b = PromptStream(prompts, seed=5)
    batch_a = [p.prompt_id for p in a.next_batch(35)]  # crosses 3 epoch boundaries
    assert batch_a == [p.prompt_id for p in b.next_batch(35)]
    for start in (0, 10, 20):
        assert sorted(batch_a[start : start + 10]) == sorted(p.prompt_id for p in prompts)
    assert a.epoch == 3
    assert [p.prompt_id for p in PromptStream(prompts, seed=6).next_batch(10)] != batch_a[:10]
    it = iter(PromptStream(prompts, seed=5))
    assert [next(it).prompt_id for _ in range(35)] == batch_a
    assert a.next_batch(0) == []


def test_stream_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], seed=0)
    with pytest.raises(ValueError, match=r"shard must be in \[0, 2\), got 2"):
        PromptStream(_items(5), seed=0, shard=2, num_shards=2)
    with pytest.raises(ValueError, match="num_shards=3 exceeds the number of prompts"):
        PromptStream(_items(2), seed=0, shard=0, num_shards=3)
    for kwargs, field in [
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 0, "shard": -1}, "shard"),
        ({"seed": 0, "num_shards": 0}, "num_shards"),
    ]:
        with pytest.raises(ValidationError, match=field):
            PromptStream(_items(2), **kwargs)
    for n in (-1, 1.0, True):
        with pytest.raises(ValidationError, match="validation error for PromptStream.next_batch"):
            PromptStream(_items(2), seed=0).next_batch(n)


# -------------------------------------------------------------------- format


def _char_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    hf.chat_template = chat_template
    return hf


def test_format_prompt_without_template_returns_text() -> None:
    text = "I went into this film expecting"
    assert format_prompt(text, None, chat_template=False) == text
    assert format_prompt(text, _char_tokenizer(None), chat_template=True, system="be nice") == text
    assert format_prompt(text, _char_tokenizer("{{ messages }}"), chat_template=False) == text


def test_format_prompt_with_template() -> None:
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok = _char_tokenizer(template)
    assert format_prompt("Hi there", tok, chat_template=True) == "<|user|>Hi there\n<|assistant|>"
    assert (
        format_prompt("Hi there", tok, chat_template=True, system="Be brief.")
        == "<|system|>Be brief.\n<|user|>Hi there\n<|assistant|>"
    )
