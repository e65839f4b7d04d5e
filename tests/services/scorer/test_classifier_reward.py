"""Reward-model footguns on a real two-class classifier trained in the test: the
output read is chosen (`label`, index or name) and required when there are two, `batch_size` and
`max_length` apply, `chat_template` renders the prompt, and `timeout_s` bounds a micro-batch."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from streamrl.common.config import RewardSpec, load_config, resource_problems
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.models import build_char_tokenizer
from streamrl.services.scorer.deadline import RewardTimeout, TimeLimited
from streamrl.services.scorer.health import RewardHealth
from streamrl.services.scorer.metrics import ScorerMetrics
from streamrl.services.scorer.rewards import build_reward

CPU = torch.device("cpu")
GOOD, BAD = "a lovely great film", "a dull awful mess"


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory, tiny_model_dir):
    """A tiny char-level Llama classifier, labels 0 = NEGATIVE and 1 = POSITIVE, trained until it
    separates the two phrases (as a sentiment classifier does: output 0 is the NEGATIVE class)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}
    )
    tokenizer = build_char_tokenizer()
    model.config.pad_token_id = tokenizer.pad_token_id
    texts = [GOOD, BAD, "great " + GOOD, "awful " + BAD]
    labels = torch.tensor([1, 0, 1, 0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    encoded = [tokenizer(text, return_tensors="pt")["input_ids"] for text in texts]

    def separated() -> bool:  # every text's own class ahead by at least 1 nat
        with torch.no_grad():
            margins = [
                (model(input_ids=ids).logits[0] * (1 if label else -1)).diff().item()
                for ids, label in zip(encoded, labels)
            ]
        return min(margins) >= 1.0

    model.eval()  # the tiny Llama has no dropout: eval and train compute the same function
    for epoch in range(60):
        for ids, label in zip(encoded, labels):
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, label[None])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 5 == 4 and separated():
            break
    assert separated(), "the classifier did not learn to separate the phrases"
    folder = tmp_path_factory.mktemp("sentiment") / "clf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits(folder, text: str) -> torch.Tensor:
    """HF's own forward on the unpadded text: the reference the scorer must reproduce."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = build_char_tokenizer()(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_a_two_class_classifier_needs_a_label_and_reads_the_one_named(sentiment_dir, tmp_path):
    cfg = load_config(None, [f'scorer.rewards=[{{model = "{sentiment_dir}"}}]'])
    [problem] = resource_problems(cfg, ["scorer"])
    assert problem == (
        'scorer.rewards[0].label: the reward model has 2 outputs (0 = "NEGATIVE", 1 = "POSITIVE") '
        "and no `label` says which one is the reward; fix: set label to the index or name of the "
        "output that means good (a sentiment classifier's positive class, not output 0 when that is "
        "NEGATIVE)"
    )
    bad = load_config(None, [f'scorer.rewards=[{{model = "{sentiment_dir}", label = "JOYFUL"}}]'])
    assert resource_problems(bad, ["scorer"]) == [
        'scorer.rewards[0].label: "JOYFUL" is not a label of the reward model (0 = "NEGATIVE", 1 = "POSITIVE"); '
        "fix: use one of them"
    ]
    good = load_config(None, [f'scorer.rewards=[{{model = "{sentiment_dir}", label = "POSITIVE"}}]'])
    assert resource_problems(good, ["scorer"]) == []

    by_name = build_reward([RewardSpec(model=str(sentiment_dir), label="POSITIVE")], device=CPU)
    by_index = build_reward([RewardSpec(model=str(sentiment_dir), label=1, name="pos")], device=CPU)
    negative = build_reward([RewardSpec(model=str(sentiment_dir), label=0, name="neg")], device=CPU)
    prompts, completions = ["a ", "a "], [GOOD[2:], BAD[2:]]
    pos_scores, _ = by_name(prompts, completions, [{}, {}])
    assert pos_scores == pytest.approx(by_index(prompts, completions, [{}, {}])[0], abs=1e-6)
    assert pos_scores == pytest.approx(
        [logits(sentiment_dir, GOOD)[1].item(), logits(sentiment_dir, BAD)[1].item()], abs=1e-4
    )
    assert pos_scores[0] > pos_scores[1]  # the positive text earns more with the POSITIVE output ...
    neg_scores, _ = negative(prompts, completions, [{}, {}])
    assert neg_scores[0] < neg_scores[1]  # ... and less with output 0, the old default's footgun


def test_batch_size_and_max_length_apply(sentiment_dir):
    texts = [GOOD, BAD, "great", "a", GOOD + " " + BAD]
    one = build_reward([RewardSpec(model=str(sentiment_dir), label=1, batch_size=1)], device=CPU)
    many = build_reward([RewardSpec(model=str(sentiment_dir), label=1, batch_size=4)], device=CPU)
    assert one.components[0].fn.batch_size == 1 and many.components[0].fn.batch_size == 4
    assert one([""] * 5, texts, [{}] * 5)[0] == pytest.approx(many([""] * 5, texts, [{}] * 5)[0], abs=1e-5)
    short = build_reward([RewardSpec(model=str(sentiment_dir), label=1, max_length=6)], device=CPU)
    cut, _ = short([""], [BAD + " but" + GOOD[-6:]], [{}])
    assert cut == pytest.approx([logits(sentiment_dir, GOOD[-6:])[1].item()], abs=1e-4)  # the last 6 tokens


def test_chat_template_renders_the_prompt_as_the_user_turn(sentiment_dir, tmp_path):
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(sentiment_dir, folder)
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    reward = build_reward([RewardSpec(model=str(folder), label=1, chat_template=True)], device=CPU)
    scores, _ = reward(["review:"], [" great"], [{}])
    assert scores == pytest.approx([logits(folder, "<user>review:<assistant> great")[1].item()], abs=1e-4)
    with pytest.raises(Exception, match="model.chat_template = true"):
        load_config(
            None,
            ["model.chat_template=true", f'scorer.rewards=[{{model = "{folder}", label = 1, chat_template = true}}]'],
        )


def test_a_slow_reward_model_times_out_and_is_counted(sentiment_dir, caplog):
    reward = build_reward([RewardSpec(model=str(sentiment_dir), label=1, timeout_s=1e-4)], device=CPU)
    with pytest.raises(
        RewardTimeout,
        match=rf"reward model {sentiment_dir} took more than timeout_s = 0.0001s for 64 "
        r"completions; fix: raise timeout_s, lower batch_size or max_length",
    ):
        reward([""] * 64, [GOOD * 3] * 64, [{}] * 64)
    registry = ServiceMetrics("scorer", "scorer-0")
    health = RewardHealth(ScorerMetrics(registry), failing_after=1, names=["reward_model"])
    try:
        reward([""] * 64, [GOOD * 3] * 64, [{}] * 64)
    except RewardTimeout as exc:
        health.failed(exc, [])
    assert registry.registry.get_sample_value("streamrl_scorer_reward_failures_total", {"reason": "RewardTimeout"}) == 1


def test_time_limited_keeps_one_call_at_a_time():
    running, overlaps = [], []

    def slow(prompts, completions, metadata):
        overlaps.append(len(running))
        running.append(1)
        time.sleep(0.3)
        running.pop()
        return [1.0] * len(completions)

    limited = TimeLimited(slow, timeout_s=0.1, what="slow")
    with pytest.raises(RewardTimeout):
        limited(["p"], ["c"], [{}])
    with pytest.raises(RewardTimeout):  # queued behind the first, which still runs
        limited(["p"], ["c"], [{}])
    time.sleep(0.5)
    assert TimeLimited(slow, timeout_s=1.0, what="slow")(["p"], ["c"], [{}]) == [1.0]
    assert overlaps == [0, 0]  # the queued call was cancelled at its timeout; no two calls ever overlapped
