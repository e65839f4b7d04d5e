"""The ``streamrl`` command.

``streamrl run --config FILE [--generators N] [--scorers M] [--set key=value ...]``
validates the config, then starts every service as its own process from
``deploy/Procfile`` with honcho; when the learner finishes (or any process
dies) honcho stops the others. ``streamrl check --config FILE`` only validates.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from common.service import CONFIG_ENV, OVERRIDES_ENV

REPO = Path(__file__).resolve().parents[1]
PROCFILE = REPO / "deploy" / "Procfile"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="deploy/configs/default.toml", help="TOML run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set learner.total_steps=20")


def _load(args: argparse.Namespace):
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"streamrl: invalid config\n{err}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"{args.config}: OK ({config.run.name}, model {config.model.path}, "
          f"{config.learner.total_steps} steps, max_staleness {config.run.max_staleness})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    scorers = args.scorers if args.scorers is not None else len(config.endpoints.scorers)
    if scorers > len(config.endpoints.scorers):
        print(f"streamrl: --scorers {scorers} but endpoints.scorers lists {len(config.endpoints.scorers)}; "
              "fix: add one endpoint per scorer to the config", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env[CONFIG_ENV] = str(Path(args.config).resolve())
    env[OVERRIDES_ENV] = "\n".join(args.overrides)
    env["PYTHON"] = sys.executable
    env.setdefault("PYTHONUNBUFFERED", "1")
    command = [sys.executable, "-m", "honcho", "-f", str(PROCFILE), "-d", str(REPO), "start",
               "-c", f"generator={args.generators},scorer={scorers}"]
    print(f"streamrl: starting learner, buffer, {scorers} scorer(s) and {args.generators} generator(s); "
          f"output in {config.run.output_dir}", flush=True)
    return subprocess.call(command, env=env, cwd=REPO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrl", description="Streaming actor-learner RL for language models")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start all services (honcho) and train")
    _add_config_args(run)
    run.add_argument("--generators", type=int, default=2, help="rollout generator processes (default 2)")
    run.add_argument("--scorers", type=int, default=None, help="scorer processes (default: one per endpoint)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config and print every problem")
    _add_config_args(check)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
