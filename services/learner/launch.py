"""Starting the learner's ranks: :func:`relaunch_under_torchrun` turns ``python -m
streamrl.services.learner`` with ``learner.world_size = N > 1`` into ``torchrun
--nproc-per-node N``, and :func:`run_worker` is the entry point of ranks 1..N-1 (rank 0 is
the learner service, :class:`~streamrl.services.learner.loop.LearnerService`). The
data-parallel step itself is in :mod:`streamrl.services.learner.distributed`."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from streamrl.common.config import ConfigError, load_config
from streamrl.common.models import configure_torch, select_device
from streamrl.common.service import OVERRIDES_ENV, parse_args
from streamrl.services.learner.build import build_trainer
from streamrl.services.learner.checkpoint import latest_checkpoint
from streamrl.services.learner.distributed import init_distributed, weights_digest

log = logging.getLogger(__name__)


def torchrun_command(world_size: int, argv: list[str]) -> list[str]:
    """The ``torchrun`` command line that starts ``world_size`` learner ranks on this host
    (``--standalone``: a rendezvous on a free local port) with the same arguments."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        "-m",
        "streamrl.services.learner",
        *argv,
    ]


def relaunch_under_torchrun(argv: list[str]) -> None:
    """``python -m streamrl.services.learner`` with ``learner.world_size = N > 1``, not started by
    torchrun: replace this process with ``torchrun --standalone --nproc-per-node N`` (``os.execv``;
    same pid, so honcho, supervisord and Kubernetes signal torchrun, which forwards SIGTERM to
    the ranks: rank 0 checkpoints and stops the others). Every launcher (Procfile, supervisord,
    ``streamrl run``, a container command) therefore starts a one-host data-parallel learner
    unchanged; several hosts need ``torchrun --nnodes ... --rdzv-endpoint ...`` by hand.
    Returns (does nothing) for ``world_size = 1``, under torchrun, or with an invalid config
    (the service then reports it)."""
    if "WORLD_SIZE" in os.environ:
        return
    args = parse_args("learner", argv)
    overrides = [line for line in os.environ.get(OVERRIDES_ENV, "").splitlines() if line.strip()]
    try:
        world_size = load_config(args.config, overrides + args.overrides).learner.world_size
    except ConfigError:
        return
    if world_size > 1:
        command = torchrun_command(world_size, argv)
        print(f"learner.world_size = {world_size}: starting {' '.join(command)}", file=sys.stderr, flush=True)
        os.execv(command[0], command)


# --------------------------------------------------------------------------- ranks 1..N-1


def run_worker(argv: list[str] | None = None) -> None:
    """Entry point of a rank > 0 (``python -m streamrl.services.learner`` under torchrun): load the
    config, join the process group, build the trainer from the newest checkpoint (the output
    folder must be shared by all hosts of a multi-host learner) and train on rank 0's batches
    until it says stop. No sockets, metrics server, run lock or files. SIGTERM/SIGINT are
    ignored: torchrun forwards them to every rank, and rank 0 first checkpoints, then ends
    this rank with its stop broadcast (torchrun ends the job if rank 0 dies)."""
    args = parse_args("learner", argv)
    overrides = [line for line in os.environ.get(OVERRIDES_ENV, "").splitlines() if line.strip()]
    try:
        cfg = load_config(args.config, overrides + args.overrides)
    except ConfigError as err:
        raise SystemExit(f"streamrl learner rank {os.environ.get('RANK')}: invalid config\n{err}") from None
    rank = os.environ.get("RANK")
    logging.basicConfig(
        level=cfg.run.log_level, format=f"%(asctime)s learner-rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    lc = cfg.learner
    configure_torch(lc.threads, seed=cfg.run.seed)
    dist, device = init_distributed(lc, select_device(lc.device))
    if dist is None or dist.rank == 0:
        raise SystemExit("run_worker is for ranks 1..N-1 of a data-parallel learner (torchrun, world_size > 1)")
    resume = latest_checkpoint(Path(cfg.run.output_dir) / "checkpoints")
    trainer, _tokenizer, _state = build_trainer(cfg, device, resume, dist=dist)
    steps = trainer.serve()
    log.info("rank %d stopped after %d steps (weights digest %s)", dist.rank, steps, weights_digest(trainer))
    trainer.close()
