"""The README is what a newcomer reads in the first ten minutes: short, the commands CI and users
run, the data-and-reward section the site shares; the site's config reference documents every key."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from streamrl.common.config import Config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
REFERENCE = (REPO / "docs" / "config.md").read_text()


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [
            a
            for a in (annotation, *getattr(annotation, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        same_keys_as_generator_prompts = name == "ptx_data" or f"{prefix}{name}" == "eval.prompts"
        if nested and not prefix.startswith("scorer") and name != "rewards" and not same_keys_as_generator_prompts:
            keys += config_keys(nested[0], f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def documented(key: str) -> bool:
    if f"`{key}`" in REFERENCE:
        return True
    head, _, last = key.rpartition(".")
    section = head.split(".")[0]
    return any(line.startswith(f"| `{section}.") and f"`{last}`" in line for line in REFERENCE.splitlines())


def test_every_config_key_is_in_the_reference():
    missing = [k for k in config_keys(Config) if not documented(k)]
    assert not missing, f"config keys missing from docs/config.md: {missing}"


def test_readme_names_the_commands_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README and "make run" in README
    for target in ("make tiny", "make test-fast", "make lint", "make docs"):
        assert target in README, target
        makefile = (REPO / "Makefile").read_text()
        assert f"\n{target.split()[1]}:" in makefile, f"README names {target}, which the Makefile lacks"


def test_readme_is_short_and_starts_with_what_a_newcomer_needs():
    lines = README.splitlines()
    assert len(lines) <= 400, f"README.md has {len(lines)} lines; move the detail to docs/ (at most 400)"
    heads = [line for line in lines if line.startswith("## ")]
    assert heads[:4] == ["## Quick start", "## The default job", "## Your own data and reward", "## Tests"], heads
    before_data = README[: README.index("## Your own data and reward")]
    tables = [line for line in before_data.splitlines() if line.startswith("|")]
    assert not tables, f"measured-results tables belong on docs/benchmarks.md, not before the data section: {tables}"
    assert "### Your own reward function" in README and "def score(prompts: list[str]" in README


def test_the_site_includes_the_readme_sections_it_shares():
    for section, page in (("intro", "index.md"), ("data-and-reward", "data-and-reward.md")):
        assert README.count(f"<!-- --8<-- [start:{section}] -->") == 1
        assert README.count(f"<!-- --8<-- [end:{section}] -->") == 1
        assert f'--8<-- "README.md:{section}"' in (REPO / "docs" / page).read_text()
