"""Experiment trackers users already read, fed with the learner's per-step record.

Besides Prometheus and ``metrics.jsonl``, every run writes **TensorBoard** event files to
``<run.output_dir>/tensorboard`` (``tensorboard --logdir runs/``), and with
``tracking.wandb = true`` also logs to **Weights & Biases** (``tracking.wandb_mode =
"offline"`` by default: the run is written under ``<run.output_dir>/wandb`` with no network
and no account; ``wandb sync`` uploads it later). Both get the resolved config as the run's
hyperparameters (TensorBoard's HParams plugin and a ``config`` text; W&B's run config).

Every numeric value of the record is logged at ``global_step = step`` under a tag that groups
it in the UI: ``loss/policy`` stays, ``reward_mean`` becomes ``reward/mean``, ``kl`` is
``kl/per_token``; the grouping is :func:`tag`. A resumed learner opens the same TensorBoard
folder with ``purge_step`` = its step + 1, so steps rolled back since the last checkpoint are
dropped from the curves, and the same W&B run (its id is derived from the run folder).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from streamrl.common.config import Config

log = logging.getLogger(__name__)

__all__ = ["Tracker", "tag", "flat_hparams", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"
"""Folder of the event files under ``run.output_dir``."""

GROUPS = {
    "reward": "reward",
    "kl": "kl",
    "entropy": "policy",
    "clip": "policy",
    "approx_kl": "kl",
    "importance": "ratio",
    "truncated": "ratio",
    "ess": "ratio",
    "outside_nucleus": "ratio",
    "grad_norm": "optim",
    "lr": "optim",
    "samples_per_second": "throughput",
    "tokens": "throughput",
    "wait_data_s": "time",
    "train_s": "time",
    "publish_s": "time",
    "staleness": "staleness",
    "dropped_stale": "buffer",
    "evicted": "buffer",
    "buffered_groups": "buffer",
    "generators_in_batch": "throughput",
    "value": "value",
    "advantage": "advantage",
    "return": "value",
    "ptx": "loss",
    "dual_clip": "policy",
}
"""First word(s) of a record key -> its TensorBoard section."""
RENAMES = {"kl": "kl/per_token", "reward_mean": "reward/mean", "kl_coef": "kl/coef"}
"""Keys whose tag is not the grouping rule's."""
SKIP = ("step", "version", "time")
"""Record keys that are not curves (``step`` is the x axis)."""


def tag(key: str) -> str:
    """The TensorBoard tag of a record key: ``loss/policy`` as is, ``clip_fraction`` ->
    ``policy/clip_fraction``, ``kl`` -> ``kl/per_token``; unknown keys go to ``other/``."""
    if "/" in key:
        return key
    if key in RENAMES:
        return RENAMES[key]
    for prefix, group in sorted(GROUPS.items(), key=lambda item: -len(item[0])):
        if key.startswith(prefix):
            return f"{group}/{key}"
    return f"other/{key}"


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"learner.lr": 1e-05, ...}``: the config flattened to scalar values (lists as strings, None
    as ``"unset"``), the form TensorBoard's HParams plugin and W&B's config filters take."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = "unset" if value is None else str(value)
    return out


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[tag(key)] = float(value)
    return out


class Tracker:
    """TensorBoard (always) and W&B (when enabled) for one learner.

    Args:
        output_dir: the run folder (``run.output_dir``).
        hparams: the resolved config as nested plain data (``Config.model_dump(mode="json")``).
        start_step: the learner's step at start (0, or the resumed checkpoint's).
        run_name: ``run.name`` (the W&B run name).
        wandb: log to W&B too.
        wandb_mode, wandb_project, wandb_entity: ``tracking.*`` of the config.

    Raises:
        ImportError: ``wandb`` is True but the package is not installed (``streamrl check`` says so first).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        hparams: Mapping[str, Any],
        start_step: int = 0,
        run_name: str = "streamrl",
        wandb: bool = False,
        wandb_mode: Literal["offline", "online"] = "offline",
        wandb_project: str = "streamrl",
        wandb_entity: str | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.output_dir = Path(output_dir)
        flat = flat_hparams(hparams)
        # resumed at step k: the events of steps after k (trained, then rolled back) are dropped
        self.writer = SummaryWriter(
            log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
        )
        if start_step == 0:  # hyperparameters once per run (a resumed run keeps its first ones)
            experiment, start, end = hparams_summary(flat, {"reward/mean": 0.0}, hparam_domain_discrete=None)
            for summary in (experiment, start, end):
                # torch types file_writer by its first value, None; SummaryWriter sets it in __init__
                self.writer.file_writer.add_summary(summary)  # type: ignore[attr-defined]
            self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in sorted(flat.items())), 0)
        self.run = None
        if wandb:
            import wandb as wandb_lib

            run_id = "streamrl-" + hashlib.sha256(str(self.output_dir.resolve()).encode()).hexdigest()[:12]
            self.run = wandb_lib.init(
                project=wandb_project,
                entity=wandb_entity,
                name=run_name,
                id=run_id,
                resume="allow",
                mode=wandb_mode,
                dir=str(self.output_dir),
                config=dict(hparams),
                reinit="create_new",
                settings=wandb_lib.Settings(silent=True),
            )
            log.info("W&B run %s (%s mode) in %s", run_id, wandb_mode, self.output_dir / "wandb")

    @classmethod
    def for_run(cls, cfg: Config, start_step: int) -> Tracker:
        """The learner's tracker: ``run.output_dir``, the resolved config as hyperparameters, ``tracking.*``."""
        t = cfg.tracking
        return cls(
            cfg.run.output_dir,
            hparams=cfg.applicable(),
            start_step=start_step,
            run_name=cfg.run.name,
            wandb=t.wandb,
            wandb_mode=t.wandb_mode,
            wandb_project=t.wandb_project,
            wandb_entity=t.wandb_entity,
        )

    def log(self, record: Mapping[str, Any]) -> None:
        """Log every finite numeric value of a ``metrics.jsonl`` record at its ``step``."""
        step = int(record["step"])
        scalars = _scalars(record)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        if self.run is not None:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the event file and finish the W&B run."""
        self.writer.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
