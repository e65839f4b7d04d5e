"""A data-parallel learner on ``torch.distributed`` (``learner.world_size`` ranks).

Start: ``torchrun --nproc-per-node N -m streamrl.services.learner --config FILE`` with
``learner.world_size = N`` (gloo on CPU, NCCL on CUDA with one GPU per rank,
``cuda:<LOCAL_RANK>``). Rank 0 is the learner service (sockets, batch requests, ledger,
checkpoints, ``metrics.jsonl``, Prometheus, weight publishing); ranks 1..N-1 run
:func:`~streamrl.services.learner.launch.run_worker`: no sockets, no files, they build the same trainer from the same
checkpoint and train on what rank 0 broadcasts.

One learner step on N ranks:

1. rank 0 collates the batch (human terms applied) and broadcasts it, tensor by tensor
   (:func:`broadcast_batch`; no pickle), with the version it trains at;
2. every rank computes the step's targets over the *whole* batch: pi_old, reference
   log-probs, reward normalisation, advantages (group baselines are per group over the
   whole batch, GAE whitening over the whole batch). This no-grad pass is replicated,
   not sharded: it costs one forward of the batch per rank, and in exchange every rank
   holds the same advantages, running reward statistics and KL controller without any
   further communication;
3. the minibatch order is rank 0's (broadcast); each minibatch's rows are dealt to the
   ranks (``rows[rank::N]``) and each rank runs forward and backward on its shard
   through :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the
   gradients (all-reduce overlapped with the backward pass);
4. every rank clips (the averaged gradients, hence the same norm) and steps its own
   AdamW: the weights stay identical on every rank without further broadcasts.

The loss normalisation rule (why N ranks give the single-rank step). Each aggregation
(:func:`~streamrl.services.learner.losses.aggregate_tokens`) is ``S / D``: a sum ``S``
of per-token or per-sequence terms over the minibatch divided by a normaliser ``D``
(``token_mean``: real tokens; ``sequence_mean``: sequences with at least one token;
``fixed_length_sum``: sequences x the generation budget). A rank's shard has
``S_r / D_r`` with ``sum_r S_r = S`` and ``sum_r D_r = D``. DDP averages gradients,
so each rank backpropagates ``N * (D_r / D) * (S_r / D_r) = N * S_r / D``, and the
average over ranks is ``sum_r S_r / D = S / D``: the gradient of the whole minibatch's
loss, exactly (up to float summation order), even when the shards hold different token
counts (the naive mean of per-shard means is not: it weighs a shard's tokens by
``1 / D_r``). ``D`` is one scalar all-reduce per update. A term that is the same on every
rank (the PPO-ptx loss: every rank draws the same pretraining minibatch) is scaled by
``N * D_r / D`` too, and those factors average to exactly 1. The one exception is the KL
loss term (``kl_penalty = "loss"``) under ``top_p < 1``, whose tokens outside pi_old's
nucleus leave its normaliser: there the shards are weighted by their real tokens.

Diagnostics: statistics of the whole batch (reward, KL, staleness, tokens) are the same
on every rank; per-update statistics of the shards (losses, clip fraction, ratios) are
averaged over ranks (maxima and minima reduced as such); ``grad_norm`` is of the
averaged gradient.

FSDP is not used: DDP replicates the model on each rank, which fits every model this
project trains (up to SmolLM2-135M). A model that does not fit one device would need
FSDP (``torch.distributed.fsdp.fully_shard``) here and a gathered state dict for
publishing and checkpoints; that is not built.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from streamrl.common.config import LearnerSection
from streamrl.common.messages import SamplingParams
from streamrl.common.modes import LossAggregation
from streamrl.services.learner.batch import TRAIN_BATCH_DTYPES, ModelOutput, TrainBatch, forward_completions
from streamrl.services.learner.trainer import PPOTrainer

log = logging.getLogger(__name__)

STOP, STEP = 0, 1
# TrainBatch fields in broadcast order; the optional ones are flagged in the header
_FIELDS = [f.name for f in fields(TrainBatch) if f.name != "sampling"]
_ROW_FIELDS = {"scores", "group_ids", "versions", "weights", "advantage_bonus"}  # [B]
_OPTIONAL = ("weights", "ref_logprobs", "advantage_bonus")  # sent only when the header flags them
_PROMPT_FIELDS = {"input_ids", "attention_mask"}  # [B, L]; the others are [B, T]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel learner.

    Attributes:
        rank: 0..world_size-1 (``RANK``); rank 0 is the learner service.
        world_size: number of ranks (``WORLD_SIZE`` = ``learner.world_size``).
        local_rank: index on this host (``LOCAL_RANK``): the CUDA device of the rank.
        device: the rank's device (``cuda:<local_rank>`` or ``cpu``).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
        return self.device


def init_distributed(lc: LearnerSection, device: torch.device) -> tuple[DistContext | None, torch.device]:
    """Join the process group when ``learner.world_size > 1``; returns ``(context, device)``.

    ``device`` is the learner's selected device; on CUDA each rank takes ``cuda:<LOCAL_RANK>``.
    The backend is NCCL on CUDA, gloo on CPU. The collective timeout is
    ``learner.batch_timeout_s + 600`` s: the other ranks wait in a broadcast while rank 0
    waits for data, checkpoints and publishes.

    Raises:
        ValueError: ``world_size > 1`` but the process was not started by ``torchrun`` (no
            ``WORLD_SIZE``), or ``WORLD_SIZE`` differs from ``learner.world_size``; CUDA with
            fewer GPUs than ranks on this host.
    """
    env_world = os.environ.get("WORLD_SIZE")
    if lc.world_size == 1:
        if env_world not in (None, "1"):
            raise ValueError(
                f"started by torchrun with WORLD_SIZE={env_world} but learner.world_size = 1; "
                f"fix: set learner.world_size = {env_world}, or start the learner without torchrun"
            )
        return None, device
    if env_world is None:
        raise ValueError(
            f"learner.world_size = {lc.world_size} needs one process per rank; fix: start the learner "
            f"with `torchrun --nproc-per-node {lc.world_size} -m streamrl.services.learner ...` "
            "(the Procfile's learner-dp entry), or set learner.world_size = 1"
        )
    if int(env_world) != lc.world_size:
        raise ValueError(
            f"torchrun started WORLD_SIZE={env_world} ranks but learner.world_size = {lc.world_size}; "
            f"fix: make them equal (torchrun --nproc-per-node {lc.world_size})"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank {rank} (local rank {local_rank}) has no GPU: {torch.cuda.device_count()} visible; "
                "fix: one GPU per rank (torchrun --nproc-per-node <= the GPU count) or device = 'cpu'"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=lc.batch_timeout_s + 600)
        )
    ctx = DistContext(rank=rank, world_size=lc.world_size, local_rank=local_rank, device=device)
    log.info("data-parallel learner: rank %d of %d on %s (%s)", rank, lc.world_size, device, torch_dist.get_backend())
    return ctx, device


# --------------------------------------------------------------------------- the batch on the wire between ranks


def broadcast_batch(
    dist: DistContext, batch: TrainBatch | None, version: int = 0, op: int = STEP
) -> tuple[int, TrainBatch | None, int]:
    """Rank 0 sends ``(op, batch, version)`` to every rank; the others pass ``None`` and receive it.

    A fixed header (``[op, version, B, L, T]`` then one present-flag per optional field
    (``weights``, ``ref_logprobs``, ``advantage_bonus``), int64, and the
    sampling parameters float64), then each tensor of the batch in :class:`TrainBatch`
    field order (plain tensor broadcasts: nothing is pickled).

    Returns:
        ``(op, batch, version)``; ``batch`` is None for ``op = STOP``. The received batch is
        on ``dist.device``.
    """
    dev = dist.comm_device
    header = torch.zeros(5 + len(_OPTIONAL), dtype=torch.int64, device=dev)
    sampling = torch.zeros(3, dtype=torch.float64, device=dev)
    if dist.rank == 0:
        if batch is not None:
            header.copy_(
                torch.tensor(
                    [
                        op,
                        version,
                        batch.size,
                        batch.input_ids.shape[1],
                        batch.mask.shape[1],
                        *(getattr(batch, name) is not None for name in _OPTIONAL),
                    ]
                )
            )
            s = batch.sampling
            sampling.copy_(torch.tensor([s.temperature, s.top_p, s.max_new_tokens], dtype=torch.float64))
        else:
            header[0] = op
    torch_dist.broadcast(header, 0)
    torch_dist.broadcast(sampling, 0)
    op, version, b, width, t, *present = header.tolist()
    absent = {name for name, flag in zip(_OPTIONAL, present) if not flag}
    if op == STOP:
        return STOP, None, version
    tensors = {}
    for name in _FIELDS:
        if name in absent:
            continue
        shape = (b,) if name in _ROW_FIELDS else (b, width) if name in _PROMPT_FIELDS else (b, t)
        if dist.rank == 0:
            tensor = getattr(batch, name).to(dev, TRAIN_BATCH_DTYPES[name]).contiguous()
        else:
            tensor = torch.empty(shape, dtype=TRAIN_BATCH_DTYPES[name], device=dev)
        torch_dist.broadcast(tensor, 0)
        tensors[name] = tensor
    temperature, top_p, max_new_tokens = sampling.tolist()
    return (
        STEP,
        TrainBatch(
            **tensors, sampling=SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=int(max_new_tokens))
        ),
        version,
    )


# --------------------------------------------------------------------------- the trainer


class _Trained(torch.nn.Module):
    """Everything with trained parameters (policy, value head, critic) as one module for DDP;
    its forward is the trainer's minibatch forward pass."""

    def __init__(self, trainer: PPOTrainer):
        super().__init__()
        self.policy = trainer.policy
        self.value_head = trainer.value_head
        self.value_model = trainer.value_model

    def forward(self, mb: TrainBatch) -> ModelOutput:
        out = forward_completions(self.policy, mb, value_head=self.value_head, with_entropy=True)
        if self.value_model is not None:
            out.values = self.value_model(mb)
        return out


def weights_digest(trainer: PPOTrainer) -> str:
    """A float64 sum and sum of squares of every trained parameter (policy, value head, critic), as
    text: equal on every rank exactly when the replicas stayed identical (the logs show it)."""
    with torch.no_grad():
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        total = sum(float(p.double().sum()) for p in params)
        squares = sum(float(p.double().square().sum()) for p in params)
    return f"{total!r}/{squares!r}"


def loss_normaliser(mask: Tensor, aggregation: LossAggregation) -> Tensor:
    """``D`` of :func:`~streamrl.services.learner.losses.aggregate_tokens` on ``mask`` ``[B, T]``
    without the constant ``max_tokens`` (float64 0-d): real tokens (``token_mean``), sequences
    with a real token (``sequence_mean``), sequences (``fixed_length_sum``)."""
    m = mask > 0
    mode = LossAggregation(aggregation)
    if mode is LossAggregation.TOKEN_MEAN:
        d = m.sum()
    elif mode is LossAggregation.SEQUENCE_MEAN:
        d = m.any(dim=1).sum()
    else:
        d = torch.tensor(m.shape[0], device=m.device)
    return d.to(torch.float64)


class DistributedPPOTrainer(PPOTrainer):
    """:class:`PPOTrainer` on one rank of a data-parallel learner (module docstring: the step,
    the loss normalisation rule).

    Rank 0 calls :meth:`step` as the single-rank trainer's (it broadcasts the batch first);
    the other ranks call :meth:`serve`. Rank 0 calls :meth:`close` when training ends.

    Args:
        policy, reference, cfg, ptx_sampler, value_model: as :class:`PPOTrainer`, on ``dist.device``.
        dist: this rank's :class:`DistContext`.
    """

    def __init__(self, policy, reference, cfg: LearnerSection, dist: DistContext, **kwargs):
        super().__init__(policy, reference, cfg, **kwargs)
        self.dist = dist
        # DDP broadcasts rank 0's parameters and buffers here: every rank starts identical
        # (buffers, e.g. rotary tables, never change: no per-forward sync; the init sync stays)
        no_sync: dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        self.ddp: DistributedDataParallel | None = DistributedDataParallel(_Trained(self), device_ids=None, **no_sync)
        self._closed = False

    def step(self, batch: TrainBatch, current_version: int) -> dict[str, float]:
        """One learner step on every rank (rank 0: ``batch`` is the whole batch, broadcast here)."""
        if self.dist.rank == 0:
            broadcast_batch(self.dist, batch, current_version)
        return self._reduce_stats(super().step(batch, current_version))

    def serve(self) -> int:
        """Ranks 1..N-1: train on each batch rank 0 broadcasts until it says stop; returns the steps trained."""
        steps = 0
        while True:
            op, batch, version = broadcast_batch(self.dist, None)
            if op == STOP:
                return steps
            assert batch is not None  # every other op carries a batch
            self._reduce_stats(super().step(batch, version))
            steps += 1

    def close(self, *, end: bool = True) -> None:
        """Rank 0: tell the other ranks to stop (once; a rank that already left is logged, not raised).
        ``end``: then release DDP and leave the process group (every rank; a process that exits
        with DDP's reducer alive can hang in gloo's threads)."""
        if self.dist.rank == 0 and not self._closed:
            self._closed = True
            log.info("rank 0 stops the other ranks (weights digest %s)", weights_digest(self))
            try:
                broadcast_batch(self.dist, None, op=STOP)
            except (RuntimeError, torch_dist.DistBackendError) as err:  # a rank died: torchrun ends the job
                log.warning("could not tell the other learner ranks to stop: %s", err)
        if end and torch_dist.is_initialized():
            self.ddp = None
            gc.collect()
            torch_dist.destroy_process_group()

    def _order(self, batch: TrainBatch) -> list[Tensor]:
        """Rank 0's minibatches (broadcast), each dealt to the ranks: this rank's rows ``rows[rank::N]``.

        Raises:
            ValueError: a minibatch with fewer rows than ranks (a rank would have nothing to train).
        """
        full = super()._order(batch)
        sizes = [len(rows) for rows in full]
        if min(sizes) < self.dist.world_size:
            raise ValueError(
                f"a minibatch of {min(sizes)} rows cannot be shared by learner.world_size = "
                f"{self.dist.world_size} ranks; fix: more groups per step (learner.groups_per_step) or "
                "fewer learner.minibatches, so that every minibatch has at least one row per rank"
            )
        flat = torch.cat(full).to(self.dist.comm_device)
        torch_dist.broadcast(flat, 0)
        flat = flat.to(self.device)
        return [rows[self.dist.rank :: self.dist.world_size] for rows in flat.split(sizes)]

    def _forward(self, mb: TrainBatch) -> ModelOutput:
        if self.ddp is None:
            raise RuntimeError("the distributed trainer was closed: it cannot train any more")
        return self.ddp(mb)

    def _backward(self, loss: Tensor, mb: TrainBatch) -> None:
        """Backpropagate ``N * (D_r / D) * loss`` (module docstring: the normalisation rule)."""
        local = loss_normaliser(mb.mask, self.cfg.loss_aggregation)
        total = local.detach().clone().to(self.dist.comm_device)
        torch_dist.all_reduce(total)
        total = total.to(local.device)
        factor = torch.where(total > 0, self.dist.world_size * local / total.clamp(min=1), 1.0)
        (loss * factor.to(loss.dtype)).backward()

    def _reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-rank statistics -> the mean over ranks (``*_max``: max, ``*_min``: min); same keys on every rank."""
        keys = sorted(stats)
        groups = {"max": [k for k in keys if k.endswith("_max")], "min": [k for k in keys if k.endswith("_min")]}
        groups["mean"] = [k for k in keys if k not in groups["max"] and k not in groups["min"]]
        ops = {"mean": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
        out = dict(stats)
        for kind, names in groups.items():
            if not names:
                continue
            values = torch.tensor([stats[k] for k in names], dtype=torch.float64, device=self.dist.comm_device)
            torch_dist.all_reduce(values, op=ops[kind])
            if kind == "mean":
                values /= self.dist.world_size
            out.update(zip(names, values.tolist()))
        return out


def make_trainer(policy, reference, cfg: LearnerSection, dist: DistContext | None, **kwargs) -> PPOTrainer:
    """The trainer of one learner rank: a :class:`PPOTrainer` for a single-rank learner (``dist``
    None), a :class:`DistributedPPOTrainer` for a rank of a data-parallel one.

    Args:
        policy, reference, cfg: as :class:`PPOTrainer`.
        dist: this rank's :class:`DistContext` (:func:`init_distributed`), or None.
        kwargs: ``ptx_sampler``, ``value_model``: as :class:`PPOTrainer`.
    """
    if dist is None:
        return PPOTrainer(policy, reference, cfg, **kwargs)
    return DistributedPPOTrainer(policy, reference, cfg, dist, **kwargs)
