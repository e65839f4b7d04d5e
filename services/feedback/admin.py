"""Labellers and label export, from the command line (works while the service runs: SQLite WAL).

    python -m streamrl.services.feedback.admin --config run.toml labeller add alice   # prints alice's token once
    python -m streamrl.services.feedback.admin --config run.toml labeller revoke alice
    python -m streamrl.services.feedback.admin --config run.toml labeller list
    python -m streamrl.services.feedback.admin --config run.toml export --layout preferences --out prefs.jsonl

The ``preferences`` export is a ``prompt``/``chosen``/``rejected`` JSON-lines file that
``streamrl rm`` trains on (``[rm.data] path = "prefs.jsonl"``); see
:meth:`~streamrl.services.feedback.store.LabelStore.export`.
"""

from __future__ import annotations

import argparse
import json
import sys

from streamrl.common.config import ConfigError, add_config_arguments, load_config
from streamrl.services.feedback.store import LabelStore


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad config or arguments)."""
    parser = argparse.ArgumentParser(
        prog="python -m streamrl.services.feedback.admin",
        description="labellers' tokens and label export of the feedback service",
    )
    add_config_arguments(parser, config_help="TOML run config (its feedback.database; default: built-in defaults)")
    commands = parser.add_subparsers(dest="command", required=True)
    labeller = commands.add_parser("labeller", help="add, revoke or list labellers")
    labeller.add_argument("action", choices=["add", "revoke", "list"])
    labeller.add_argument("name", nargs="?")
    export = commands.add_parser("export", help="write the labels as a data set")
    export.add_argument("--layout", choices=["preferences", "ratings"], default="preferences")
    export.add_argument("--out", default="-", help="output file (default: standard output)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"invalid config\n{err}", file=sys.stderr)
        return 2
    store = LabelStore(config.feedback.database_path(config.run.output_dir))
    try:
        if args.command == "labeller":
            if args.action == "list":
                print("\n".join(store.labellers()))
                return 0
            if not args.name:
                parser.error(f"labeller {args.action} needs a NAME")
            if args.action == "add":
                try:
                    token = store.add_labeller(args.name)
                except ValueError as err:
                    print(err, file=sys.stderr)
                    return 2
                print(token)
                print(
                    f"labeller {args.name} added; give them this token (it is not stored and cannot be shown again)",
                    file=sys.stderr,
                )
                return 0
            if not store.revoke_labeller(args.name):
                print(f"no labeller {args.name!r}", file=sys.stderr)
                return 2
            print(f"labeller {args.name} revoked (their labels stay)", file=sys.stderr)
            return 0
        out = sys.stdout if args.out == "-" else open(args.out, "w")
        try:
            rows = 0
            for row in store.export(args.layout):
                out.write(json.dumps(row) + "\n")
                rows += 1
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"{rows} {args.layout} rows", file=sys.stderr)
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())
