"""Bring your own data: prompts read with Hugging Face ``datasets`` from real
files of ../shared/data converted in the test (parquet, csv, jsonl, arrow, save_to_disk), chat
``messages`` prompts rendered with a chat template, and metadata columns reaching the reward."""

from __future__ import annotations

import datetime
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamrl.common.config import ConfigError, PromptSource, load_config, resource_problems
from streamrl.common.messages import FinishReason, SamplingParams, decode, encode
from streamrl.common.models import build_char_tokenizer
from streamrl.common.prompt_text import format_prompt
from streamrl.common.prompts import (
    dataset_format,
    load_csv,
    load_dataset_prompts,
    load_gsm8k,
    load_prompts,
)
from streamrl.services.generator.rollouts import group_rollouts
from streamrl.services.generator.sampling import Completion, prepare_prompts
from streamrl.services.scorer.rewards import CompositeReward, RewardComponent
from streamrl.services.scorer.scoring import score_batch

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def gsm8k_rows(n: int) -> list[dict]:
    with open(DATA / "gsm8k_train.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def hh_chats(n: int) -> list[dict]:
    """hh-rlhf dialogues as chat prompts: every turn of `chosen` except the last assistant reply."""
    out = []
    with gzip.open(DATA / "hh_rlhf_harmless_pairs.jsonl.gz", "rt") as f:
        for i, line in zip(range(n), f):
            turns = []
            for part in json.loads(line)["chosen"].split("\n\n")[1:]:
                role, _, content = part.partition(":")
                if role in ("Human", "Assistant"):
                    turns.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
                elif turns:  # a paragraph break inside a turn
                    turns[-1]["content"] += "\n\n" + part
            while turns and turns[-1]["role"] == "assistant":
                turns.pop()
            out.append({"id": f"hh-{i}", "messages": turns, "source": "hh-rlhf"})
    return out


def test_gsm8k_as_parquet_equals_the_jsonl_loader(tmp_path):
    rows = gsm8k_rows(300)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k.parquet")
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = PromptSource(
        kind="datasets",
        path=str(tmp_path / "gsm8k.parquet"),
        text_field="question",
        id_field=None,
        metadata_fields=["answer"],
    )
    got = load_prompts(source)
    want = load_gsm8k(tmp_path / "gsm8k.jsonl")
    assert [(p.text, p.metadata) for p in got] == [(p.text, p.metadata) for p in want]
    assert got[0].prompt_id == "gsm8k:1" and got[0].metadata["answer"].endswith("#### 72")
    assert len({p.prompt_id for p in got}) == 300


def test_imdb_csv_and_parquet_through_datasets_keep_the_sentiment_column(tmp_path):
    reviews = load_csv(DATA / "imdb_reviews.csv", column="review", strip_html=False, metadata_columns=("sentiment",))
    table = pa.Table.from_pylist(
        [
            {"review_id": f"r{i}", "review": p.text, "sentiment": p.metadata["sentiment"]}
            for i, p in enumerate(reviews[:200])
        ]
    )
    pq.write_table(table, tmp_path / "imdb.parquet")
    by_csv = load_prompts(
        PromptSource(
            kind="datasets", path=str(DATA / "imdb_reviews.csv"), text_field="review", metadata_fields=["sentiment"]
        )
    )
    by_parquet = load_prompts(
        PromptSource(
            kind="datasets",
            path=str(tmp_path / "imdb.parquet"),
            text_field="review",
            id_field="review_id",
            metadata_fields=["sentiment"],
        )
    )
    assert len(by_csv) == 1100 and by_csv[0].prompt_id == "imdb_reviews:1"
    assert [(p.text, p.metadata) for p in by_csv[:200]] == [(p.text, p.metadata) for p in by_parquet]
    assert by_parquet[5].prompt_id == "r5"
    assert {p.metadata["sentiment"] for p in by_csv} == {"positive", "negative"}


def test_json_arrow_and_save_to_disk_folders_read_the_same_rows(tmp_path):
    import datasets

    rows = gsm8k_rows(50)
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp_path / "g.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    texts = [r["question"] for r in rows]
    for path, split in [("g.jsonl.gz", "train"), ("g.arrow", "train"), ("saved", "test")]:
        got = load_dataset_prompts(tmp_path / path, split=split, text_field="question", metadata_fields=["answer"])
        assert [p.text for p in got] == texts, path
        assert got[-1].metadata == {"answer": rows[-1]["answer"]}
    with pytest.raises(ValueError, match=r"no split 'train' \(splits: \['test'\]\); fix: set split"):
        load_dataset_prompts(tmp_path / "saved", text_field="question")


def test_chat_messages_from_real_dialogues_are_rendered_with_the_chat_template(tmp_path):
    chats = hh_chats(40)
    assert all(c["messages"] and c["messages"][-1]["role"] == "user" for c in chats)
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "hh.parquet")
    from_jsonl = load_prompts(
        PromptSource(
            kind="jsonl", path=str(tmp_path / "hh.jsonl"), messages_field="messages", metadata_fields=["source"]
        )
    )
    from_parquet = load_prompts(
        PromptSource(
            kind="datasets", path=str(tmp_path / "hh.parquet"), messages_field="messages", metadata_fields=["source"]
        )
    )
    for a, b, chat in zip(from_jsonl, from_parquet, chats):
        assert a.messages == b.messages == tuple(chat["messages"])
        assert a.prompt_id == b.prompt_id == chat["id"] and a.metadata == b.metadata == {"source": "hh-rlhf"}
        assert a.text == chat["messages"][-1]["content"]
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    first = from_parquet[0]
    expected = "".join(f"[{m['role']}] {m['content']}|" for m in chats[0]["messages"]) + "[assistant] "
    assert format_prompt(first.text, tokenizer, chat_template=False, messages=first.messages) == expected
    with_system = format_prompt(first.text, tokenizer, chat_template=False, system="Be kind.", messages=first.messages)
    assert with_system == "[system] Be kind.|" + expected
    # the generator's own path: rendered, and no BOS added on top of the template
    texts, ids = prepare_prompts(
        tokenizer, from_parquet[:2], chat_template=False, system_prompt=None, max_prompt_tokens=10_000
    )
    assert texts[0] == expected
    assert ids[0] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template to render them; fix: use a chat model"):
        format_prompt(first.text, tokenizer, chat_template=False, messages=first.messages)


def test_metadata_columns_reach_the_reward_function(tmp_path):
    """A custom verifiable reward gets the configured columns, through the rollout's wire round trip."""
    rows = gsm8k_rows(4)
    for i, row in enumerate(rows):
        row["difficulty"] = i
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    prompts = load_prompts(
        PromptSource(
            kind="datasets",
            path=str(tmp_path / "g.parquet"),
            text_field="question",
            metadata_fields=["answer", "difficulty"],
        )
    )
    seen = []

    def verifier(prompt_texts, completions, metadata):
        seen.extend(metadata)
        return [1.0 if m["answer"].rsplit("#### ", 1)[1] in c else 0.0 for c, m in zip(completions, metadata)]

    completion = Completion(
        prompt_tokens=np.array([5, 6], dtype=np.int32),
        completion_tokens=np.array([7], dtype=np.int32),
        logprobs=np.array([-0.5], dtype=np.float32),
        finish_reason=FinishReason.LENGTH,
        text="72",
    )
    rollouts = [
        r
        for p in prompts[:2]
        for r in group_rollouts(
            generator_id="g",
            group_number=0,
            prompt=p,
            prompt_text=p.text,
            completions=[completion],
            version=0,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
        )
    ]
    rollouts = [decode(encode(r)) for r in rollouts]
    scored = score_batch(CompositeReward([RewardComponent(name="verify", weight=1.0, fn=verifier)]), rollouts, "s")
    assert seen == [{"answer": rows[0]["answer"], "difficulty": 0}, {"answer": rows[1]["answer"], "difficulty": 1}]
    assert [s.reward for s in scored] == [1.0, 0.0]  # problem 1's answer is 72, problem 2's is 10


def test_unusable_data_is_refused_with_the_column_and_the_fix(tmp_path):
    rows = [{"text": "a", "when": datetime.datetime(2024, 1, 1)}, {"text": "b", "when": datetime.datetime(2024, 1, 2)}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"columns \['answer'\] not in the data set \(columns: \['text', 'when'\]\)"):
        load_dataset_prompts(tmp_path / "t.parquet", metadata_fields=["answer"])
    with pytest.raises(ValueError, match=r"row 1: metadata field 'when' holds datetime .* fix: convert it"):
        load_dataset_prompts(tmp_path / "t.parquet", metadata_fields=["when"])
    with pytest.raises(ValueError, match=r"cannot tell the file format .* fix: use one of \.parquet"):
        dataset_format(tmp_path / "t.txt")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: message 0 of 'messages' is .*fix: make 'messages' a list"):
        load_prompts(PromptSource(kind="jsonl", path=str(tmp_path / "bad.jsonl"), messages_field="messages"))


def test_config_rules_and_resource_checks_of_the_new_options(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text('[generator.prompts]\nkind = "csv"\nmessages_field = "m"\n')
    with pytest.raises(
        ConfigError,
        match=r"generator.prompts.messages_field: `messages_field` applies only when "
        r"kind is \"jsonl\" or \"datasets\"",
    ):
        load_config(config)
    config.write_text('[generator.prompts]\nkind = "datasets"\npath = "x.parquet"\ndataset = "openai/gsm8k"\n')
    with pytest.raises(ConfigError, match=r"generator.prompts.dataset: give either `path` .* or `dataset`"):
        load_config(config)
    folder = tmp_path / "saved"
    folder.mkdir()
    ok = load_config(None, ['generator.prompts.kind="datasets"', f'generator.prompts.path="{folder}"'])
    assert resource_problems(ok, ["generator"]) == []
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = load_config(None, ['generator.prompts.kind="datasets"', 'generator.prompts.dataset="nobody/no-such-set"'])
    [problem] = resource_problems(hub, ["generator"])
    assert problem.startswith(
        "generator.prompts.dataset: 'nobody/no-such-set' is not in the Hugging Face cache and the hub is offline"
    )
