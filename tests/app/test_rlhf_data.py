"""Demonstration and preference data: layouts, hh-rlhf dialogues, the held-out split, rendering."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from streamrl.stages.rlhf_data import load_examples, parse_dialogue, parse_row, read_rows, render_prompt, split_examples

HH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hh_rlhf_harmless_pairs.jsonl.gz"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_layouts_become_examples():
    pair = parse_row({"prompt": "p", "chosen": " a", "rejected": " b"}, row_number=1)
    assert (pair.text, pair.responses, pair.messages) == ("p", (" a", " b"), ({"role": "user", "content": "p"},))
    demo = parse_row({"prompt": "p", "response": " r"}, row_number=2)
    assert demo.responses == (" r",) and demo.demonstration == " r"
    ranked = parse_row({"prompt": "p", "responses": ["1", "2", "3"]}, row_number=3)
    assert ranked.responses == ("1", "2", "3")
    chat = parse_row(
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        },
        row_number=4,
    )
    assert chat.demonstration == "a" and [m["role"] for m in chat.messages] == ["system", "user"]
    assert chat.text == "s\n\nHuman: u\n\nAssistant:"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p"}, "match no layout"),
        ({"prompt": "", "response": "r"}, "'prompt' must be a non-empty string"),
        ({"prompt": "p", "responses": ["only one"]}, "at least two"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}, "end with a user turn"),
        ({"chosen": "no turns", "rejected": "x"}, "hh-rlhf dialogues"),
    ],
)
def test_bad_rows_are_refused_with_the_row(row, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_row(row, row_number=7, source="d.jsonl")
    assert "d.jsonl row 7" in str(info.value)


def test_hh_dialogue_prompt_is_the_shared_prefix():
    chosen = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: yes"
    rejected = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: no way"
    messages, text, responses = parse_dialogue(chosen, rejected)
    assert text == "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    assert responses == [" yes", " no way"]
    assert messages == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    # dialogues that part before the last turn (a malformed marker in real hh-rlhf rows)
    _, text, responses = parse_dialogue(
        "\n\nHuman: q\n\nAssistant: x  Human: more\n\nAssistant: y", "\n\nHuman: q\n\nAssistant: z"
    )
    assert text == "\n\nHuman: q\n\nAssistant:" and responses == [" x  Human: more\n\nAssistant: y", " z"]


def test_split_is_deterministic_disjoint_and_order_free():
    examples = [
        parse_row({"prompt": f"p{i % 40}", "chosen": f" c{i}", "rejected": " r"}, row_number=i) for i in range(60)
    ]
    train, held = split_examples(examples, eval_rows=10, seed=3)
    assert {e.text for e in train}.isdisjoint({e.text for e in held})
    assert len(held) >= 10 and len(train) + len(held) == 60
    shuffled = list(reversed(examples))
    train2, held2 = split_examples(shuffled, eval_rows=10, seed=3)
    assert {e.row for e in held2} == {e.row for e in held}
    assert {e.row for e in split_examples(examples, eval_rows=10, seed=4)[1]} != {e.row for e in held}
    limited, held3 = split_examples(examples, eval_rows=10, seed=3, train_rows=5)
    assert len(limited) == 5 and set(e.row for e in limited) <= set(e.row for e in train) and held3 == held
    with pytest.raises(ValueError, match="eval_rows"):
        split_examples(examples, eval_rows=60, seed=0)


def test_files_jsonl_gz_and_parquet(tmp_path):
    rows = [{"prompt": "p", "response": " r"}, {"prompt": "q", "response": " s"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    assert read_rows(tmp_path / "d.jsonl") == rows == read_rows(tmp_path / "d.jsonl.gz")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [e.responses for e in load_examples(tmp_path / "d.parquet")] == [(" r",), (" s",)]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unknown data format"):
        read_rows(write_jsonl(tmp_path / "d.txt", rows))


def test_render_prompt_plain_and_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    example = parse_row(
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: a1\n\nHuman: bye\n\nAssistant: ok",
            "rejected": "\n\nHuman: hi\n\nAssistant: a1\n\nHuman: bye\n\nAssistant: no",
        },
        row_number=1,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert render_prompt(example, tokenizer, chat_template=False, system_prompt=None) == example.text
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(example, tokenizer, chat_template=True, system_prompt=None)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert (
        render_prompt(example, tokenizer, chat_template=True, system_prompt="be nice")
        == "<system>be nice<user>hi<assistant>a1<user>bye<assistant>"
    )


@pytest.mark.skipif(not HH.is_file(), reason="shared hh-rlhf data not present")
def test_every_real_hh_rlhf_row_parses():
    examples = load_examples(HH)
    assert len(examples) == 1800 and all(len(e.responses) == 2 for e in examples)
    assert all(e.text.endswith("\n\nAssistant:") and e.messages[-1]["role"] == "user" for e in examples)
