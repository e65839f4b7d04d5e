"""Process files, default configs and prompts that ship inside the package (``streamrl.deploy``).

The folder is ``deploy/`` in the repository; the wheel installs it as package data
so that ``streamrl run`` finds its Procfile and the default prompts from any directory.
"""

from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
"""This folder: ``Procfile``, ``supervisord.conf``, ``prometheus.yml``, ``configs/``, ``prompts/``, ``grafana/``."""
PROCFILE = DEPLOY / "Procfile"
DEFAULT_PROMPTS = DEPLOY / "prompts" / "review_openings.jsonl"
DEFAULT_CONFIG = DEPLOY / "configs" / "default.toml"
