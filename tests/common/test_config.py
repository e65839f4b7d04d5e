"""Tests for common/config.py: defaults, one ConfigError listing every problem (key,
rule, fix, spelling hints), cross checks, ``--set`` overrides, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamrl.common.config import (
    Config,
    ConfigError,
    LearnerSection,
    apply_overrides,
    load_config,
    parse_override,
    validate_config,
)
from streamrl.common.modes import AdvantageEstimator, Correction, Device, KLEstimator, KLPenaltyMode, OverflowPolicy
from streamrl.deploy import DEFAULT_PROMPTS

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(err: ConfigError) -> list[str]:
    """The ``  - ...`` lines of a ConfigError, after checking the header's count."""
    text = str(err)
    lines = [line for line in text.splitlines() if line.startswith("  - ")]
    header = re.match(r"(\d+) problem\(s\) in ", text)
    assert header, text
    assert int(header.group(1)) == len(lines), text
    return lines


def line_for(lines: list[str], key: str) -> str:
    hits = [line for line in lines if line.startswith(f"  - {key}:")]
    assert len(hits) == 1, (key, lines)
    return hits[0]


# --------------------------------------------------------------------------- defaults


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.run.max_staleness == 2 and cfg.run.seed == 0
    assert cfg.learner.lr == 1e-5
    assert cfg.learner.correction is Correction.DECOUPLED  # an Enum, not a free string
    assert cfg.learner.advantage is AdvantageEstimator.GRPO
    assert cfg.learner.kl_estimator is KLEstimator.K1
    assert cfg.learner.kl_penalty is KLPenaltyMode.REWARD
    assert cfg.learner.kl_target is None and cfg.learner.ptx_data is None
    assert cfg.buffer.overflow is OverflowPolicy.BLOCK
    assert cfg.generator.device is Device.AUTO
    assert (cfg.generator.group_size, cfg.generator.temperature, cfg.generator.top_p) == (4, 1.0, 1.0)
    assert Path(cfg.generator.prompts.path) == DEFAULT_PROMPTS and DEFAULT_PROMPTS.is_file()
    assert cfg.run.output_dir == "runs/streamrl"  # runs/<run.name>, in the current directory
    assert [r.function for r in cfg.scorer.rewards] == ["streamrl.services.scorer.rewards:vader_sentiment"]
    assert all(e.startswith("tcp://127.0.0.1:") for e in [*cfg.endpoints.scorers, cfg.endpoints.buffer])


def test_sections_are_independent_instances():
    a, b = load_config(None), load_config(None)
    a.endpoints.scorers.append("tcp://127.0.0.1:1")
    assert b.endpoints.scorers == ["tcp://127.0.0.1:5550"]


def test_valid_file_with_enum_strings(tmp_path):
    cfg = load_config(write(tmp_path, """
[run]
max_staleness = 0
[learner]
correction = "tis"
advantage = "rloo"
kl_estimator = "k3"
kl_penalty = "loss"
kl_target = 0.02
[generator]
group_size = 2
[generator.prompts]
kind = "csv"
path = "reviews.csv"
first_k_words = 5
[[scorer.rewards]]
function = "streamrl.services.scorer.rewards:count_char"
kwargs = { char = "e" }
weight = 0.5
"""))
    assert cfg.run.max_staleness == 0
    assert cfg.learner.correction is Correction.TIS
    assert cfg.learner.advantage is AdvantageEstimator.RLOO
    assert cfg.learner.kl_estimator is KLEstimator.K3
    assert cfg.learner.kl_penalty is KLPenaltyMode.LOSS
    assert cfg.learner.kl_target == 0.02
    assert cfg.generator.prompts.loader_options() == {"kind": "csv", "path": str(tmp_path / "reviews.csv"),
                                                      "column": "review", "first_k_words": 5}
    assert cfg.scorer.rewards[0].as_dict() == {"function": "streamrl.services.scorer.rewards:count_char",
                                               "weight": 0.5, "kwargs": {"char": "e"}}
    assert cfg.learner.lr == 1e-5  # untouched keys keep defaults


# --------------------------------------------------------------------------- one error, every problem


BAD = """
[run]
max_staleness = -1

[learner]
lrr = 3e-6
clip_eps = 1.5
correction = "decoupld"

[generator]
top_p = 0
temperature = 0.0

[generator.prompts]
pathh = "x.jsonl"

[bogus]
a = 1
"""


def test_every_problem_in_one_error(tmp_path):
    path = write(tmp_path, BAD)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert isinstance(info.value, ValueError)
    lines = problems(info.value)
    assert len(lines) == 8, lines
    assert str(info.value).startswith(f"8 problem(s) in {path}:")

    # unknown keys: named, with a spelling suggestion for near misses, known keys otherwise
    lrr = line_for(lines, "learner.lrr")
    assert "unknown key" in lrr and "did you mean `lr`?" in lrr and str(path) in lrr
    assert "did you mean `path`?" in line_for(lines, "generator.prompts.pathh")
    bogus = line_for(lines, "bogus")
    assert "unknown key" in bogus
    assert "known keys: buffer, endpoints, generator, learner, metrics, model, run, scorer, security, transport" in bogus

    # out-of-range values: the rule, the value given and how to fix it
    clip = line_for(lines, "learner.clip_eps")
    assert "less than 1" in clip and "(got 1.5)" in clip and "--set learner.clip_eps=VALUE" in clip
    assert "greater than or equal to 0" in line_for(lines, "run.max_staleness")
    assert "(got 0)" in line_for(lines, "generator.top_p")
    assert "greater than 0" in line_for(lines, "generator.temperature")

    # a bad enum lists the allowed values
    enum = line_for(lines, "learner.correction")
    assert "'none', 'tis' or 'decoupled'" in enum and "'decoupld'" in enum


def test_cross_checks_collected_together(tmp_path):
    path = write(tmp_path, """
[learner]
advantage = "rloo"
ptx_coef = 0.1
groups_per_step = 2
minibatches = 3
[generator]
group_size = 1
[buffer]
capacity_groups = 1
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = problems(info.value)
    assert len(lines) == 4, lines
    rloo = line_for(lines, "generator.group_size")
    assert "rloo needs groups of at least 2" in rloo and "fix:" in rloo
    ptx = line_for(lines, "learner.ptx_data")
    assert "ptx_coef > 0 needs an SFT data set" in ptx and "fix:" in ptx
    mb = line_for(lines, "learner.minibatches")
    assert "3 minibatches of a 2-rollout batch" in mb
    cap = [line for line in lines if line.startswith("  - buffer.capacity_groups: must hold one learner step")]
    assert len(cap) == 1 and "learner.groups_per_step (2)" in cap[0]


def test_cross_checks_pass_when_fixed(tmp_path):
    cfg = load_config(write(tmp_path, """
[learner]
advantage = "rloo"
ptx_coef = 0.1
[learner.ptx_data]
path = "sft.jsonl"
[generator]
group_size = 2
"""))
    assert cfg.learner.ptx_data.path == str(tmp_path / "sft.jsonl")
    assert cfg.learner.ptx_coef == 0.1


def test_reward_spec_needs_exactly_one_source(tmp_path):
    for body in ["weight = 2.0", 'function = "m:f"\nmodel = "rm/"']:
        path = write(tmp_path, f"[[scorer.rewards]]\n{body}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        line = line_for(problems(info.value), "scorer.rewards.0")
        assert "exactly one of `function`" in line


def test_validate_config_names_its_source():
    with pytest.raises(ConfigError, match=r"^1 problem\(s\) in my-source:"):
        validate_config({"learner": {"lr": 0}}, "my-source")


def test_learner_section_alone_validates():
    assert LearnerSection(correction="none").correction is Correction.NONE
    with pytest.raises(ValueError):
        LearnerSection(correction="bogus")
    with pytest.raises(ValueError):
        LearnerSection(lr=1e-5, nope=1)


# --------------------------------------------------------------------------- files


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist; fix: pass --config PATH"):
        load_config(missing)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[learner\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(path)


# --------------------------------------------------------------------------- overrides


def test_override_number_string_nested_enum_bool(tmp_path):
    path = write(tmp_path, '[run]\nname = "from-file"\n[learner]\nlr = 1e-4\n')
    cfg = load_config(path, [
        "learner.lr=3e-6",
        "run.name=my-run",                          # bare word: a string
        'model.path="models/tiny dir"',            # TOML string with a space
        "generator.prompts.path=data/x.jsonl",      # nested section, bare path
        "learner.correction=tis",                   # enum by value
        "learner.whiten_advantages=false",          # TOML bool
        "generator.group_size=8",                   # TOML int
        'endpoints.scorers=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]',
    ])
    assert cfg.learner.lr == 3e-6 and isinstance(cfg.learner.lr, float)
    assert cfg.run.name == "my-run"
    assert cfg.model.path == "models/tiny dir"
    assert cfg.generator.prompts.path == "data/x.jsonl"
    assert cfg.generator.prompts.kind == "jsonl"  # siblings of the nested key keep defaults
    assert cfg.learner.correction is Correction.TIS
    assert cfg.learner.whiten_advantages is False
    assert cfg.generator.group_size == 8
    assert cfg.endpoints.scorers == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]


def test_later_override_wins_and_input_is_not_mutated():
    data = {"learner": {"lr": 1e-4}}
    out = apply_overrides(data, ["learner.lr=1e-3", "learner.lr=2e-3"])
    assert out == {"learner": {"lr": 2e-3}}
    assert data == {"learner": {"lr": 1e-4}}


def test_parse_override():
    assert parse_override("learner.lr=3e-6") == (["learner", "lr"], 3e-6)
    assert parse_override(" run.name = a=b ") == (["run", "name"], "a=b")  # split at the first '='
    assert parse_override("generator.prompts.path=x.jsonl") == (["generator", "prompts", "path"], "x.jsonl")
    assert parse_override('run.name="7"') == (["run", "name"], "7")
    assert parse_override("run.seed=7") == (["run", "seed"], 7)


@pytest.mark.parametrize("text", ["learner.lr", "=3", "  =3", ""])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, [text])


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="name is not a section"):
        load_config(None, ["run.name=x", "run.name.y=1"])


def test_bad_override_values_are_reported_like_file_values():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["learner.lr=abc", "learner.lrr=1", "learner.correction=nope"])
    lines = problems(info.value)
    assert len(lines) == 3
    assert "(got 'abc')" in line_for(lines, "learner.lr")
    assert "did you mean `lr`?" in line_for(lines, "learner.lrr")
    assert "'nope'" in line_for(lines, "learner.correction")


# --------------------------------------------------------------------------- shipped configs


SHIPPED = sorted((REPO / "deploy" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # prompt files they name (relative to the repo root) exist
    prompts = cfg.generator.prompts
    if prompts.kind != "gsm8k" and not Path(prompts.path).is_absolute():
        assert (REPO / prompts.path).exists(), prompts.path


def test_cross_checks_reported_together_with_field_errors(tmp_path):
    # one message lists the unknown key, the range error AND the cross-section rule
    path = write(tmp_path, """
[learner]
lrr = 1
clip_eps = 3
advantage = "rloo"
[generator]
group_size = 1
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = problems(info.value)
    assert len(lines) == 3, lines
    assert "did you mean `lr`" in line_for(lines, "learner.lrr")
    assert "less than 1" in line_for(lines, "learner.clip_eps")
    assert "rloo needs groups of at least 2" in line_for(lines, "generator.group_size")


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    """Paths written in the file resolve against its folder; --set values against the current
    directory; hub ids and built-in model names are not paths."""
    conf = tmp_path / "conf"
    (conf / "models" / "policy").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf, """
[run]
output_dir = "out/run1"
[model]
path = "models/policy"
cache_dir = "../cache"
[generator.prompts]
path = "data/prompts.jsonl"
[[scorer.rewards]]
model = "./rm"
[buffer]
journal_dir = "journal"
""")
    cfg = load_config(path, ["learner.ptx_coef=0.1", 'learner.ptx_data.path="sft.jsonl"'])
    assert cfg.run.output_dir == str(conf / "out" / "run1")
    assert cfg.model.path == str(conf / "models" / "policy")
    assert cfg.model.cache_dir == str(tmp_path / "cache")
    assert cfg.generator.prompts.path == str(conf / "data" / "prompts.jsonl")
    assert cfg.scorer.rewards[0].model == str(conf / "rm")
    assert cfg.buffer.journal_dir == str(conf / "journal")
    assert cfg.learner.ptx_data.path == "sft.jsonl"  # an override: relative to the current directory
    for name in ("smollm2-135m-instruct", "tiny-char-llama", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert load_config(write(conf, f'[model]\npath = "{name}"\n')).model.path == name
    assert load_config(write(conf, '[model]\npath = "./missing"\n')).model.path == str(conf / "missing")
