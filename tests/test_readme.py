"""The README documents every config key and the commands CI and users run."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from streamrl.common.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
        same_keys_as_generator_prompts = name == "ptx_data" or f"{prefix}{name}" == "eval.prompts"
        if nested and not prefix.startswith("scorer") and name != "rewards" and not same_keys_as_generator_prompts:
            keys += config_keys(nested[0], f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def documented(key: str) -> bool:
    if f"`{key}`" in README:
        return True
    head, _, last = key.rpartition(".")
    section = head.split(".")[0]
    return any(line.startswith(f"| `{section}.") and f"`{last}`" in line for line in README.splitlines())


def test_every_config_key_is_in_the_reference():
    missing = [k for k in config_keys(Config) if not documented(k)]
    assert not missing, f"undocumented config keys: {missing}"


def test_readme_names_the_commands_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README and "make run" in README
