"""The ``streamrl`` command.

``streamrl run --config FILE [--generators N] [--scorers M] [--resume | --fresh] [--free-ports] [--set key=value ...]``
validates the config, refuses a ``run.output_dir`` that already holds a run unless told to
``--resume`` or start ``--fresh`` (:mod:`streamrl.runs`), records the launch there, then starts every
service as its own process from the Procfile that ships in the package (``streamrl.deploy``) with honcho's process
manager (:mod:`streamrl.launcher`), in the current directory; when the learner
finishes (or any process dies, or ``streamrl run`` gets SIGTERM/SIGINT) every
service is stopped and waited for; with ``--eval`` the initial and final policies are scored
on held-out prompts, and a summary (JSON) and learning curve (PNG) are written to
the run's output folder (:func:`streamrl.training.run`). ``streamrl eval`` scores one checkpoint; ``streamrl sft`` and
``streamrl rm`` run the offline RLHF stages and ``streamrl pipeline`` all of them then PPO
(:mod:`streamrl.pipeline`);
``streamrl check --config FILE`` only validates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from streamrl import __version__
from streamrl.common.config import SERVICES, ConfigError, add_config_arguments, cross_hints, load_config
from streamrl.common.service import exit_now
from streamrl.deploy import DEFAULT_CONFIG


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        default=str(DEFAULT_CONFIG),
        config_help="TOML run config (default: the packaged default job, streamrl.deploy/configs/default.toml)",
        example="learner.total_steps=20",
    )


def _add_probe_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="do not send each HTTP reward server (scorer.rewards[].url) one request first",
    )


def _load(args: argparse.Namespace, resources=()):
    """The validated config; with ``resources`` (service names) also what those services need."""
    try:
        return load_config(args.config, args.overrides, resources=resources)
    except ConfigError as err:
        print(f"streamrl: invalid config\n{err}", file=sys.stderr)
        raise SystemExit(2) from None


def _probe_rewards(args: argparse.Namespace, config) -> bool:
    """Send each HTTP reward server one request (unless ``--no-probe``); False, with every failure
    printed (key, what happened, fix), when one could not answer."""
    if args.no_probe:
        return True
    from streamrl.services.scorer.http_reward import probe_report

    report = probe_report(config.scorer.rewards)
    if report is not None:
        print(f"streamrl: {report}", file=sys.stderr)
    return report is None


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and what every service needs from it (files, folders, imports, devices),
    and send each HTTP reward server one request (``--no-probe`` skips it).

    The same checks each service runs at start-up; exit status 2 with every problem listed
    (key, rule, fix) when any fails. Settings that are valid but measured to work poorly are printed
    as ``streamrl: hint: ...`` lines on stderr (:func:`~streamrl.common.config.cross_hints`); they do
    not change the exit status.
    """
    from streamrl.ports import ports_at_defaults, run_ports, taken_ports

    config = _load(args, SERVICES)
    if not _probe_rewards(args, config):
        return 2
    print(
        f"{args.config}: OK ({config.run.name}, model {config.model.path}, "
        f"{config.learner.total_steps} steps, max_staleness {config.run.max_staleness})"
    )
    for hint in cross_hints(config):  # valid, measured to work poorly: said, not refused
        print(f"streamrl: hint: {hint}", file=sys.stderr)
    taken = taken_ports(run_ports(config, 1, len(config.endpoints.scorers)))
    if taken:
        then = (
            "`streamrl run` will pick free ones, as the config leaves every port at its default"
            if ports_at_defaults(config)
            else "fix: set these keys to free ports, or run with `streamrl run --free-ports`"
        )
        print(
            f"streamrl: note: ports in use on this machine now (another run?): {', '.join(map(str, taken))}; {then}",
            file=sys.stderr,
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score one model folder on held-out prompts and print reward +- stderr, KL and samples."""
    from streamrl.common.models import resolve_model_path
    from streamrl.evaluation import evaluate
    from streamrl.training import EvalOptions

    config = _load(args, ("generator", "scorer"))  # the model, the prompts and the rewards
    path = args.checkpoint or resolve_model_path(config.model.path, config.model.cache_path)
    result = evaluate(config, path, **EvalOptions(args.limit, args.seed, args.samples).resolve(config))
    print(f"{path}: {result.line()}")
    for sample in result.samples:
        print(f"  [{sample['reward']:+.3f}] {sample['prompt']!r} -> {sample['completion']!r}")
    if args.output:
        Path(args.output).write_text(json.dumps(result.as_dict(), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint as an adapter folder (LoRA) and a merged Hugging Face model (streamrl/export.py)."""
    from streamrl.common.models import resolve_model_path
    from streamrl.export import export_model

    config = _load(args)
    written = export_model(
        args.checkpoint, args.output, base=resolve_model_path(config.model.path, config.model.cache_path)
    )
    for kind, folder in written.items():
        print(f"{kind}: {folder}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Validate, optionally evaluate the initial policy, run all services under honcho, then report
    (:func:`streamrl.training.run`)."""
    from streamrl.common.errors import StartupRefused
    from streamrl.runs import JournalRewards, RunMode, RunRefused
    from streamrl.training import EvalOptions, run

    mode = RunMode.RESUME if args.resume else RunMode.FRESH if args.fresh else RunMode.NEW
    evaluation = EvalOptions(args.eval_prompts, args.eval_seed, args.eval_samples) if args.eval else None
    try:
        result = run(
            args.config,
            args.overrides,
            mode=mode,
            generators=args.generators,
            scorers=args.scorers,
            stop_timeout_s=args.stop_timeout,
            evaluation=evaluation,
            free_ports=args.free_ports,
            journal_rewards=JournalRewards(args.journal_rewards),
            probe_rewards=not args.no_probe,
        )
    except ConfigError as err:
        print(f"streamrl: invalid config\n{err}", file=sys.stderr)
        return 2
    except (RunRefused, StartupRefused) as err:
        print(f"streamrl: {err}", file=sys.stderr)
        return 2
    return result.exit_code


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--generator-hosts",
        metavar="HOST[:N],...",
        help="generators run on these hosts, N on "
        "each (ports generator_port + 0..N-1), instead of --generators on this machine",
    )


def _config_targets(args: argparse.Namespace, config):
    """The metrics endpoints of ``config`` (``--generators`` here, or ``--generator-hosts``); None after a
    usage error."""
    from streamrl.status import parse_hosts, targets

    try:
        hosts = parse_hosts(args.generator_hosts) if args.generator_hosts else None
    except ValueError as err:
        print(f"streamrl: --generator-hosts {err}", file=sys.stderr)
        return None
    generators = args.generators
    if generators is None:  # streamrl status: the generators actually running here
        from streamrl.status import discover_generators

        generators = discover_generators(config) if hosts is None else 0
    return targets(config, generators, hosts)


def cmd_targets(args: argparse.Namespace) -> int:
    """Write the run's metrics endpoints as a Prometheus file_sd file (``deploy/targets/*.json``)."""
    from streamrl.status import file_sd

    ts = _config_targets(args, _load(args))
    if ts is None:
        return 2
    text = json.dumps(file_sd(ts), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"{args.output}: {len(ts)} targets", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print (or with --watch keep refreshing) the status table of a running job."""
    from streamrl.status import ScrapeHistory, kubernetes_targets, read_file_sd, render

    config = _load(args)
    history = ScrapeHistory()  # --watch: rates span a learner step across refreshes
    while True:  # the targets are read again at each refresh: pods and hosts come and go
        try:
            if args.kubernetes:
                ts = kubernetes_targets(args.kubernetes, args.namespace)
            elif args.targets:
                ts = read_file_sd(args.targets)
            else:
                ts = _config_targets(args, config)
        except (OSError, ValueError) as err:
            print(f"streamrl: {err}", file=sys.stderr)
            return 2
        if ts is None:
            return 2
        table = render(config, args.generators, args.interval, ts, history)
        if not args.watch:
            print(table)
            return 0
        print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + f"{config.run.name}\n" + table, flush=True)


def cmd_keys(args: argparse.Namespace) -> int:
    """``keys generate``: server and client CURVE key pairs and the allow-list; ``keys authorize``: add a client."""
    from streamrl.common.security import SecurityError, authorize, generate_keys

    try:
        if args.keys_command == "generate":
            written = generate_keys(args.dir, args.clients, force=args.force)
        else:
            written = [authorize(args.dir, args.public_key, name=args.name)]
    except SecurityError as err:
        print(f"streamrl keys: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{args.dir}: every key already exists")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """``sft`` / ``rm``: run one offline training stage of the RLHF pipeline from its config section."""
    from streamrl.stages.finetune import StageError

    config = _load(args)
    if args.command == "sft":
        from streamrl.stages.sft import run_sft as run_stage
    else:
        from streamrl.stages.reward_model import run_rm as run_stage
    try:
        summary = run_stage(config, force=args.force, log=lambda line: print(line, flush=True))
    except StageError as err:
        print(f"streamrl {args.command}: {err}", file=sys.stderr)
        return 2
    print(f"summary: {Path(summary['output_dir']) / 'summary.json'}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """``pipeline``: SFT -> reward models -> held-out evaluation -> streaming PPO -> evaluation, resumable."""
    from streamrl.pipeline import PipelineError, run_pipeline

    try:
        run_pipeline(
            args.config,
            args.overrides,
            force=args.force,
            generators=args.generators,
            log=lambda line: print(line, flush=True),
        )
    except PipelineError as err:
        print(f"streamrl pipeline: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``streamrl`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="streamrl", description="Streaming actor-learner RL for language models")
    parser.add_argument("--version", action="version", version=f"streamrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start all services (honcho) and train")
    _add_config_args(run)
    run.add_argument(
        "--generators",
        type=int,
        default=1,
        help="rollout generator processes (default 1: on 2 cores the learner and one generator each own a core)",
    )
    run.add_argument("--scorers", type=int, default=None, help="scorer processes (default: one per endpoint)")
    _add_probe_arg(run)
    run.add_argument(
        "--stop-timeout",
        type=float,
        default=60.0,
        help="seconds each service gets to exit after SIGTERM (the learner writes its final "
        "checkpoint) before it is killed (default 60)",
    )
    run.add_argument(
        "--free-ports",
        action="store_true",
        help="bind every endpoint and metrics port of this run on a free loopback port (a second run "
        "on one machine); automatic when the config sets no port and a default one is taken",
    )
    rerun = run.add_mutually_exclusive_group()
    rerun.add_argument(
        "--resume",
        action="store_true",
        help="continue the run already in run.output_dir (newest checkpoint, buffer journal)",
    )
    rerun.add_argument(
        "--fresh",
        action="store_true",
        help="start over: the files of a run already in run.output_dir move to <output_dir>/previous/<time>/",
    )
    run.add_argument(
        "--journal-rewards",
        choices=("keep", "rescore", "drop"),
        default="keep",
        help="with --resume, when scorer.rewards changed since the last launch: train on the "
        "journaled rollouts as scored (keep, the default, with a warning naming the changed "
        "keys), score them again with the new reward (rescore), or move the journal to "
        "previous/ (drop)",
    )
    run.add_argument(
        "--eval", action="store_true", help="evaluate the initial and final policy on held-out prompts and print both"
    )
    run.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts to use (default: eval.limit)")
    run.add_argument("--eval-seed", type=int, default=None, help="sampling seed of the evaluation (default: eval.seed)")
    run.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="completions per held-out prompt (default: eval.samples_per_prompt)",
    )
    run.set_defaults(func=cmd_run)
    ev = sub.add_parser("eval", help="score a checkpoint on held-out prompts (reward +- stderr, KL)")
    _add_config_args(ev)
    ev.add_argument("--checkpoint", help="model or LoRA adapter folder (default: the config's initial model)")
    ev.add_argument("--limit", type=int, default=None, help="held-out prompts to use (default: eval.limit)")
    ev.add_argument("--seed", type=int, default=None, help="sampling seed (default: eval.seed)")
    ev.add_argument(
        "--samples", type=int, default=None, help="completions per prompt (default: eval.samples_per_prompt)"
    )
    ev.add_argument("--output", help="write the result as JSON here")
    ev.set_defaults(func=cmd_eval)
    export = sub.add_parser(
        "export", help="write a checkpoint as <output>/merged (Hugging Face model) and, for LoRA, <output>/adapter"
    )
    _add_config_args(export)
    export.add_argument("--checkpoint", required=True, help="checkpoint folder (step-NNNNNN) or its model/")
    export.add_argument("--output", required=True, help="folder to write adapter/ and merged/ into")
    export.set_defaults(func=cmd_export)
    check = sub.add_parser("check", help="validate a config and print every problem")
    _add_config_args(check)
    _add_probe_arg(check)
    check.set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="one table of every service's state, read from their metrics")
    _add_config_args(status)
    status.add_argument(
        "--generators",
        type=int,
        default=None,
        help="generator replicas to look for (default: those whose metrics ports answer here)",
    )
    status.add_argument(
        "--interval",
        type=float,
        default=None,
        help="seconds between scrapes (default: one learner step for the first table, 2 s between "
        "--watch refreshes); rates always span at least one learner step",
    )
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    _add_target_args(status)
    status.add_argument(
        "--targets", help="read the targets from this Prometheus file_sd file (JSON or YAML) instead of the config"
    )
    status.add_argument(
        "--kubernetes",
        metavar="API_URL",
        help="read the pods of --namespace through the "
        "Kubernetes API at this URL (`kubectl proxy` serves http://127.0.0.1:8001)",
    )
    status.add_argument("--namespace", default="streamrl", help="Kubernetes namespace (default streamrl)")
    status.set_defaults(func=cmd_status)
    sd = sub.add_parser("targets", help="write the run's metrics endpoints as a Prometheus file_sd file")
    _add_config_args(sd)
    sd.add_argument("--generators", type=int, default=4, help="generators on this machine (default 4)")
    _add_target_args(sd)
    sd.add_argument(
        "--output",
        "-o",
        help="file to write (default: standard output); Prometheus reads "
        "deploy/targets/*.json next to deploy/prometheus.yml",
    )
    sd.set_defaults(func=cmd_targets)
    keys = sub.add_parser("keys", help="CURVE keys for security.keys_dir (authentication and encryption)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser(
        "generate", help="server key pair, one client pair per name, allow-list (existing keys are kept)"
    )
    generate.add_argument("--dir", required=True, help="keys folder (security.keys_dir)")
    generate.add_argument(
        "--clients",
        nargs="*",
        default=["generator", "scorer", "buffer", "learner"],
        help="client key pairs to make (default: one per service)",
    )
    generate.add_argument(
        "--force", action="store_true", help="replace the server key pair (every host then needs the new server.key)"
    )
    add = keys_sub.add_parser("authorize", help="add a client's public .key file to DIR/authorized")
    add.add_argument("--dir", required=True, help="keys folder (security.keys_dir)")
    add.add_argument("public_key", help="the client's public .key file")
    add.add_argument("--name", help="name in the allow-list (default: the file's stem)")
    keys.set_defaults(func=cmd_keys)
    for name, text in (
        ("sft", "supervised fine-tuning on demonstrations ([sft]): the policy and reference for PPO"),
        ("rm", "train a reward model on ranked responses ([rm]) for the scorer"),
    ):
        stage = sub.add_parser(name, help=text)
        _add_config_args(stage)
        stage.add_argument("--force", action="store_true", help="train again even if the output folder is complete")
        stage.set_defaults(func=cmd_stage)
    pipeline = sub.add_parser(
        "pipeline",
        help="the whole RLHF pipeline: sft -> rm (proxy, gold) -> PPO against the "
        "proxy -> held-out evaluation before/after; complete stages are skipped",
    )
    _add_config_args(pipeline)
    pipeline.add_argument(
        "--force",
        action="store_true",
        help="run every stage again (the PPO run starts over; its previous files move to <output_dir>/previous/)",
    )
    pipeline.add_argument(
        "--generators", type=int, default=1, help="rollout generator processes of the PPO run (default 1)"
    )
    pipeline.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console entry point: parse arguments, run the subcommand, exit with its status.

    ``streamrl run`` from the command line (``argv`` None) ends its process at once when the run is
    over and its summary written (:func:`~streamrl.common.service.exit_now`): the config's checks
    imported torch and transformers, and the interpreter's finalisation of them took seconds on a
    loaded machine, between the learner's ``learner finished`` and the run's exit.
    """
    args = build_parser().parse_args(argv)
    code = args.func(args)  # the libraries' progress bars stay on (downloads, conversion, evaluation)
    if argv is None and args.func is cmd_run:
        exit_now(code)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
