"""Reading a config: TOML, ``--set`` overrides, relative paths resolved against the file's
folder, validation into one :class:`~streamrl.common.config.base.ConfigError` listing every
problem (schema, cross-section and, when asked, resources)."""

from __future__ import annotations

import argparse
import copy
import difflib
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from streamrl.common.config.base import ConfigError, _extra, _section_type
from streamrl.common.config.checks import cross_problems
from streamrl.common.config.resources import resource_problems
from streamrl.common.config.schema import Config
from streamrl.common.user_code import make_importable


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    default: str | None = None,
    config_help: str | None = None,
    example: str = "learner.lr=1e-5",
) -> None:
    """Add the two arguments of every command that reads a run config: ``--config PATH`` (into
    ``args.config``, default ``default``) and ``--set KEY=VALUE`` (repeatable, into ``args.overrides``;
    :func:`load_config` applies them in order, each a TOML value: :func:`parse_override`);
    ``config_help`` defaults to naming ``default`` (None: the built-in defaults)."""
    if config_help is None:
        config_help = f"TOML run config (default: {default or 'built-in defaults'})"
    parser.add_argument("--config", default=default, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value (repeatable), e.g. --set {example}",
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value; fix: e.g. --set learner.lr=1e-5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``section.key=value`` override applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def validate_config(data: dict, source: str = "<config>", *, resources: Iterable[str] = ()) -> Config:
    """Validate a config mapping; with ``resources``, also check what those services need.

    Args:
        data: the config as TOML would parse it.
        source: where it came from (named in the message).
        resources: service names (:data:`SERVICES`) whose files, folders and imports
            :func:`resource_problems` checks; empty = the schema only (no file system, no imports).

    Raises:
        ConfigError: with one line per problem (key, rule, fix): schema, cross-section and
            resource problems together.
    """
    resources = tuple(resources)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # a default computed from other keys (run.output_dir from run.name) is not computed when one of
        # them is invalid; pydantic reports that too, but the invalid key's own error says it all
        errors = [err for err in exc.errors() if err["type"] != "default_factory_not_called"]
        lines = "\n".join(_describe(err, source) for err in errors).splitlines()
        best = _best_effort(data)
        if not any(err["loc"] == () for err in errors):  # cross checks did not run: run them
            lines += [f"  - {p}" for p in cross_problems(best)]
        if resources:  # of keys that are valid: a bad key's default stands in for it in `best`
            bad = tuple(_key(err["loc"]) for err in errors)
            lines += [
                f"  - {p}"
                for p in resource_problems(best, resources)
                if not p.split(":", 1)[0].startswith(bad) and not any(b.startswith(p.split(":", 1)[0]) for b in bad)
            ]
        raise ConfigError(f"{len(lines)} problem(s) in {source}:\n" + "\n".join(lines)) from None
    problems = resource_problems(config, resources) if resources else []
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def _best_effort(data: dict) -> Config:
    """A Config with every section that validates on its own, defaults for the others.

    In a list of sections (``scorer.rewards``) the items that validate are kept at their
    index and the others become None, so later checks still see (and number) the good ones.
    """
    sections: dict[str, Any] = {}
    for name, field in Config.model_fields.items():
        section = _section_type(field.annotation)
        if section is None:
            raise TypeError(f"Config.{name} is not a section")
        raw = data.get(name, {})
        raw = dict(raw) if isinstance(raw, dict) else {}
        try:
            sections[name] = section.model_validate(raw)
        except ValidationError as exc:  # keep the keys that are fine, drop the bad ones
            lists = {}
            for err in exc.errors():
                key = str(err["loc"][0]) if err["loc"] else ""
                sub = section.model_fields.get(key)
                item_type = _section_type(sub.annotation) if sub is not None else None
                if item_type is not None and isinstance(raw.get(key), list) and len(err["loc"]) > 1:
                    lists[key] = [_valid_or_none(item_type, item) for item in raw[key]]
                raw.pop(key, None)
            try:
                sections[name] = section.model_validate(raw).model_copy(update=lists)
            except ValidationError:
                sections[name] = section()
    return Config.model_construct(**sections)


def _valid_or_none(model: type[BaseModel], data: Any) -> BaseModel | None:
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def _is_local(value: str, base: Path) -> bool:
    return value.startswith((".", "/", "~")) or (base / value).exists()


def resolve_paths(data: Any, model: type[BaseModel], base: Path) -> Any:
    """Copy of config mapping ``data`` with every relative path field made absolute against ``base``.

    Fields are found by their schema marker (:data:`LOCAL_PATH`, :data:`MAYBE_LOCAL_PATH`),
    in nested sections and lists of sections; values of the wrong type are left for
    validation to report.
    """
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        value, marker = out[name], _extra(field).get("local_path")
        if marker and isinstance(value, str):
            if marker is True or _is_local(value, base):
                out[name] = str((base / Path(value).expanduser()).resolve())
            continue
        sub = _section_type(field.annotation)
        if sub is not None and isinstance(value, list):
            out[name] = [resolve_paths(v, sub, base) for v in value]
        elif sub is not None:
            out[name] = resolve_paths(value, sub, base)
    return out


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, resources: Iterable[str] = ()
) -> Config:
    """Read a TOML config (or defaults when ``path`` is None), apply overrides, validate.

    Relative paths written in the file resolve against the file's folder; those given in
    ``overrides`` (and defaults) against the current directory. The file's folder and the current
    directory are put first on ``sys.path`` (:func:`~streamrl.common.user_code.make_importable`), so a
    reward module there imports in every process. With ``resources`` (service
    names), the files, folders and imports those services need are checked too
    (:func:`resource_problems`): ``streamrl check`` passes all of :data:`SERVICES`, each
    service process its own name.

    Raises:
        ConfigError: unreadable TOML, any invalid value or missing resource; the message
            lists every problem.
    """
    make_importable(path)  # reward modules next to the config or in the current directory
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; fix: pass --config PATH") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        data = resolve_paths(data, Config, Path(path).resolve().parent)
    return validate_config(apply_overrides(data, overrides or []), source, resources=resources)


def _key(loc: tuple) -> str:
    """``("scorer", "rewards", 0, "function")`` -> ``scorer.rewards[0].function``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _describe(err: ErrorDetails, source: str) -> str:
    loc = _key(err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        known = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}"
        return f"  - {loc}: unknown key; fix: remove it from {source} ({hint})"
    if err["type"] == "config_rule":  # the message says rule and fix
        key = (err.get("ctx") or {}).get("key")
        return f"  - {loc}.{key}: {err['msg']}" if key else f"  - {loc}: {err['msg']}"
    msg = err["msg"].removeprefix("Value error, ")
    if "\n" in msg or msg.startswith(tuple(Config.model_fields)):
        return "\n".join(f"  - {line}" for line in msg.splitlines())
    where = f"set {loc} in {source}" + ("" if "[" in loc else f" or --set {loc}=VALUE")
    return f"  - {loc}: {msg} (got {err.get('input')!r}); fix: {where}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
        args = getattr(model, "__args__", ())
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
