"""Tests for services/scorer/rewards.py (real GSM8K rows, tiny local reward model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from streamrl.common.config import BUILTIN_REWARDS, ResourceError, RewardSpec
from streamrl.services.scorer import rewards
from streamrl.services.scorer.rewards import (
    CompositeReward,
    RewardComponent,
    RewardModelScorer,
    build_reward,
    count_char,
    extract_final_number,
    gsm8k_exact_match,
    vader_sentiment,
)

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
CPU = torch.device("cpu")


# --------------------------------------------------------------------- VADER


def test_vader_positive_negative_and_matches_library() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = [
        "This movie was absolutely wonderful, a brilliant and moving masterpiece. I loved it!",
        "A terrible, boring, awful film. I hated every minute of this garbage.",
        "",
    ]
    scores = vader_sentiment(["p"] * 3, texts, [{}] * 3)
    assert scores[0] > 0.5
    assert scores[1] < -0.5
    assert scores[2] == 0.0
    analyzer = SentimentIntensityAnalyzer()
    assert scores == [analyzer.polarity_scores(t)["compound"] for t in texts]
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores)


def test_vader_analyzer_created_once() -> None:
    vader_sentiment([""], ["good"], [{}])
    first = rewards._vader_analyzer()
    vader_sentiment([""], ["bad"], [{}])
    assert rewards._vader_analyzer() is first


# --------------------------------------------------------------------- GSM8K


def _gsm8k_rows(n: int) -> list[dict]:
    rows = []
    with (DATA / "gsm8k_train.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def test_gsm8k_reference_answer_scores_one_on_real_rows() -> None:
    rows = _gsm8k_rows(200)
    meta = [{"answer": r["answer"]} for r in rows]
    questions = [r["question"] for r in rows]
    assert gsm8k_exact_match(questions, [r["answer"] for r in rows], meta) == [1.0] * len(rows)
    # Only the final line is needed, and the reference's own number without '####' too.
    finals = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    assert gsm8k_exact_match(questions, [f"The answer is {x}." for x in finals], meta) == [1.0] * len(rows)


def test_gsm8k_first_row_hand_checked() -> None:
    row = _gsm8k_rows(1)[0]
    assert row["answer"].endswith("#### 72")
    meta = [{"answer": row["answer"]}]
    q = [row["question"]]
    assert gsm8k_exact_match(q, ["48 + 24 = 72 clips.\n#### 72"], meta) == [1.0]
    assert gsm8k_exact_match(q, ["48 + 24 = 73 clips.\n#### 73"], meta) == [0.0]
    # '####' wins over a later number; without '####' the last number counts.
    assert gsm8k_exact_match(q, ["#### 72 (I first thought 70)"], meta) == [1.0]
    assert gsm8k_exact_match(q, ["It is 72, not 71"], meta) == [0.0]
    assert gsm8k_exact_match(q, ["I have no idea."], meta) == [0.0]
    assert gsm8k_exact_match(q, ["72.0"], meta) == [1.0]
    assert gsm8k_exact_match(q, ["$72"], meta) == [1.0]


def test_gsm8k_commas_and_decimals() -> None:
    meta = [{"answer": "#### 1234"}]
    assert gsm8k_exact_match([""], ["The answer is 1,234."], meta) == [1.0]
    assert gsm8k_exact_match([""], ["#### 18.0"], [{"answer": "18"}]) == [1.0]
    assert gsm8k_exact_match([""], ["#### 18.5"], [{"answer": 18}]) == [0.0]
    assert gsm8k_exact_match([""], ["she owes -5 dollars"], [{"answer": "#### -5"}]) == [1.0]
    # A real row whose final answer has a thousands separator.
    row = next(r for r in _gsm8k_rows(7473) if "," in r["answer"].rsplit("####", 1)[1])
    digits = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    assert gsm8k_exact_match([row["question"]], [f"#### {digits}"], [{"answer": row["answer"]}]) == [1.0]


def test_extract_final_number_edge_cases() -> None:
    assert extract_final_number("no digits") is None
    assert extract_final_number("range 3-4") == 4
    assert extract_final_number("#### \n nothing, earlier 5") == 5
    assert extract_final_number("$1,234.50 total") == extract_final_number("1234.5")


def test_gsm8k_missing_answer_raises() -> None:
    with pytest.raises(ValueError, match="answer"):
        gsm8k_exact_match(["q"], ["#### 1"], [{}])
    with pytest.raises(ValueError, match="no number"):
        gsm8k_exact_match(["q"], ["#### 1"], [{"answer": "none"}])


# ---------------------------------------------------------------- count_char


def test_count_char_hand_computed() -> None:
    comps = ["aaab", "", "bbbb", "aAa", "a"]
    assert count_char([""] * 5, comps, [{}] * 5) == [0.75, 0.0, 0.0, 2 / 3, 1.0]
    assert count_char([""] * 2, ["xxyx", "x"], [{}] * 2, char="x") == [0.75, 1.0]
    # Saturating count mode.
    assert count_char([""] * 3, ["aaaaa", "ab", ""], [{}] * 3, max_count=4) == [1.0, 0.25, 0.0]


def test_count_char_bad_args() -> None:
    for char in ("ab", "", 1):
        with pytest.raises(ValidationError, match="char"):
            count_char([""], ["a"], [{}], char=char)
    for max_count in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValidationError, match="max_count"):
            count_char([""], ["a"], [{}], max_count=max_count)


# -------------------------------------------------- resolving RewardSpec.function


def test_builtin_names_are_the_builtin_functions() -> None:
    assert {name: RewardSpec(function=name).resolve() for name in BUILTIN_REWARDS} == {
        "vader_sentiment": vader_sentiment,
        "gsm8k_exact_match": gsm8k_exact_match,
        "count_char": count_char,
    }
    assert RewardSpec(function="os.path:join").resolve() is __import__("os").path.join


@pytest.mark.parametrize(
    ("function", "kwargs", "key", "fragment"),
    [
        ("no_such_pkg_xyz.mod:fn", {}, "function", "No module named 'no_such_pkg_xyz'"),
        ("streamrl.services.scorer.rewards:no_such_fn", {}, "function", "cannot import name 'no_such_fn'"),
        ("streamrl.services.scorer.rewards:__all__", {}, "function", "is a list, not a function"),
        ("count_char", {"chr": "a"}, "kwargs", "unexpected keyword argument 'chr'"),
        ("count_char", {"char": "ab"}, "kwargs.char", "at most 1 character"),
    ],
)
def test_resolve_errors(function: str, kwargs: dict, key: str, fragment: str) -> None:
    with pytest.raises(ResourceError, match=fragment) as info:
        RewardSpec(function=function, kwargs=kwargs).resolve()
    assert info.value.key == key and "fix: " in str(info.value)


# ------------------------------------------------------------ CompositeReward


def _const(value: float):
    def fn(prompts, completions, metadata):
        return [value] * len(completions)

    return fn


def test_composite_weighted_sum_hand_computed() -> None:
    comp = CompositeReward(
        [
            RewardComponent("len", 0.5, lambda p, c, m: [float(len(x)) for x in c]),
            RewardComponent("a_frac", 2.0, count_char),
            RewardComponent("const", -1.0, _const(3.0)),
        ]
    )
    totals, parts = comp(["p", "q"], ["aab", "bbbb"], [{}, {}])
    # "aab": 0.5*3 + 2*(2/3) - 3 = -1.5 + 4/3 ; "bbbb": 0.5*4 + 0 - 3 = -1.0
    assert totals == pytest.approx([0.5 * 3 + 2.0 * (2 / 3) - 3.0, -1.0])
    assert parts == [
        {"len": 3.0, "a_frac": pytest.approx(2 / 3), "const": 3.0},
        {"len": 4.0, "a_frac": 0.0, "const": 3.0},
    ]
    assert comp.names == ["len", "a_frac", "const"]


def test_composite_wrong_length_and_non_finite() -> None:
    bad_len = CompositeReward(
        [RewardComponent("ok", 1.0, _const(1.0)), RewardComponent("short", 1.0, lambda p, c, m: [1.0])]
    )
    with pytest.raises(ValueError, match="'short' returned 1 values for 2"):
        bad_len(["a", "b"], ["x", "y"], [{}, {}])
    nan = CompositeReward([RewardComponent("nanny", 1.0, _const(math.nan))])
    with pytest.raises(ValueError, match="'nanny'.*non-finite"):
        nan(["a"], ["x"], [{}])
    with pytest.raises(ValueError, match="lengths differ"):
        CompositeReward([RewardComponent("ok", 1.0, _const(1.0))])(["a"], ["x", "y"], [{}, {}])


def test_composite_constructor_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CompositeReward([])
    with pytest.raises(ValueError, match="duplicate"):
        CompositeReward([RewardComponent("x", 1.0, _const(1.0)), RewardComponent("x", 1.0, _const(2.0))])
    for weight in (math.inf, math.nan, "heavy", True):
        with pytest.raises(ValidationError, match="weight"):
            RewardComponent(name="x", weight=weight, fn=_const(1.0))
    with pytest.raises(ValidationError, match="name"):
        RewardComponent(name="", weight=1.0, fn=_const(1.0))
    with pytest.raises(ValidationError, match="fn"):
        RewardComponent(name="x", weight=1.0, fn="not callable")


# --------------------------------------------------------------- build_reward


def test_build_reward_functions_with_kwargs_and_names() -> None:
    reward = build_reward(
        [
            RewardSpec(function="streamrl.services.scorer.rewards:count_char", weight=2.0, kwargs={"char": "b"}),
            RewardSpec(function="count_char", name="a_count"),
        ],
        device=CPU,
    )
    assert reward.names == ["count_char", "a_count"]
    totals, parts = reward(["", ""], ["abbb", "aaaa"], [{}, {}])
    assert parts == [{"count_char": 0.75, "a_count": 0.25}, {"count_char": 0.0, "a_count": 1.0}]
    assert totals == pytest.approx([2 * 0.75 + 0.25, 1.0])


def test_build_reward_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_reward([], device=CPU)
    with pytest.raises(ValueError, match="duplicate"):
        build_reward([RewardSpec(function="count_char"), RewardSpec(function="count_char")], device=CPU)
    with pytest.raises(ResourceError, match="unexpected keyword argument 'chr'"):
        build_reward([RewardSpec(function="count_char", kwargs={"chr": "a"})], device=CPU)
    with pytest.raises(ResourceError, match="cannot import name 'nope'"):
        build_reward([RewardSpec(function="streamrl.services.scorer.rewards:nope")], device=CPU)


# ---------------------------------------------------------- RewardModelScorer


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-:\n")
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    model = LlamaForSequenceClassification(config)
    # The score head is initialised tiny; make outputs clearly non-trivial.
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


PROMPTS = ["Review: ", "Q: what is it?\nA:", "Hi", "The film was", "x"]
COMPLETIONS = ["a fine film.", " 42", "", " long and slow, but the ending works!", "yz"]


def test_reward_model_batched_equals_single_and_manual(tiny_rm_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = RewardModelScorer(str(tiny_rm_dir), batch_size=3, device=CPU)
    assert not scorer.model.training
    batched = scorer(PROMPTS, COMPLETIONS, [{}] * len(PROMPTS))
    assert len(batched) == len(PROMPTS) and all(isinstance(s, float) for s in batched)
    single = [scorer([p], [c], [{}])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 4) for s in batched)) > 1  # not a constant function

    # Manual forward, one text at a time, no padding involved.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    manual = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, COMPLETIONS):
            ids = tok(p + c, return_tensors="pt")["input_ids"]
            manual.append(model(input_ids=ids).logits[0, 0].item())
    assert batched == pytest.approx(manual, abs=1e-5)


def test_reward_model_pad_falls_back_to_eos(tiny_rm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    for f in tiny_rm_dir.iterdir():
        if not (tmp_path / f.name).exists():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    scorer = RewardModelScorer(str(tmp_path), batch_size=2, device=CPU)
    assert scorer.tokenizer.pad_token == "<eos>"
    assert scorer.model.config.pad_token_id == scorer.tokenizer.eos_token_id
    batched = scorer(PROMPTS, COMPLETIONS, [{}] * len(PROMPTS))
    single = [scorer([p], [c], [{}])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert batched == pytest.approx(single, abs=1e-5)


def test_reward_model_via_build_reward(tiny_rm_dir: Path) -> None:
    reward = build_reward(
        [
            RewardSpec(model=str(tiny_rm_dir), weight=0.5, batch_size=2, max_length=4),
            RewardSpec(function="count_char", weight=1.0, kwargs={"char": "a"}),
        ],
        device=CPU,
    )
    assert reward.names == ["reward_model", "count_char"]
    assert (reward.components[0].fn.batch_size, reward.components[0].fn.max_length) == (2, 4)
    totals, parts = reward(PROMPTS, COMPLETIONS, [{}] * len(PROMPTS))
    for total, part in zip(totals, parts):
        assert total == pytest.approx(0.5 * part["reward_model"] + part["count_char"])


def test_reward_model_bad_args(tiny_rm_dir: Path) -> None:
    for bad in (0, True, 2.5):
        with pytest.raises(ValidationError, match="batch_size"):
            RewardModelScorer(str(tiny_rm_dir), batch_size=bad, device=CPU)
    with pytest.raises(ValidationError, match="max_length"):
        RewardModelScorer(str(tiny_rm_dir), max_length=0, device=CPU)
    scorer = RewardModelScorer(str(tiny_rm_dir), device=CPU)
    with pytest.raises(ValueError, match="prompts"):
        scorer(["a", "b"], ["c"], [{}])
