"""The config reference table (docs/config.md), generated from the schema's field descriptions
(``python -m streamrl.common.config [--update docs/config.md]``)."""

from __future__ import annotations

import sys
import typing
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from streamrl.common.config.base import _extra, _section_type, _toml, _type_text
from streamrl.common.config.schema import Config

REFERENCE_BEGIN = (
    "<!-- config-reference: generated from the schema by `python -m streamrl.common.config`; do not edit -->"
)
REFERENCE_END = "<!-- end config-reference -->"


def reference_table() -> str:
    """The config reference of docs/config.md: one markdown row per key, from the schema.

    Columns: key, default, allowed values (type and constraints), meaning (the field's
    ``description``, plus the option it applies to). Defaults that are computed render as
    the field's ``default_text``.
    """
    lines = ["| key | default | values | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {default} | {values} | {meaning} |" for key, default, values, meaning in _rows(Config, "")]
    return "\n".join(lines) + "\n"


def _rows(model: type[BaseModel], prefix: str) -> Iterable[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        nested = field.default_factory is sub  # a section of its own (not a list of them, not optional)
        if sub is not None and nested:  # its keys
            yield from _rows(sub, f"{key}.")
            continue
        yield key, _cell(_default_text(field)), _cell(_type_text(field.annotation, field)), _cell(_meaning(field))
        if sub is not None and typing.get_origin(field.annotation) is list:
            yield from _rows(sub, f"{key}[i].")
        elif sub is not None and _extra(field).get("list_keys"):  # an optional section whose keys are its own
            yield from _rows(sub, f"{key}.")


def _meaning(field: FieldInfo) -> str:
    text = field.description or ""
    applies = _extra(field).get("applies_to")
    if applies:
        ((selector, values),) = applies.items()
        values = values if isinstance(values, list) else [values]
        text += (
            f" ({', '.join(values)} only)"
            if selector == "source"
            else f" ({selector} = " + " or ".join(f'"{v}"' for v in values) + " only)"
        )
    return text


def _default_text(field: FieldInfo) -> str:
    extra = _extra(field)
    if "default_text" in extra:
        return extra["default_text"]
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{_toml(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def replace_reference(readme: str) -> str:
    """``readme`` with the text between :data:`REFERENCE_BEGIN` and :data:`REFERENCE_END` regenerated.

    Raises:
        ValueError: the markers are missing.
    """
    start, end = readme.find(REFERENCE_BEGIN), readme.find(REFERENCE_END)
    if start < 0 or end < start:
        raise ValueError(f"no config reference markers ({REFERENCE_BEGIN} ... {REFERENCE_END})")
    return readme[: start + len(REFERENCE_BEGIN)] + "\n\n" + reference_table() + "\n" + readme[end:]


def _main(argv: list[str]) -> int:
    """``python -m streamrl.common.config [--update docs/config.md]``: print the table, or rewrite it in place."""
    if argv[:1] == ["--update"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(replace_reference(path.read_text()))
        print(f"{path}: config reference regenerated")
        return 0
    if argv:
        print("usage: python -m streamrl.common.config [--update docs/config.md]", file=sys.stderr)
        return 2
    print(reference_table(), end="")
    return 0
