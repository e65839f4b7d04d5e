"""``streamrl check`` reports every problem that would stop a service, each with its key
and fix (exit status 2), and the services refuse the same config at start-up with the
same messages: a missing model folder, a missing prompt file, an unknown reward
function, an unexpected reward kwarg, a missing reward-model folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamrl.cli import main
from streamrl.common.models import save_tiny_model
from streamrl.common.service import OVERRIDES_ENV, start_service


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config folder with a real tiny policy, a prompt file and a reward-model folder."""
    root = tmp_path_factory.mktemp("check")
    save_tiny_model(root / "model")
    save_tiny_model(root / "rm")  # a saved model folder: what the check asks of a reward model
    (root / "prompts.jsonl").write_text('{"text": "The film was"}\n{"text": "I left the cinema"}\n')
    return root


GOOD = {
    "model": 'path = "model"',
    "prompts": 'path = "prompts.jsonl"',
    "function": 'function = "count_char"\nkwargs = { char = "e" }',
    "reward_model": 'model = "rm"',
}


def write(folder: Path, name: str, extra: str = "", **changes: str) -> Path:
    """A config next to the fixtures (relative paths resolve against its folder) with ``changes``."""
    parts = {**GOOD, **changes}
    path = folder / f"{name}.toml"
    path.write_text(f"""
[run]
output_dir = "out-{name}"
[model]
{parts["model"]}
[generator.prompts]
{parts["prompts"]}
[[scorer.rewards]]
{parts["function"]}
[[scorer.rewards]]
{parts["reward_model"]}
weight = 0.5
{extra}""")
    return path


def check(path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, list[str]]:
    """Run ``streamrl check``: (exit status, stdout, problem lines of stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    lines = [line[4:] for line in err.splitlines() if line.startswith("  - ")]
    if lines:
        header = re.search(r"^(\d+) problem\(s\) in ", err, re.MULTILINE)
        assert header and int(header.group(1)) == len(lines), err
        assert err.startswith("streamrl: invalid config\n")
    return exit_info.value.code, out, lines


def test_a_good_config_passes(folder: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(folder, "good")
    code, out, lines = check(path, capsys)
    assert (code, lines) == (0, [])
    assert out.startswith(f"{path}: OK (")


CASES = {
    "missing_model_folder": (
        {"model": 'path = "./no-such-model"'},
        "model.path: model folder not found: {folder}/no-such-model; fix: set model.path to a Hugging Face model "
        "folder (relative paths resolve against the config file's folder), a hub id or a built-in name: "
        "smollm2-135m-instruct, tiny-char-llama",
    ),
    "missing_prompt_file": (
        {"prompts": 'path = "no-such-prompts.jsonl"'},
        "generator.prompts.path: prompt file not found: {folder}/no-such-prompts.jsonl; fix: set "
        "generator.prompts.path to an existing prompt file (relative paths resolve against the config file's folder)",
    ),
    "unknown_reward_function": (
        {"function": 'function = "streamrl.services.scorer.rewards:no_such_reward"'},
        "scorer.rewards[0].function: cannot import streamrl.services.scorer.rewards:no_such_reward: cannot import "
        "name 'no_such_reward' from 'streamrl.services.scorer.rewards'",
    ),
    "unexpected_reward_kwarg": (
        {"function": 'function = "count_char"\nkwargs = { character = "e" }'},
        "scorer.rewards[0].kwargs: streamrl.services.scorer.rewards:count_char cannot be called as fn(prompts, "
        "completions, metadata, **{{'character': 'e'}}): got an unexpected keyword argument 'character'; "
        "fix: use only char, max_count",
    ),
    "missing_reward_model_folder": (
        {"reward_model": 'model = "no-such-rm"'},
        "scorer.rewards[1].model: reward-model folder not found: {folder}/no-such-rm; fix: set scorer.rewards[1].model "
        "to a folder saved by save_pretrained (sequence-classification model and tokenizer); relative paths resolve "
        "against the config file's folder",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_refuses_each_case_with_key_and_fix(case: str, folder: Path, capsys: pytest.CaptureFixture) -> None:
    changes, expected = CASES[case]
    code, out, lines = check(write(folder, case, **changes), capsys)
    assert (code, out) == (2, "")
    assert len(lines) == 1, lines
    if case == "unknown_reward_function":  # the rest of the line: the fix, with the built-in names
        assert lines[0].startswith(expected) and "; fix: set it to an importable `package.module:function`" in lines[0]
        assert lines[0].endswith("vader_sentiment, gsm8k_exact_match, count_char")
    else:
        assert lines[0] == expected.format(folder=folder)


def test_check_lists_all_five_at_once_and_services_refuse_with_the_same_lines(
    folder: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes = {key: value for changes, _ in CASES.values() for key, value in changes.items()}
    changes["function"] = CASES["unknown_reward_function"][0]["function"]
    extra = '[[scorer.rewards]]\nname = "second"\n' + CASES["unexpected_reward_kwarg"][0]["function"]
    path = write(folder, "all", extra, **changes)
    code, _, lines = check(path, capsys)
    assert code == 2
    assert [line.split(":")[0] for line in lines] == [
        "model.path",
        "generator.prompts.path",
        "scorer.rewards[0].function",
        "scorer.rewards[1].model",
        "scorer.rewards[2].kwargs",
    ]
    assert all("; fix: " in line for line in lines)

    # each service checks what it needs, with the code and the words of `streamrl check`
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    needs = {
        "generator": ["model.path", "generator.prompts.path"],
        "learner": ["model.path"],
        "scorer": ["scorer.rewards[0].function", "scorer.rewards[1].model", "scorer.rewards[2].kwargs"],
        "buffer": [],
    }
    for service, keys in needs.items():
        wanted = [line for line in lines if line.split(":")[0] in keys]
        if not wanted:
            continue  # nothing stops it (starting it would bind sockets: not here)
        with pytest.raises(SystemExit) as exit_info:
            start_service(service, ["--config", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith(f"streamrl {service}: invalid config\n{len(wanted)} problem(s) in {path}:\n")
        assert [line[4:] for line in err.splitlines() if line.startswith("  - ")] == wanted


def test_chat_prompts_need_a_model_with_a_chat_template(
    folder: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chat prompts (``messages_field``) and a tokenizer without a chat template: refused by ``streamrl check``
    and by the generator at start-up with the fix (the generator used to die on its first batch)."""
    (folder / "chats.jsonl").write_text('{"id": "c1", "messages": [{"role": "user", "content": "Say hello"}]}\n')
    chats = 'path = "chats.jsonl"\nmessages_field = "messages"'
    path = write(folder, "chats", prompts=chats)
    code, out, lines = check(path, capsys)
    assert (code, out) == (2, "")
    expected = (
        'generator.prompts.messages_field: the prompts are chats (messages_field = "messages") but the '
        f"tokenizer of model.path ({folder}/model) has no chat template to render them; fix: set model.path "
        "to a chat model (its tokenizer_config.json has a chat_template, e.g. smollm2-135m-instruct), or give "
        "the prompts as text (generator.prompts.text_field instead of messages_field)"
    )
    assert lines == [expected]
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        start_service("generator", ["--config", str(path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.endswith(f"  - {expected}\n")

    # the learner's PPO-ptx data as chats: the learner's line
    ptx = write(folder, "ptx-chats", "[learner]\nptx_coef = 0.1\n[learner.ptx_data]\n" + chats)
    code, _, lines = check(ptx, capsys)
    assert code == 2 and [line.split(":")[0] for line in lines] == ["learner.ptx_data.messages_field"]

    # the same chats with a model whose tokenizer has a chat template
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(folder / "model", folder / "chat-model", dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / "chat-model")
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tokenizer.save_pretrained(folder / "chat-model")
    code, out, lines = check(write(folder, "chats-ok", prompts=chats, model='path = "chat-model"'), capsys)
    assert (code, lines) == (0, []) and ": OK (" in out


@pytest.mark.parametrize(
    ("lr", "lora", "hinted"),
    [
        ("5e-5", "[learner.lora]\nrank = 4", True),
        ("1e-4", "[learner.lora]\nrank = 4", False),  # the bound itself: no hint
        ("3e-4", "[learner.lora]\nrank = 8", False),
        ("5e-5", "", False),  # the whole model at a low learning rate: as it should be
    ],
    ids=["lora_at_5e-5", "lora_at_1e-4", "lora_at_3e-4", "whole_model_at_5e-5"],
)
def test_check_hints_at_a_low_lora_learning_rate_and_still_passes(
    folder: Path, capsys: pytest.CaptureFixture, lr: str, lora: str, hinted: bool
) -> None:
    """LoRA with learner.lr < 1e-4: one hint on stderr naming the key, the rank and 3e-4 (docs/lora.md);
    the check still passes (exit 0)."""
    path = write(folder, f"lora-{lr}-{bool(lora)}", f"[learner]\nlr = {lr}\n{lora}")
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--no-probe", "--config", str(path)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0 and out.startswith(f"{path}: OK ("), (out, err)
    hints = [line for line in err.splitlines() if line.startswith("streamrl: hint: ")]
    expected = (
        f"streamrl: hint: learner.lr: {float(lr):g} is low for LoRA adapters (learner.lora.rank = 4): on the "
        "default job rank 4 at lr 1e-4 barely moved in 60 steps; suggestion: start LoRA at learner.lr = 3e-4 "
        "(docs/lora.md)"
    )
    assert hints == ([expected] if hinted else []), err
