"""What every config section shares: the section base class (unknown keys refused, options
that apply to one mode only), the errors, the field markers of paths, and a field's type
in words (for the reference table and for error messages)."""

from __future__ import annotations

import types
import typing
from enum import Enum
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, model_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

STRICT_ARGS = ConfigDict(strict=True, arbitrary_types_allowed=True)
"""Config of ``pydantic.validate_call`` on library functions whose argument rules are
declared as types: strict (no bool for an int, no string for a number)."""


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with rule and fix."""


LOCAL_PATH: JsonDict = {"local_path": True}
"""Schema marker of a field holding a file or folder path: a relative path written in a
config file resolves against that file's folder (``--set`` values and defaults: the
current directory)."""
MAYBE_LOCAL_PATH: JsonDict = {"local_path": "maybe"}
"""Schema marker of a field that is a local path or a name (hub id, built-in model):
resolved like ``LOCAL_PATH`` when it starts with ``.``, ``/`` or ``~`` or names an
existing file or folder next to the config file."""


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _rule(message: str, key: str | None = None) -> PydanticCustomError:
    """A validation error whose message already says the rule and the fix (no braces in it).

    ``key`` names the offending key inside the section that raises it; the reported key is
    the section's location plus ``key``.
    """
    return PydanticCustomError("config_rule", message, {"key": key} if key else None)


def _bf16_setting(value: Any) -> Any:
    if value == "auto" or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _rule(
        f'{value!r} is not a bf16 setting; fix: true, false or "auto" (bf16 where the device computes it natively)'
    )


BF16Setting = Annotated[bool | Literal["auto"], BeforeValidator(_bf16_setting)]
"""``true``, ``false`` or ``"auto"`` (bf16 where the device computes it natively:
:func:`streamrl.common.models.use_bf16_autocast`)."""


class ResourceError(ValueError):
    """A config value names a file, folder or function that is missing or unusable.

    ``str(error)`` says the rule and the fix; ``key`` is the offending key relative to
    its section (``"function"``, ``"kwargs"``, ``"kwargs.char"``).
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _options_apply(self) -> _Section:
        """Keys marked ``applies_to={selector: value}`` (or a list of values) may only be set when
        ``selector`` has that value (one of them)."""
        for name in type(self).model_fields:
            applies = _extra(type(self).model_fields[name]).get("applies_to")
            if not applies or name not in self.model_fields_set:
                continue
            ((selector, wanted),) = applies.items()
            wanted = wanted if isinstance(wanted, list) else [wanted]
            actual = getattr(self, selector, None)
            if actual is not None and actual not in wanted:
                choices = " or ".join(f'"{w}"' for w in wanted)
                raise _rule(
                    f"`{name}` applies only when {selector} is {choices} (here {selector} is "
                    f'"{actual}"); fix: remove `{name}` or set {selector} = "{wanted[0]}"',
                    name,
                )
        return self

    def applicable(self) -> dict[str, Any]:
        """This section as plain data to write back as TOML: every value (defaults filled in) except
        unset optional keys and options that do not apply here (``applies_to``: ``batch_size`` of a
        reward function, ``split`` of a jsonl prompt file), which a config may not set. Loading the
        result gives this section again (``<run.output_dir>/config.toml``)."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            applies = _extra(field).get("applies_to")
            if applies:
                ((selector, wanted),) = applies.items()
                if getattr(self, selector, None) not in (wanted if isinstance(wanted, list) else [wanted]):
                    continue
            if value is None:
                continue
            if isinstance(value, _Section):
                value = value.applicable()
            elif isinstance(value, list) and value and isinstance(value[0], _Section):
                value = [v.applicable() for v in value]
            else:
                value = TypeAdapter(Any).dump_python(value, mode="json")
            out[name] = value
        return out


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _toml(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _type_text(annotation: Any, field: FieldInfo | None = None) -> str:
    """``annotation`` (and the field's constraints) in words: ``int >= 1``, ``"a", "b"``, ``path``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        return _type_text(inner) + _bounds(
            [
                m
                for group in metadata
                for m in (group if isinstance(group, annotated_types.GroupedMetadata) else [group])
            ]
        )
    if origin is Literal:
        return ", ".join(_toml(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args) if len(args) > 1 else _type_text(args[0], field)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict or annotation is dict:
        return "table"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return ", ".join(_toml(m.value) for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    marker = _extra(field).get("local_path") if field is not None else None
    if marker:
        return "path" if marker is True else "path or name"
    base = {bool: "bool", int: "int", float: "float", str: "string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )
    return base + _bounds(field.metadata if field is not None else [])


def _bounds(metadata: list) -> str:
    shortest = next((m.min_length for m in metadata if isinstance(m, annotated_types.MinLen)), None)
    longest = next((m.max_length for m in metadata if isinstance(m, annotated_types.MaxLen)), None)
    if shortest is not None and shortest == longest:
        return f" of length {shortest}"
    if shortest == 1 and longest is None:
        return ", not empty"
    if shortest is not None or longest is not None:
        return " of length " + " and ".join(
            text for text in (shortest and f"at least {shortest}", longest and f"at most {longest}") if text
        )
    low = high = None
    for m in metadata:
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt)):
            low = ("[" if isinstance(m, annotated_types.Ge) else "(", getattr(m, "ge", getattr(m, "gt", None)))
        if isinstance(m, (annotated_types.Le, annotated_types.Lt)):
            high = ("]" if isinstance(m, annotated_types.Le) else ")", getattr(m, "le", getattr(m, "lt", None)))
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""
