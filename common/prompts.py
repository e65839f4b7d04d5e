"""Prompt sources for the generators.

A prompt source is a validated config section
(:class:`streamrl.common.config.PromptSource`: ``kind``, ``path`` and the options of
that kind) turned into a list of :class:`Prompt` by :func:`load_prompts`. The list is
split into train/eval by :func:`split_prompts` (stable hash of the prompt id)
and the train part is consumed by each generator replica through a
:class:`PromptStream` (seeded per-epoch shuffle, sharded across replicas).
:func:`format_prompt` applies the tokenizer's chat template when asked.

Argument rules of the public functions are declared as types and enforced by
``pydantic.validate_call`` (strict: no bool for an int); a broken rule raises
``pydantic.ValidationError``, a ``ValueError``.

Kinds:

* ``"jsonl"``: :func:`load_jsonl` (one JSON object per line).
* ``"csv"``: :func:`load_csv` (e.g. the IMDB reviews CSV, column ``review``).
* ``"gsm8k"``: :func:`load_gsm8k` (``question``/``answer`` jsonl; the answer
  goes to ``metadata["answer"]`` for the ``gsm8k_exact_match`` reward).
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Sequence, Union

import numpy as np
from pydantic import Field, InstanceOf, NonNegativeInt, PositiveInt, validate_call

from streamrl.common.config import STRICT_ARGS, PromptSource

__all__ = [
    "Prompt",
    "load_jsonl",
    "load_csv",
    "load_gsm8k",
    "load_prompts",
    "split_prompts",
    "PromptStream",
    "format_prompt",
    "clean_text",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt.

    Attributes:
        prompt_id: unique id within its source (str); used for the train/eval
            split and for tracing samples back to their prompt.
        text: the raw prompt text (before any chat template).
        metadata: per-prompt extras passed to reward functions (e.g.
            ``{"answer": "... #### 72"}``); JSON-serialisable values. The
            instance is frozen but, holding a dict, it is not hashable.
    """

    prompt_id: str
    text: str
    metadata: dict = field(default_factory=dict)


def _check_unique(prompts: list[Prompt], path: Path) -> None:
    seen: set[str] = set()
    for p in prompts:
        if p.prompt_id in seen:
            raise ValueError(f"{path}: duplicate prompt id {p.prompt_id!r}; prompt ids must be unique")
        seen.add(p.prompt_id)


def load_jsonl(
    path: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    metadata_fields: Sequence[str] = (),
) -> list[Prompt]:
    """Load prompts from a JSON-lines file.

    Args:
        path: file with one JSON object per line (UTF-8; blank lines skipped).
        text_field: key holding the prompt text (a string).
        id_field: key holding the prompt id (converted with ``str``). When
            ``None``, or when a line lacks the key, the id is
            ``f"{file stem}:{line number}"`` (1-based physical line).
        metadata_fields: keys copied into ``Prompt.metadata``.

    Returns:
        Prompts in file order. Lines whose text is empty/whitespace are
        skipped (with a warning).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on invalid JSON, a non-object line, a missing or non-string
            text field, a missing metadata field, or duplicate ids (the
            message gives the line number).
    """
    path = Path(path)
    if isinstance(metadata_fields, str):
        metadata_fields = (metadata_fields,)
    prompts: list[Prompt] = []
    skipped = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            if text_field not in row:
                raise ValueError(f"{path}:{line_no}: missing text field {text_field!r} (keys: {sorted(row)})")
            text = row[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: field {text_field!r} is {type(text).__name__}, expected a string")
            if not text.strip():
                skipped += 1
                continue
            if id_field is not None and id_field in row and row[id_field] is not None:
                prompt_id = str(row[id_field])
            else:
                prompt_id = f"{path.stem}:{line_no}"
            metadata: dict[str, Any] = {}
            for key in metadata_fields:
                if key not in row:
                    raise ValueError(f"{path}:{line_no}: missing metadata field {key!r} (keys: {sorted(row)})")
                metadata[key] = row[key]
            prompts.append(Prompt(prompt_id, text, metadata))
    if skipped:
        log.warning("%s: skipped %d lines with empty text", path, skipped)
    _check_unique(prompts, path)
    return prompts


_BR_RE = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
_WS_RE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Strip simple HTML from ``text``.

    ``<br />`` (any spelling) becomes a space, other tags (``<i>``, ``</a>``,
    ...) are removed, entities (``&amp;``) are unescaped, and runs of
    whitespace collapse to one space; the result is stripped. A lone ``<`` as
    in ``"a < b"`` is kept.

    Args:
        text: input text.

    Returns:
        The cleaned text (str).
    """
    text = _BR_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    text = html.unescape(text)
    return _WS_RE.sub(" ", text).strip()


@validate_call(config=STRICT_ARGS)
def load_csv(
    path: Union[str, Path],
    *,
    column: str,
    first_k_words: Optional[PositiveInt] = None,
    strip_html: bool = True,
    metadata_columns: Union[str, Sequence[str]] = (),
    id_column: Optional[str] = None,
) -> list[Prompt]:
    """Load prompts from a CSV file with a header row.

    Args:
        path: CSV file (UTF-8, RFC 4180 quoting; fields may span lines).
        column: header of the text column (e.g. ``"review"`` for IMDB).
        first_k_words: if set (>= 1), keep only the first K
            whitespace-separated words (joined by single spaces), turning a
            full review into an opening. Texts with fewer words are kept whole.
        strip_html: apply :func:`clean_text` (remove ``<br />`` and other
            simple tags, unescape entities, collapse whitespace).
        metadata_columns: columns copied (as strings) into ``Prompt.metadata``.
        id_column: column holding the prompt id; when ``None`` the id is
            ``f"{file stem}:{row number}"`` (1-based data row, header excluded).

    Returns:
        Prompts in file order; rows whose text is empty after cleaning are
        skipped (with a warning).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if a requested column is not in the header, a row is
            short, or ids repeat.
        pydantic.ValidationError: ``first_k_words`` is not a positive int or None.
    """
    path = Path(path)
    if isinstance(metadata_columns, str):
        metadata_columns = (metadata_columns,)
    # Long reviews can exceed the default 128 KiB field limit of the csv module.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    prompts: list[Prompt] = []
    skipped = 0
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        wanted = [column, *metadata_columns] + ([id_column] if id_column is not None else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in CSV header {header}")
        for row_no, row in enumerate(reader, start=1):
            text = row[column]
            if text is None:
                raise ValueError(f"{path}: data row {row_no} has no value for column {column!r}")
            if strip_html:
                text = clean_text(text)
            if first_k_words is not None:
                text = " ".join(text.split()[:first_k_words])
            if not text.strip():
                skipped += 1
                continue
            prompt_id = str(row[id_column]) if id_column is not None else f"{path.stem}:{row_no}"
            metadata = {c: row[c] for c in metadata_columns}
            prompts.append(Prompt(prompt_id, text, metadata))
    if skipped:
        log.warning("%s: skipped %d rows with empty text in column %r", path, skipped, column)
    _check_unique(prompts, path)
    return prompts


def load_gsm8k(path: str | Path) -> list[Prompt]:
    """Load GSM8K (``{"question": ..., "answer": "... #### 72"}`` per line).

    Args:
        path: GSM8K jsonl file.

    Returns:
        Prompts with ``text`` = question, ``metadata = {"answer": full answer
        text}``, ids ``f"{file stem}:{line number}"``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_jsonl`.
    """
    return load_jsonl(path, text_field="question", id_field=None, metadata_fields=("answer",))


def load_prompts(source: PromptSource) -> list[Prompt]:
    """Load the prompts of a validated prompt source (the options of its kind were checked at load).

    ``jsonl``: :func:`load_jsonl` with ``text_field`` and ``id_field``; ``csv``:
    :func:`load_csv` with ``column`` and ``first_k_words``; ``gsm8k``: :func:`load_gsm8k`.

    Args:
        source: ``generator.prompts`` or ``learner.ptx_data`` of a config.

    Returns:
        The prompts (list[Prompt]), in file order.

    Raises:
        FileNotFoundError: if the file does not exist (``streamrl check`` reports it first).
        ValueError: the loader rejects the data (the message gives file and line).
    """
    if source.kind == "jsonl":
        return load_jsonl(source.path, text_field=source.text_field, id_field=source.id_field)
    if source.kind == "csv":
        return load_csv(source.path, column=source.column, first_k_words=source.first_k_words)
    return load_gsm8k(source.path)


def _unit_hash(prompt_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@validate_call(config=STRICT_ARGS)
def split_prompts(
    prompts: Sequence[InstanceOf[Prompt]], *, eval_fraction: Annotated[float, Field(ge=0, le=1)], seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic held-out split by hashing prompt ids.

    A prompt goes to eval iff ``sha256(f"{seed}\\0{prompt_id}")`` mapped to
    [0, 1) is below ``eval_fraction``. The assignment of a prompt depends only
    on its id and the seed (not on order, the other prompts, the process or
    ``PYTHONHASHSEED``), so train and eval never overlap and the split is the
    same in every process. The eval size is ``eval_fraction * len`` only in
    expectation.

    Args:
        prompts: prompts with unique ids.
        eval_fraction: expected fraction in [0, 1] sent to eval.
        seed: split seed (int).

    Returns:
        ``(train, eval)``, each in input order.

    Raises:
        pydantic.ValidationError: ``eval_fraction`` is not a number in [0, 1].
    """
    train: list[Prompt] = []
    evaluation: list[Prompt] = []
    for p in prompts:
        (evaluation if _unit_hash(p.prompt_id, seed) < eval_fraction else train).append(p)
    return train, evaluation


class PromptStream:
    """Infinite, seeded, sharded iterator over prompts.

    Epoch ``e`` is the permutation ``numpy.random.default_rng([seed, e])
    .permutation(len(prompts))`` of the input list; replica ``shard`` of
    ``num_shards`` takes positions ``shard, shard + num_shards, ...`` of it.
    Within an epoch the shards are disjoint and together cover every prompt
    exactly once; give every replica the same ``prompts`` (same order) and
    ``seed``. Epoch numbers start at 0 and count up forever.

    Args:
        prompts: non-empty sequence of prompts (copied).
        seed: shuffle seed (non-negative int).
        shard: this replica's index in ``[0, num_shards)``.
        num_shards: number of replicas (>= 1, at most ``len(prompts)``).

    Raises:
        ValueError: on an empty prompt list, or a shard outside ``[0, num_shards)``.
        pydantic.ValidationError: a negative seed or shard, a num_shards below 1.
    """

    @validate_call(config=STRICT_ARGS)
    def __init__(self, prompts: Sequence[InstanceOf[Prompt]], *, seed: NonNegativeInt, shard: NonNegativeInt = 0,
                 num_shards: PositiveInt = 1) -> None:
        self._prompts = tuple(prompts)
        if not self._prompts:
            raise ValueError("PromptStream: the prompt list is empty")
        if shard >= num_shards:
            raise ValueError(f"PromptStream: shard must be in [0, {num_shards}), got {shard!r}")
        if num_shards > len(self._prompts):
            raise ValueError(
                f"PromptStream: num_shards={num_shards} exceeds the number of prompts ({len(self._prompts)}); "
                "some replicas would get nothing"
            )
        self.seed = seed
        self.shard = shard
        self.num_shards = num_shards
        self._epoch = -1
        self._order: list[int] = []
        self._pos = 0

    def __len__(self) -> int:
        """Number of prompts in the full (unsharded) list."""
        return len(self._prompts)

    @property
    def epoch(self) -> int:
        """Epoch of the most recently returned prompt (-1 before the first)."""
        return self._epoch

    def epoch_order(self, epoch: int) -> list[Prompt]:
        """This shard's prompts for ``epoch``, in order (pure; no state change).

        Args:
            epoch: epoch number (>= 0).

        Returns:
            The list of prompts this replica yields during that epoch.
        """
        return [self._prompts[i] for i in self._shard_indices(epoch)]

    def _shard_indices(self, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._prompts))
        return perm[self.shard :: self.num_shards].tolist()

    def __iter__(self) -> Iterator[Prompt]:
        return self

    def __next__(self) -> Prompt:
        if self._pos >= len(self._order):
            self._epoch += 1
            self._order = self._shard_indices(self._epoch)
            self._pos = 0
        prompt = self._prompts[self._order[self._pos]]
        self._pos += 1
        return prompt

    @validate_call(config=STRICT_ARGS)
    def next_batch(self, n: NonNegativeInt) -> list[Prompt]:
        """Return the next ``n`` prompts (may cross an epoch boundary).

        Args:
            n: batch size (>= 0).

        Returns:
            list of ``n`` prompts.

        Raises:
            pydantic.ValidationError: ``n`` is negative or not an int.
        """
        return [next(self) for _ in range(n)]


_warned_no_template = False


def format_prompt(text: str, tokenizer: Any, *, chat_template: bool, system: str | None = None) -> str:
    """Turn raw prompt text into the string given to the model.

    Args:
        text: raw prompt text.
        tokenizer: a ``transformers`` tokenizer (only used when
            ``chat_template`` is True).
        chat_template: if True and ``tokenizer.chat_template`` is set, render
            ``[{"role": "system", "content": system}?, {"role": "user",
            "content": text}]`` with ``apply_chat_template(...,
            tokenize=False, add_generation_prompt=True)``.
        system: optional system message (only used with a chat template).

    Returns:
        The formatted prompt string; ``text`` unchanged when no template is
        used (``chat_template`` False, or the tokenizer has none, in which
        case ``system`` is ignored).
    """
    if not chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        global _warned_no_template
        if not _warned_no_template:
            log.warning("chat_template requested but the tokenizer has none; using raw prompt text")
            _warned_no_template = True
        return text
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(rendered)
