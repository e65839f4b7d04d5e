"""A measured per-process ledger: what one service replica did, in a small JSON counts file.

Prometheus counters die with a ``kill -9``; these counts survive it. Each replica owns
``<run.output_dir>/ledger/<service>-<index>.json`` (:func:`ledger_path`), a JSON object of
counts (rollouts sent, scored, dropped, accepted, ...) plus optional gauges (what the buffer
holds now). The file is replaced atomically (write a temporary file in the same folder, then
``os.replace``), so a reader sees the old counts or the new, never a torn file. A restarted
process with the same service and index continues from its file (the counts are the run's,
not the process's).

Write rate: :meth:`Ledger.add` writes at once by default (one small file write, tens of
microseconds, per rollout: negligible next to generating or scoring one); a ``kill -9``
leaves what was written in the page cache, so the counts are exact up to the instruction
between the work and the count. A caller that must count only what is durable elsewhere (the
buffer counts only what its journal committed) adds with ``flush=False`` and calls
:meth:`Ledger.flush` after its own commit. No fsync: a power loss is not what this measures.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

LEDGER_FOLDER = "ledger"


def ledger_path(output_dir: str | Path, service: str, index: int) -> Path:
    """``<output_dir>/ledger/<service>-<index>.json``."""
    return Path(output_dir) / LEDGER_FOLDER / f"{service}-{index}.json"


class Ledger:
    """Counts of one service replica, kept in ``path`` (None: in memory only, e.g. in unit tests).

    Raises:
        ValueError: ``path`` exists and is not a JSON object of counts (names the file and the fix).
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.counts: dict[str, int] = {}
        self.gauges: dict[str, object] = {}
        self._dirty = False
        self._warned = False
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
                self.counts = {str(k): int(v) for k, v in saved.get("counts", {}).items()}
            except (ValueError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"ledger file {path} is not a JSON object of counts ({err}); fix: delete it "
                    "(the run's measured ledger then starts from zero for this replica)"
                ) from None
            log.info("ledger: continuing from %s (%s)", path, self.counts)

    def add(self, key: str, n: int = 1, *, flush: bool = True) -> None:
        """Count ``n`` more ``key`` (e.g. ``sent``); written at once unless ``flush`` is False."""
        if n:
            self.counts[key] = self.counts.get(key, 0) + int(n)
            self._dirty = True
        if flush:
            self.flush()

    def set_gauge(self, key: str, value: object) -> None:
        """A value that is not a running count (what is held now); written with the next :meth:`flush`."""
        if self.gauges.get(key) != value:
            self.gauges[key] = value
            self._dirty = True

    def flush(self) -> None:
        """Replace the file atomically with the current counts when anything changed (no-op without a path).

        An ``OSError`` (a full disk) is logged once and not raised: the old file stays whole, the counts
        stay in memory and are written by the next flush that succeeds.
        """
        if self.path is None or not self._dirty:
            return
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"counts": self.counts, **self.gauges}, f)
            os.replace(tmp, self.path)
        except OSError as err:  # a full disk must not stop the service: the counts stay and are written later
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if not self._warned:
                log.warning(
                    "cannot write the ledger file %s (%s); counting on in memory, retrying at each count",
                    self.path,
                    err,
                )
                self._warned = True
            return
        self._dirty = False


def read_ledgers(output_dir: str | Path) -> dict[str, list[dict]]:
    """Every replica's ledger file under ``<output_dir>/ledger``, by service: ``{"generator": [file, ...]}``.

    A file that is not JSON is skipped with a warning (never happens with atomic replaces).
    """
    found: dict[str, list[dict]] = {}
    for path in sorted((Path(output_dir) / LEDGER_FOLDER).glob("*.json")):
        service = path.stem.rsplit("-", 1)[0]
        try:
            found.setdefault(service, []).append(json.loads(path.read_text()))
        except ValueError as err:
            log.warning("ledger file %s unreadable (%s); not counted", path, err)
    return found
