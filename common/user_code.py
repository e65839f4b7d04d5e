"""Where a user's own modules (reward functions ``module:function``) are imported from.

A reward module written next to the config file, or in the folder ``streamrl`` is launched
from, must import in ``streamrl check`` and in every service process alike, as a script's
folder is importable for ``python script.py`` and the current directory for ``uvicorn main:app``.
The ``streamrl`` console script puts its own ``bin/`` folder first on ``sys.path`` instead, and a
service may run in another directory than the config (supervisord, Kubernetes), so
:func:`make_importable` puts both folders first on ``sys.path`` (the config file's folder
first); :func:`load_config <streamrl.common.config.load_config>` calls it, so every process that
reads a config does. Folders on ``PYTHONPATH`` stay importable as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

IMPORT_FOLDERS: list[Path] = []
"""The folders :func:`make_importable` added in this process, in the order they are searched."""


def user_code_folders(config_path: str | Path | None) -> list[Path]:
    """The folders a user's modules are imported from: the config file's folder (when a file is
    given), then the current directory; absolute, without repeats."""
    folders = [Path(config_path).resolve().parent] if config_path is not None else []
    folders.append(Path.cwd().resolve())
    return list(dict.fromkeys(folders))


def make_importable(config_path: str | Path | None) -> list[Path]:
    """Put :func:`user_code_folders` first on ``sys.path`` (those already on it move to the front).

    Returns:
        The folders, in the order they are now searched.
    """
    folders = user_code_folders(config_path)
    for folder in reversed(folders):
        entry = str(folder)
        sys.path[:] = [entry] + [p for p in sys.path if _resolved(p) != entry]
    IMPORT_FOLDERS[:] = folders
    return folders


def _resolved(entry: str) -> str:
    try:
        return str(Path(entry).resolve()) if entry else entry
    except OSError:
        return entry


def missing_module_fix(module: str) -> str:
    """The fix for ``No module named <module>``: where to put it so every service imports it."""
    top = module.split(".")[0]
    where = " or ".join(str(f) for f in IMPORT_FOLDERS) or "the config file's folder or the current directory"
    return (
        f"fix: put {top}.py (or a package folder {top}/) in {where} (the config file's folder and the directory "
        f"streamrl runs from are importable), or add its folder to PYTHONPATH"
    )
