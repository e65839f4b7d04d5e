"""Training plumbing shared by ``streamrl sft`` and ``streamrl rm``.

- :class:`Trunk`: the transformer body of a causal LM or a sequence classifier with its
  lower blocks optionally frozen. Frozen blocks (and the embeddings) do not change during
  training, so with ``cache = True`` their output for every training and held-out text is
  computed once, and each step runs only the trainable top blocks: on a CPU the cost of an
  epoch falls roughly by the fraction of blocks frozen. The cached and the full path give
  the same hidden states (tested).
- :func:`length_batches`: length bucketing (batches of similar length, less padding).
- :func:`make_schedule`: warm-up then cosine/linear decay (``transformers.get_scheduler``).
- :func:`stage_folder`: write a stage's output into a temporary sibling and move it into
  place only when complete, so a stage whose folder exists (marker ``COMPLETE``) is done and
  is skipped when run again (resumable pipelines).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from streamrl.common.lora import apply_lora
from streamrl.common.models import adamw

__all__ = [
    "COMPLETE",
    "Stage",
    "StageError",
    "Trunk",
    "length_batches",
    "load_stage_data",
    "make_schedule",
    "optimise",
    "stage_done",
    "stage_folder",
    "weights_fingerprint",
]

COMPLETE = "COMPLETE"


class StageError(ValueError):
    """A stage cannot run as configured; the message names the key and the fix."""


class Trunk:
    """The body (``model.base_model``) of a decoder model, its lower blocks frozen.

    Args:
        model: a Hugging Face causal LM or sequence classifier whose body has ``layers``
            (the decoder blocks) and ``norm`` (the final norm), as Llama, Qwen and Mistral do.
        trainable_layers: the top blocks trained; the embeddings and every block below them
            are frozen. None = train everything (nothing frozen, nothing cached).
        cache: keep the frozen part's output per text (by token ids) instead of recomputing it.
        lora: a ``[learner.lora]``-style section: LoRA adapters (PEFT, :func:`streamrl.common.lora.apply_lora`)
            on every block and only they train (with ``heads``); :meth:`merge` then folds them into the
            weights. Needs ``trainable_layers = None``.
        heads: names of top-level modules of ``model`` that train in full beside the adapters (the
            reward model's ``score`` head).

    Raises:
        ValueError: ``trainable_layers`` outside ``[0, number of blocks]``, or a body without
            ``layers``/``norm`` when blocks are to be frozen.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        trainable_layers: int | None,
        cache: bool = True,
        lora=None,
        heads: Sequence[str] = (),
    ):
        self.model = model
        self.base = model.base_model
        self.lora = None
        if lora is not None:
            if trainable_layers is not None:
                raise ValueError("lora adapts every block; fix: set trainable_layers to none")
            # adapters injected into `model`, its weights frozen (a generic PEFT model: SFT or reward model)
            self.lora = apply_lora(model, lora, causal_lm=False)
            for name in heads:
                getattr(model, name).requires_grad_(True)
        blocks = getattr(self.base, "layers", None)
        if trainable_layers is None:
            self.frozen = 0
        else:
            if not isinstance(blocks, torch.nn.ModuleList) or not isinstance(
                getattr(self.base, "norm", None), torch.nn.Module
            ):
                raise ValueError(
                    f"{type(model).__name__}: freezing lower blocks needs a body with `layers` and "
                    "`norm` (Llama-style); fix: set trainable_layers to none (train every block)"
                )
            if not 0 <= trainable_layers <= len(blocks):
                raise ValueError(
                    f"trainable_layers = {trainable_layers} but the model has {len(blocks)} blocks; "
                    f"fix: choose 0..{len(blocks)} or none"
                )
            self.frozen = len(blocks) - trainable_layers
            for p in self.base.get_input_embeddings().parameters():
                p.requires_grad_(False)
            for block in list(blocks)[: self.frozen]:
                for p in block.parameters():
                    p.requires_grad_(False)
        self.caching = cache and trainable_layers is not None
        self._cache: dict[tuple[int, ...], Tensor] = {}

    def share_features(self, other: Trunk) -> None:
        """Read (and add to) ``other``'s cache of frozen-part outputs instead of computing them again.

        Valid for two models loaded from the same base with the same number of frozen blocks
        (the frozen part never changes during training): e.g. the proxy and gold reward models
        of ``streamrl rm`` with ``gold = true``, which then pay for the frozen forward passes once.

        Raises:
            ValueError: either trunk does not cache, or their frozen block counts differ.
        """
        if not (self.caching and other.caching) or self.frozen != other.frozen:
            raise ValueError(
                f"features can be shared only between caching trunks with the same frozen blocks "
                f"(here {self.frozen} and {other.frozen}, caching {self.caching} and {other.caching})"
            )
        self._cache = other._cache

    def merge(self) -> torch.nn.Module:
        """Fold the LoRA adapters into the weights (PEFT's ``merge_and_unload``; ``W0 + (alpha / r) B A``)
        and return the plain model (``self.model``, now without adapter modules); no-op without ``lora``."""
        if self.lora is not None:
            self.model = self.lora.merge_and_unload()
            self.lora = None
        return self.model

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the whole model that still require gradients."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _only_blocks(self, start: int, stop: int | None, *, final_norm: bool) -> Iterator[None]:
        layers, norm = self.base.layers, self.base.norm
        self.base.layers = torch.nn.ModuleList(list(layers)[start:stop])
        if not final_norm:
            self.base.norm = torch.nn.Identity()
        try:
            yield
        finally:
            self.base.layers, self.base.norm = layers, norm

    @torch.no_grad()
    def _lower(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L, H]`` output of the embeddings and the frozen blocks (no final norm)."""
        with self._only_blocks(0, self.frozen, final_norm=False):
            return self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def precompute(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        pad_id: int,
        batch_size: int,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """Cache the frozen part's output of every new sequence (no-op when not caching);
        ``log`` gets a progress line about every tenth of the work."""
        if not self.caching:
            return
        device = next(self.model.parameters()).device
        todo = sorted({tuple(s) for s in sequences} - self._cache.keys(), key=len)
        started, batches = time.perf_counter(), math.ceil(len(todo) / batch_size)
        for number, start in enumerate(range(0, len(todo), batch_size), start=1):
            chunk = todo[start : start + batch_size]
            ids, mask = _pad(chunk, pad_id)
            hidden = self._lower(ids.to(device), mask.to(device)).float().cpu()
            for row, seq in enumerate(chunk):
                self._cache[seq] = hidden[row, : len(seq)].clone()
            if log is not None and (number % max(1, batches // 10) == 0 or number == batches):
                log(
                    f"frozen blocks' output cached for {min(start + batch_size, len(todo))}/{len(todo)} texts "
                    f"({time.perf_counter() - started:.0f} s)"
                )

    def hidden(self, sequences: Sequence[Sequence[int]], *, pad_id: int) -> tuple[Tensor, Tensor]:
        """Final hidden states of right-padded ``sequences``.

        Returns:
            ``(hidden [B, L, H] float32, attention_mask [B, L] int64)`` on the model's device;
            gradients flow into the trainable blocks only.
        """
        device = next(self.model.parameters()).device
        ids, mask = _pad(sequences, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if not self.caching:
            return self.base(input_ids=ids, attention_mask=mask).last_hidden_state.float(), mask
        self.precompute(sequences, pad_id=pad_id, batch_size=len(sequences))
        cached = [self._cache[tuple(s)] for s in sequences]
        lower = torch.zeros(len(cached), ids.shape[1], cached[0].shape[-1], dtype=cached[0].dtype)
        for row, h in enumerate(cached):
            lower[row, : h.shape[0]] = h
        dtype = next(self.base.parameters()).dtype
        with self._only_blocks(self.frozen, None, final_norm=True):
            out = self.base(inputs_embeds=lower.to(device=device, dtype=dtype), attention_mask=mask)
        return out.last_hidden_state.float(), mask


def _pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    from streamrl.common.reward_model import pad_right

    return pad_right(sequences, pad_id=pad_id)


def length_batches(
    lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, window: int = 50
) -> list[list[int]]:
    """Length-bucketed batches of indices for one epoch.

    The indices are shuffled (seeded by ``seed`` and ``epoch``), cut into windows of
    ``window * batch_size``, each window sorted by length and cut into batches, and the
    batch order shuffled again: batches hold texts of similar length (little padding)
    while every epoch differs. Each index appears exactly once.

    Raises:
        ValueError: ``batch_size`` or ``window`` < 1.
    """
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    batches = []
    span = window * batch_size
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def make_schedule(optimizer: torch.optim.Optimizer, *, name: str, warmup_ratio: float, total_steps: int):
    """Learning-rate schedule: linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps,
    then ``cosine`` or ``linear`` decay to 0 or ``constant`` (``transformers.get_scheduler``)."""
    from transformers import get_scheduler

    warmup = int(np.ceil(warmup_ratio * total_steps))
    kind = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files of a model folder whose contents :func:`weights_fingerprint` digests."""


def weights_fingerprint(path: str | Path) -> str:
    """A digest of a model folder's weights: SHA-256 over the names and contents of its
    :data:`WEIGHT_SUFFIXES` files, in name order, as 16 hex digits. Unlike the model
    fingerprint of :mod:`streamrl.common.fingerprint` (architecture and tokenizer), it changes
    when training rewrites the weights, as ``streamrl sft --force`` does to the model that
    ``streamrl rm`` starts from. Reads every weight file once (about a second per 500 MB).

    Returns:
        The digest; "" for a path that is not a folder or holds no weight file.
    """
    folder = Path(path)
    files = (
        sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    )
    if not files:
        return ""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\x00")
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def stage_done(folder: Path) -> dict | None:
    """The summary of a completed stage in ``folder`` (its ``summary.json``), or None."""
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        return None
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def stage_folder(folder: Path) -> Iterator[Path]:
    """A temporary sibling of ``folder`` to write into; on success it gets a ``COMPLETE``
    marker and replaces ``folder`` (an older one is removed), on failure it is deleted."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        (tmp / COMPLETE).write_text("complete\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


IGNORED_SETTINGS = ("threads", "device", "output_dir")
"""Settings that do not change what a stage makes (a complete stage is reused across them)."""


def _changed_settings(stored: dict, current: dict, default: dict, prefix: str = "") -> list[str]:
    """``key: stored -> current`` for each setting (nested ``data.*`` too) that differs, except
    :data:`IGNORED_SETTINGS`; a key missing from ``stored`` (written by an older version) counts
    as its ``default``."""
    changed = []
    for name, value in current.items():
        if name in IGNORED_SETTINGS:
            continue
        old = stored.get(name, default.get(name))
        if isinstance(value, dict) and isinstance(old, dict):
            changed += _changed_settings(old, value, default.get(name) or {}, f"{prefix}{name}.")
        elif old != value:
            changed.append(f"{prefix}{name}: {old!r} -> {value!r}")
    return changed


def load_stage_data(section: Any, key: str) -> tuple[list, list]:
    """``(train, held_out)`` examples of a stage's ``data`` table (see :mod:`streamrl.stages.rlhf_data`).

    Args:
        section: the stage's config section (``config.sft`` or ``config.rm``).
        key: its name in the config (``"sft"``, ``"rm"``), for messages.

    Raises:
        StageError: no data path, an unreadable or malformed file, or a split leaving no row.
    """
    from streamrl.stages.rlhf_data import load_examples, split_examples

    data = section.data
    if data.path is None:
        raise StageError(
            f'{key}.data.path: not set; fix: set [{key}.data] path = "demonstrations.jsonl" '
            f"or --set {key}.data.path=FILE"
        )
    try:
        examples = load_examples(data.path)
        return split_examples(examples, eval_rows=data.eval_rows, seed=data.split_seed, train_rows=data.train_rows)
    except (OSError, ValueError) as exc:
        raise StageError(f"{key}.data: {exc}") from None


def optimise(
    trunk: Trunk,
    section: Any,
    *,
    lengths: Sequence[int],
    batch_loss: Callable[[list[int]], Tensor],
    seed: int,
    log: Callable[[str], None],
    label: str,
) -> dict:
    """Train ``trunk``'s trainable parameters: AdamW, warm-up + decay, gradient clipping.

    Args:
        trunk: the model (its trainable parameters are optimised).
        section: the stage's config (``epochs``, ``batch_size``, ``lr``, ``weight_decay``,
            ``warmup_ratio``, ``schedule``, ``max_grad_norm``).
        lengths: one length per training row (for length bucketing).
        batch_loss: row indices -> 0-d loss with a graph.
        seed: shuffle seed.
        log: progress lines go here.
        label: prefix of the progress lines (``"sft"``, ``"rm"``).

    Returns:
        ``steps``, ``train_loss_first``/``train_loss_last`` (mean of the first and last
        tenth of the steps), ``train_seconds``.

    Raises:
        StageError: nothing to train (every parameter frozen) or a non-finite loss.
    """
    params = trunk.trainable_parameters
    if not params:
        raise StageError(f"{label}: every parameter is frozen; fix: raise {label}.trainable_layers")
    optimizer = adamw(params, lr=section.lr, weight_decay=section.weight_decay)
    per_epoch = math.ceil(len(lengths) / section.batch_size)
    total = per_epoch * section.epochs
    schedule = make_schedule(optimizer, name=section.schedule, warmup_ratio=section.warmup_ratio, total_steps=total)
    losses: list[float] = []
    started = time.perf_counter()
    every = max(1, total // 10)
    trunk.model.train()
    for epoch in range(section.epochs):
        for rows in length_batches(lengths, batch_size=section.batch_size, seed=seed, epoch=epoch):
            loss = batch_loss(rows)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise StageError(f"{label}: the loss became {value} at step {len(losses) + 1}; fix: lower {label}.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, section.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(value)
            if len(losses) % every == 0 or len(losses) == total:
                log(
                    f"{label} step {len(losses)}/{total} loss {np.mean(losses[-every:]):.4f} "
                    f"lr {schedule.get_last_lr()[0]:.2e} ({time.perf_counter() - started:.0f} s)"
                )
    trunk.model.eval()
    tenth = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "train_loss_first": float(np.mean(losses[:tenth])),
        "train_loss_last": float(np.mean(losses[-tenth:])),
        "train_seconds": round(time.perf_counter() - started, 1),
    }


@dataclass
class Stage:
    """What a stage command has in hand once its data, device and tokenizer are ready.

    Attributes:
        key: the stage's config section name (``"sft"``, ``"rm"``).
        output: its output folder.
        train, held: training and held-out examples.
        device: where it trains.
        base: resolved path of the model it starts from.
        tokenizer: that model's tokenizer (pad token set).
        started: ``time.perf_counter()`` at the start.
        base_fingerprint: :func:`weights_fingerprint` of ``base``, stored in every summary the
            stage writes: a complete stage whose base has other weights now is refused.
    """

    key: str
    output: Path
    train: list
    held: list
    device: torch.device
    base: str
    tokenizer: Any
    started: float
    base_fingerprint: str = ""

    @classmethod
    def open(cls, config: Any, key: str, *, force: bool, log: Callable[[str], None]) -> Stage | dict:
        """Start stage ``key`` of ``config``; the stored summary instead when its output folder
        (``<key>.output_dir``, default ``<run.output_dir>/<key>``) is complete and not ``force``.

        Raises:
            StageError: see :func:`load_stage_data`.
        """
        from streamrl.common.models import configure_torch, load_tokenizer, resolve_model_path, select_device

        section = getattr(config, key)
        output = Path(section.output_dir) if section.output_dir else Path(config.run.output_dir) / key
        done = stage_done(output)
        fix = (
            f"fix: redo it (`streamrl {key} --force`, or `streamrl pipeline --force` for every stage), or set "
            f"{key}.output_dir to a new folder"
        )
        if done is not None and not force:
            changed = _changed_settings(
                done.get("config", {}), section.model_dump(mode="json"), type(section)().model_dump(mode="json")
            )
            if changed:
                raise StageError(
                    f"{key}: {output} is complete but was made with other settings ({', '.join(changed)}); {fix}"
                )
            stored = done.get("base_fingerprint")
            if stored:  # the base's weights may have changed under the same name (`streamrl sft --force`)
                current = weights_fingerprint(resolve_model_path(section.base_model, config.model.cache_path))
                if current != stored:
                    raise StageError(
                        f"{key}: {output} is complete but was trained from other weights of "
                        f"{key}.base_model = {section.base_model!r} (fingerprint {stored}, now "
                        f"{current or 'unreadable'}: e.g. `streamrl sft --force` retrained it since); "
                        f"{fix}"
                    )
            log(f"{key}: {output} is complete; skipped (--force retrains)")
            return done
        started = time.perf_counter()
        train, held = load_stage_data(section, key)
        configure_torch(section.threads, seed=config.run.seed)
        base = resolve_model_path(section.base_model, config.model.cache_path)
        return cls(
            key=key,
            output=output,
            train=train,
            held=held,
            device=select_device(section.device),
            base=base,
            tokenizer=load_tokenizer(base),
            started=started,
            base_fingerprint=weights_fingerprint(base),
        )

    def save(
        self,
        model: torch.nn.Module | None,
        summary: dict,
        log: Callable[[str], None],
        files: dict[str, list[dict]] | None = None,
        parts: dict[str, tuple[torch.nn.Module, dict]] | None = None,
    ) -> dict:
        """Write ``model``, the tokenizer, ``summary.json`` (with the wall time) and ``files``
        (name -> rows, as JSON lines) atomically. ``parts`` (subfolder -> (model, its summary))
        writes further models, each with the tokenizer and its own ``summary.json``, into
        subfolders of the same atomic output (``streamrl rm`` with ``gold = true``: ``proxy/``,
        ``gold/``); ``model`` may then be None (nothing at the top level)."""
        summary["wall_seconds"] = round(time.perf_counter() - self.started, 1)
        with stage_folder(self.output) as folder:
            for where, (item, item_summary) in [("", (model, summary)), *(parts or {}).items()]:
                item_summary["base_fingerprint"] = self.base_fingerprint
                target = folder / where
                target.mkdir(parents=True, exist_ok=True)
                if item is not None:
                    for p in item.parameters():
                        p.requires_grad_(True)  # frozen only for training; the saved model is whole
                    item.save_pretrained(target)
                    self.tokenizer.save_pretrained(target)
                (target / "summary.json").write_text(json.dumps(item_summary, indent=2))
            for name, rows in (files or {}).items():
                (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        log(f"{self.key}: wrote {self.output} in {summary['wall_seconds']:.0f} s")
        return summary
