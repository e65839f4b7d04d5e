"""Prompt sources for the generators.

A prompt source is a validated config section
(:class:`streamrl.common.config.PromptSource`: ``kind``, ``path`` and the options of
that kind) turned into a list of :class:`Prompt` by :func:`load_prompts`. The list is
split into train/eval by :func:`split_prompts` (stable hash of the prompt id)
and the train part is consumed by each generator replica through a
:class:`PromptStream` (seeded per-epoch shuffle, sharded across replicas).
:func:`streamrl.common.prompt_text.format_prompt` applies the tokenizer's chat template when asked.

Argument rules of the public functions are declared as types and enforced by
``pydantic.validate_call`` (strict: no bool for an int); a broken rule raises
``pydantic.ValidationError``, a ``ValueError``.

Kinds:

* ``"jsonl"``: :func:`load_jsonl` (one JSON object per line).
* ``"csv"``: :func:`load_csv` (e.g. the IMDB reviews CSV, column ``review``).
* ``"gsm8k"``: :func:`load_gsm8k` (``question``/``answer`` jsonl; the answer
  goes to ``metadata["answer"]`` for the ``gsm8k_exact_match`` reward).
* ``"datasets"``: :func:`load_dataset_prompts`, anything Hugging Face ``datasets``
  reads: a parquet, json/jsonl, csv or arrow file, a ``save_to_disk`` folder, or a hub
  data set id (downloaded, with its progress bar, when the machine is online).

A prompt is text, or (``messages_field``) a chat: a list of ``{"role", "content"}``
messages that :func:`~streamrl.common.prompt_text.format_prompt` renders with the tokenizer's chat template. The
columns named in ``metadata_fields`` travel with every rollout of the prompt and reach
the reward function as its ``metadata`` argument.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, InstanceOf, NonNegativeInt, PositiveInt, validate_call

from streamrl.common.config import STRICT_ARGS, PromptSource

__all__ = [
    "Prompt",
    "load_jsonl",
    "load_dataset_prompts",
    "load_csv",
    "load_gsm8k",
    "load_prompts",
    "split_prompts",
    "PromptStream",
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
        messages: the prompt as a chat (``[{"role": ..., "content": ...}, ...]``,
            rendered by :func:`~streamrl.common.prompt_text.format_prompt` with the chat template), or None for a
            text prompt; ``text`` is then the content of the last message.
    """

    prompt_id: str
    text: str
    metadata: dict = field(default_factory=dict)
    messages: tuple[dict, ...] | None = None


def _check_unique(prompts: list[Prompt], path: Path) -> None:
    seen: set[str] = set()
    for p in prompts:
        if p.prompt_id in seen:
            raise ValueError(f"{path}: duplicate prompt id {p.prompt_id!r}; prompt ids must be unique")
        seen.add(p.prompt_id)


def _json_like(value: Any, where: str, key: str) -> Any:
    """``value`` unchanged when it is JSON-like (it travels in messages); else a ValueError naming it."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}: metadata field {key!r} holds {type(value).__name__} {value!r:.80}, which cannot "
            f"travel with a rollout ({exc}); fix: convert it to a string or number, or drop it from "
            "metadata_fields"
        ) from None
    return value


def _chat(value: Any, where: str, key: str) -> tuple[dict, ...]:
    """A validated chat: a non-empty list of ``{"role": str, "content": str}`` (other keys dropped)."""
    fix = f'fix: make {key!r} a list of {{"role": ..., "content": ...}} messages, or use text_field'
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"{where}: field {key!r} is {type(value).__name__} {value!r:.60}, not a non-empty list of messages; {fix}"
        )
    out = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(f"{where}: message {i} of {key!r} is {message!r:.80}; {fix}")
        out.append({"role": message["role"], "content": message["content"]})
    return tuple(out)


def _row_prompt(
    row: dict,
    where: str,
    default_id: str,
    *,
    text_field: str,
    id_field: str | None,
    messages_field: str | None,
    metadata_fields: Sequence[str],
) -> Prompt | None:
    """One row (a JSON object, a data set row) as a :class:`Prompt`; None when its text is empty."""
    key = messages_field if messages_field is not None else text_field
    if key not in row:
        raise ValueError(
            f"{where}: missing {'messages' if messages_field else 'text'} field {key!r} (keys: {sorted(row)})"
        )
    messages = None
    if messages_field is not None:
        messages = _chat(row[key], where, key)
        text = messages[-1]["content"]
    else:
        text = row[key]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {key!r} is {type(text).__name__}, expected a string")
        if not text.strip():
            return None
    if id_field is not None and row.get(id_field) is not None:
        prompt_id = str(row[id_field])
    else:
        prompt_id = default_id
    metadata: dict[str, Any] = {}
    for name in metadata_fields:
        if name not in row:
            raise ValueError(f"{where}: missing metadata field {name!r} (keys: {sorted(row)})")
        metadata[name] = _json_like(row[name], where, name)
    return Prompt(prompt_id, text, metadata, messages)


def json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSON-lines file, in order.

    A path ending in ``.gz`` is read gzip-compressed. Line numbers are 1-based physical lines.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid JSON or a line that is not a JSON object (the message gives ``path:line``).
    """
    path = Path(path)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def load_jsonl(
    path: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    metadata_fields: Sequence[str] = (),
    messages_field: str | None = None,
) -> list[Prompt]:
    """Load prompts from a JSON-lines file.

    Args:
        path: file with one JSON object per line (UTF-8; blank lines skipped).
        text_field: key holding the prompt text (a string).
        id_field: key holding the prompt id (converted with ``str``). When
            ``None``, or when a line lacks the key, the id is
            ``f"{file stem}:{line number}"`` (1-based physical line).
        metadata_fields: keys copied into ``Prompt.metadata`` (JSON-like values).
        messages_field: key holding the prompt as a chat (a list of ``{"role",
            "content"}`` messages) instead of ``text_field``.

    Returns:
        Prompts in file order. Lines whose text is empty/whitespace are
        skipped (with a warning).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on invalid JSON, a non-object line, a missing or non-string
            text field, a malformed messages list, a missing metadata field, or
            duplicate ids (the message gives the line number).
    """
    path = Path(path)
    if isinstance(metadata_fields, str):
        metadata_fields = (metadata_fields,)

    def rows() -> Iterator[tuple[dict, str, str]]:
        for line_no, row in json_lines(path):
            yield row, f"{path}:{line_no}", f"{path.stem}:{line_no}"

    return _rows_to_prompts(
        rows(),
        path,
        "lines",
        text_field=text_field,
        id_field=id_field,
        messages_field=messages_field,
        metadata_fields=metadata_fields,
    )


def _rows_to_prompts(
    rows: Iterable[tuple[dict, str, str]], origin: str | Path, what: str, **fields: Any
) -> list[Prompt]:
    """Prompts of ``(row, where, default id)`` triples (:func:`_row_prompt`); empty texts skipped with
    a warning, ids checked unique."""
    prompts: list[Prompt] = []
    skipped = 0
    for row, where, default_id in rows:
        prompt = _row_prompt(row, where, default_id, **fields)
        if prompt is None:
            skipped += 1
        else:
            prompts.append(prompt)
    if skipped:
        log.warning("%s: skipped %d %s with empty text", origin, skipped, what)
    _check_unique(prompts, Path(origin))
    return prompts


DATASET_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
"""File extensions ``datasets`` reads, and the builder that reads them (a ``.gz`` suffix is allowed)."""


def dataset_format(path: str | Path) -> str:
    """The ``datasets`` builder for a data file, from its extension (``data.jsonl.gz`` -> ``json``).

    Raises:
        ValueError: an extension ``datasets`` does not read (the message lists those it does).
    """
    suffixes = [x.lower() for x in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    found = DATASET_FORMATS.get(suffixes[-1]) if suffixes else None
    if found is None:
        raise ValueError(
            f"{path}: cannot tell the file format from its name; fix: use one of "
            f'{", ".join(DATASET_FORMATS)} (optionally .gz) or set format = "parquet"/"json"/'
            '"csv"/"arrow"'
        )
    return found


def load_dataset_prompts(
    path: str | Path | None = None,
    *,
    dataset: str | None = None,
    subset: str | None = None,
    split: str = "train",
    format: str | None = None,
    text_field: str = "text",
    id_field: str | None = "id",
    messages_field: str | None = None,
    metadata_fields: Sequence[str] = (),
) -> list[Prompt]:
    """Load prompts with Hugging Face ``datasets``: a local file or folder, or a hub data set.

    Exactly one of ``path`` and ``dataset``:

    * ``path`` a file: ``datasets.load_dataset(format, data_files=path, split="train")``
      with ``format`` from the extension (:func:`dataset_format`) unless given (parquet,
      json for ``.json``/``.jsonl``, csv, arrow); a folder: ``datasets.load_from_disk``
      (a ``DatasetDict`` gives its ``split``).
    * ``dataset`` a hub id: ``datasets.load_dataset(dataset, subset, split=split)``
      (downloaded once into the Hugging Face cache, with a progress bar; needs the network
      or the cache).

    Rows become prompts as in :func:`load_jsonl` (``text_field`` or ``messages_field``,
    ``id_field``, ``metadata_fields``); the default id is ``f"{name}:{row}"`` (1-based row;
    name = the file stem, or ``dataset/split``).

    Returns:
        Prompts in data set order; rows with empty text skipped (with a warning).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: neither or both of ``path``/``dataset``, an unknown extension, the split is
            missing, a column is missing (the message lists the columns), a malformed row, or
            duplicate ids.
        Exception: what ``datasets`` raises for an unreadable file or an unknown hub id.
    """
    import datasets

    if (path is None) == (dataset is None):
        raise ValueError(
            "load_dataset_prompts: give exactly one of path (a local file or folder) or dataset (a hub id)"
        )
    if dataset is not None:
        data = datasets.load_dataset(dataset, subset, split=split)
        name, origin = f"{dataset}/{split}", dataset
    elif path is not None:  # always, when there is no dataset (exactly one of the two, checked above)
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        name, origin = path.stem.split(".")[0], str(path)
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{path}: no split {split!r} (splits: {sorted(data)}); fix: set split")
                data = data[split]
        else:
            data = datasets.load_dataset(format or dataset_format(path), data_files=str(path), split="train")
    wanted = [messages_field if messages_field is not None else text_field, *metadata_fields]
    missing = [c for c in wanted if c not in data.column_names]
    if missing:
        raise ValueError(
            f"{origin}: columns {missing} not in the data set (columns: {data.column_names}); fix: set "
            "text_field / messages_field / metadata_fields to existing columns"
        )
    rows = ((row, f"{origin} row {row_no}", f"{name}:{row_no}") for row_no, row in enumerate(data, start=1))
    return _rows_to_prompts(
        rows,
        origin,
        "rows",
        text_field=text_field,
        id_field=id_field,
        messages_field=messages_field,
        metadata_fields=metadata_fields,
    )


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
    path: str | Path,
    *,
    column: str,
    first_k_words: PositiveInt | None = None,
    strip_html: bool = True,
    metadata_columns: str | Sequence[str] = (),
    id_column: str | None = None,
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


def load_gsm8k(path: str | Path, *, metadata_fields: Sequence[str] = ()) -> list[Prompt]:
    """Load GSM8K (``{"question": ..., "answer": "... #### 72"}`` per line).

    Args:
        path: GSM8K jsonl file.
        metadata_fields: keys copied into the metadata besides ``answer``.

    Returns:
        Prompts with ``text`` = question, ``metadata = {"answer": full answer
        text, ...}``, ids ``f"{file stem}:{line number}"``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_jsonl`.
    """
    extra = tuple(name for name in metadata_fields if name != "answer")
    return load_jsonl(path, text_field="question", id_field=None, metadata_fields=("answer", *extra))


def load_prompts(source: PromptSource) -> list[Prompt]:
    """Load the prompts of a validated prompt source (the options of its kind were checked at load).

    ``jsonl``: :func:`load_jsonl`; ``csv``: :func:`load_csv` (``column``, ``first_k_words``,
    ``metadata_fields`` as columns); ``gsm8k``: :func:`load_gsm8k`; ``datasets``:
    :func:`load_dataset_prompts`. Every kind takes ``metadata_fields``; ``jsonl`` and
    ``datasets`` take ``text_field`` or ``messages_field``, and ``id_field``.

    Args:
        source: ``generator.prompts`` or ``learner.ptx_data`` of a config.

    Returns:
        The prompts (list[Prompt]), in file order.

    Raises:
        FileNotFoundError: if the file does not exist (``streamrl check`` reports it first).
        ValueError: the loader rejects the data (the message gives file and line or row).
    """
    fields = tuple(source.metadata_fields)
    if source.kind == "jsonl":
        return load_jsonl(
            source.path,
            text_field=source.text_field,
            id_field=source.id_field,
            messages_field=source.messages_field,
            metadata_fields=fields,
        )
    if source.kind == "csv":
        return load_csv(source.path, column=source.column, first_k_words=source.first_k_words, metadata_columns=fields)
    if source.kind == "datasets":
        location = {"dataset": source.dataset} if source.dataset is not None else {"path": source.path}
        return load_dataset_prompts(
            **location,
            subset=source.subset,
            split=source.split,
            format=source.format,
            text_field=source.text_field,
            id_field=source.id_field,
            messages_field=source.messages_field,
            metadata_fields=fields,
        )
    return load_gsm8k(source.path, metadata_fields=fields)


def _unit_hash(prompt_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
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


def run_split(source: PromptSource, run_seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, held_out)`` of a run's prompt source: :func:`split_prompts` with the source's
    ``eval_fraction`` and ``split_seed`` (``run_seed``, the run's ``run.seed``, when unset), so that the
    generators, ``streamrl eval`` and the benches agree on which prompts are never trained on.

    Raises:
        OSError, ValueError: the source cannot be read (:func:`load_prompts`).
    """
    seed = run_seed if source.split_seed is None else source.split_seed
    return split_prompts(load_prompts(source), eval_fraction=source.eval_fraction, seed=seed)


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
    def __init__(
        self,
        prompts: Sequence[InstanceOf[Prompt]],
        *,
        seed: NonNegativeInt,
        shard: NonNegativeInt = 0,
        num_shards: PositiveInt = 1,
    ) -> None:
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
