"""The buffer's write-ahead journal: what the buffer accepted survives a crash.

The buffer writes every state change to an append-only log *before* acting on
it (counting, serving, acknowledging), and rebuilds its state from the log
when it starts. Recovery gives back the groups it held, in their serve order,
with their serve counts, plus the batch it last served that the learner has
not yet acknowledged.

Files in the journal directory:

* ``segment-000001.log``, ``segment-000002.log``, ...: the log, in order. A
  new segment starts when the current one passes ``segment_bytes``. When more
  than ``max_segments`` exist, the journal is *compacted*: the live state is
  written to a fresh segment (a snapshot) and the older segments are deleted,
  so disk use stays below about ``(max_segments + 1) * segment_bytes`` plus
  one snapshot (which is bounded by the buffer's capacity).
* ``history.jsonl`` (only with ``keep_history``): an audit trail of every
  event's rollout ids, appended from segments before compaction deletes
  them (ids only, about 60 bytes per rollout per event). Tests use it as
  the ledger that proves nothing accepted was lost.

Record layout (little-endian): ``u32 length | u32 crc32(type + payload) | u8
type | payload``. Payloads are msgpack; messages are stored as their wire
frames (``streamrl.common.messages.encode``), so the journal needs no second format.
A torn or corrupt record (crash mid-write, bad crc) ends a segment: it and
everything after it in that segment are ignored and counted.

Record types:

* ``ACCEPT`` ``[frames]``: one accepted :class:`~streamrl.common.messages.ScoredRollout`.
* ``REMOVE`` ``{"event", "ids"}``: ids dropped as stale or evicted.
* ``SERVE`` ``{"ids", "version", "batch", "owner"}``: a batch served to the learner
  (its frames) process ``owner`` (the version that learner process started at; -1:
  an old learner that states none); every id's serve count goes up by one and its group
  goes to the back of the FIFO (or leaves at ``max_reuse``); the batch is held
  *unacknowledged* until the learner states it durably trained it.
* ``RESTAMP`` ``{"version", "from", "owner"}``: the held batch served for version
  ``from`` now stands for ``version`` and belongs to ``owner`` (served again, or
  marked lost: ``owner`` = -2). Without ``from`` (older journals): the newest held batch.
* ``ACK`` ``{"version"}``: the held batch served for this version was durably trained
  (checkpointed); it is forgotten.
* ``SERVED`` ``{"ids", "served"}``: (snapshots only) the serve count of a group.
* ``UNACKED`` ``{"ids", "batch", "owner"}``: (snapshots only) one held batch, oldest first.
* ``BEGIN`` ``{"segment", "previous", "snapshot"}``: the first record of every segment:
  its number, the number of the segment it continues (None for the first segment and
  for snapshots, which depend on nothing before them) and whether it is a snapshot.
* ``SNAPSHOT_END`` ``{}``: the last record of a complete snapshot.

Recovery replays from the newest complete snapshot (older segments are superseded;
they exist only when a compaction was interrupted before deleting them) through the
newest segment. **Damage is never skipped silently.** A torn or corrupt record at the
very end of the newest segment is what a crash mid-write leaves: it is ignored and
counted. Anything else (a bad record with intact records after it, a bad record in an
older segment, a missing segment: a gap in the numbers or a segment whose predecessor
is gone) raises :class:`JournalDamaged`, and the buffer refuses to start. With
``repair=True`` (``buffer.journal_repair``, an operator's explicit decision) recovery
goes on: each damaged segment is moved to ``damaged/`` in the journal folder (never
deleted), and every group that has a member accepted before the lost records is
*quarantined* (not served, counted), because a record that removed it or served it
may be among those lost: replay never brings back a rollout whose removal or training
was recorded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import msgpack

from streamrl.common.errors import StartupRefused
from streamrl.common.messages import Batch, ProtocolError, ScoredRollout, decode, encode
from streamrl.common.modes import FsyncPolicy

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIB")
"""length (u32), crc32 (u32), record type (u8)."""
SEGMENT_PATTERN = re.compile(r"segment-(\d{6})\.log")


class RecordType(IntEnum):
    """Journal record types (see the module docstring)."""

    ACCEPT = 1
    REMOVE = 2
    SERVE = 3
    RESTAMP = 4
    ACK = 5
    SERVED = 6
    UNACKED = 7
    BEGIN = 8
    SNAPSHOT_END = 9


MARKERS = (RecordType.BEGIN, RecordType.SNAPSHOT_END)
"""Record types that frame segments; they carry no buffer state."""


class JournalError(RuntimeError):
    """The journal directory cannot be used (e.g. not writable)."""


class JournalDamaged(StartupRefused):
    """The journal lost records somewhere other than a torn tail; the message names the file and the fix."""


@dataclass
class RecoveredGroup:
    """A group held at the time of the crash.

    Attributes:
        members: the accepted members, in arrival order.
        served: times the group was served (< ``max_reuse``).
        order: position in the buffer's serve order (smaller = sooner).
    """

    members: list[ScoredRollout]
    served: int = 0
    order: int = 0


@dataclass
class HeldBatch:
    """A batch served to the learner and not yet durably trained (see ``services/buffer/durable.py``).

    Attributes:
        batch: the batch as served (``learner_version`` = the version it was last served for).
        owner: the learner process it was served to, named by the version that process
            started at (``BatchRequest.resumed_at``); :data:`LOST` once that process died
            before checkpointing it (it must be served again); -1 for a learner that states none.
    """

    batch: Batch
    owner: int = -1


LOST = -2
"""``HeldBatch.owner`` of a batch whose learner process died before checkpointing it."""


@dataclass
class Recovered:
    """What :meth:`Journal.recover` found.

    Attributes:
        groups: the groups held, in serve order (incomplete groups included).
        held: the batches served and not yet durably trained, oldest first.
        unacknowledged: the newest of them, or None.
        records: state records read (segment markers not counted).
        bad_records: torn or corrupt records skipped (each ends its segment).
        torn_rollouts: rollouts lost in a torn tail (an accept record cut mid-write: at most 1).
        damage: what was lost other than a torn tail (only with ``repair``; else JournalDamaged).
        quarantined: rollouts held back because records about them may be lost (``repair`` only).
    """

    groups: list[RecoveredGroup] = field(default_factory=list)
    held: list[HeldBatch] = field(default_factory=list)
    unacknowledged: Batch | None = None
    records: int = 0
    bad_records: int = 0
    torn_rollouts: int = 0
    damage: list[str] = field(default_factory=list)
    quarantined: int = 0

    @property
    def rollouts(self) -> int:
        """Rollouts held, over all groups."""
        return sum(len(g.members) for g in self.groups)


def _held(payload: dict) -> HeldBatch:
    """The :class:`HeldBatch` of a ``SERVE`` or ``UNACKED`` payload (no ``owner``: an older journal, -1)."""
    return HeldBatch(decode(payload["batch"], expected=[Batch]), int(payload.get("owner", -1)))


def _find(held: list[tuple[HeldBatch, int]], version: int | None, *, exact: bool = False) -> int | None:
    """Index of the held batch served for ``version`` (None: the newest, unless ``exact``), or None."""
    if version is None:
        return None if exact or not held else len(held) - 1
    return next((i for i, (h, _) in enumerate(held) if h.batch.learner_version == version), None)


def _pack_frames(frames: Sequence) -> list[bytes]:
    return [bytes(f) for f in frames]


def _segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob("segment-*.log"):
        m = SEGMENT_PATTERN.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _record_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """``(kind, end)`` of an intact record starting at byte ``pos``, or None (torn or corrupt)."""
    if len(data) - pos < HEADER.size:
        return None
    length, crc, kind = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if end > len(data) or kind not in RecordType._value2member_map_:
        return None
    if zlib.crc32(bytes([kind]) + data[pos + HEADER.size : end]) != crc:
        return None
    return kind, end


def _intact_record_after(data: bytes, pos: int) -> int | None:
    """Offset of the first intact record after byte ``pos`` (a resync scan), or None."""
    for candidate in range(pos + 1, len(data) - HEADER.size + 1):
        if _record_at(data, candidate) is not None:
            return candidate
    return None


class TornTail(str):
    """The reason :func:`read_records` gives for a torn tail (a ``str``), with ``rollouts``: how many it lost."""

    rollouts: int = 0


def torn_tail(data: bytes, pos: int) -> TornTail:
    """What the torn record starting at byte ``pos`` held, in records and rollouts (not bytes).

    A torn tail is the one record a crash cut mid-write: its header (9 bytes) says its type when it
    survived. An ``ACCEPT`` record is one rollout never committed (nor counted as accepted); a
    removal or serve record loses an event about rollouts the journal still holds (they stay held).
    """
    where = f"torn tail at byte {pos} of {len(data)}"
    rollouts = 1
    if len(data) - pos < HEADER.size:
        what = "1 record of unknown type lost (its header is torn too): at most 1 rollout"
    elif (kind := HEADER.unpack_from(data, pos)[2]) == RecordType.ACCEPT:
        what = "1 record lost (accept): 1 rollout never accepted"
    elif kind in RecordType.__members__.values():
        what, rollouts = (
            f"1 record lost ({RecordType(kind).name.lower()}): 0 rollouts (an event about rollouts still held)",
            0,
        )
    else:
        what = f"1 record of unknown type {kind} lost: at most 1 rollout"
    reason = TornTail(f"{where}: {what}")
    reason.rollouts = rollouts
    return reason


def read_records(path: Path) -> Iterator[tuple[RecordType | None, Any]]:
    """Yield ``(type, payload)`` of each intact record of one segment, in order (``payload``: the
    record's msgpack value, as decoded).

    Stops at the first torn or corrupt record and then yields ``(None, reason)``
    once, ``reason`` a str (the caller counts it) that starts with ``"torn tail"``
    when no intact record follows (a crash mid-write; a :class:`TornTail` saying the
    records and rollouts lost) and with ``"corrupt"`` when
    intact records follow (damage: they and the bad record are not read).
    """
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        found = _record_at(data, pos)
        if found is None:
            later = _intact_record_after(data, pos)
            if later is None:
                yield None, torn_tail(data, pos)
            else:
                yield None, f"corrupt record at byte {pos}, intact records from byte {later} on"
            return
        kind, end = found
        yield RecordType(kind), msgpack.unpackb(data[pos + HEADER.size : end], raw=False)
        pos = end


class Journal:
    """Append-only, segmented, compacted log of the buffer's state changes.

    Args:
        directory: where segments live (created if missing).
        fsync: :class:`~streamrl.common.modes.FsyncPolicy`.
        fsync_interval_s: for ``interval``: seconds between fsyncs.
        segment_bytes: a new segment starts past this size, in bytes.
        max_segments: compaction runs when more segments exist.
        keep_history: append every event's ids to ``history.jsonl`` before
            compaction deletes a segment (an audit ledger; grows without bound).
        max_reuse: K of the buffer, used by recovery to retire served groups.

    Raises:
        JournalError: the directory cannot be created or written.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: FsyncPolicy,
        fsync_interval_s: float = 1.0,
        segment_bytes: int = 64 * 1024 * 1024,
        max_segments: int = 4,
        keep_history: bool = False,
        max_reuse: int = 1,
    ):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise JournalError(f"cannot create journal directory {self.directory}: {err}") from err
        self.fsync_policy = FsyncPolicy(fsync)
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes
        self.max_segments = max_segments
        self.keep_history = keep_history
        self.max_reuse = max_reuse
        self._fd: int | None = None
        self._segment = 0
        self._segment_size = 0
        self._dirty = False
        self._last_fsync = time.monotonic()
        self.bytes_written = 0
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        self.compactions = 0
        self._damaged: list[Path] = []

    # ------------------------------------------------------------------ writing

    def accept(self, frames: Sequence) -> None:
        """Log one accepted scored rollout, given its wire frames."""
        self._append(RecordType.ACCEPT, _pack_frames(frames))

    def remove(self, event: str, ids: list[str]) -> None:
        """Log ids dropped as stale (``dropped_stale``) or evicted (``evicted``)."""
        self._append(RecordType.REMOVE, {"event": event, "ids": ids})

    def serve(self, batch: Batch, owner: int = -1) -> None:
        """Log a batch served to learner process ``owner`` (it is held until acknowledged)."""
        ids = [s.rollout.rollout_id for s in batch.rollouts]
        self._append(
            RecordType.SERVE,
            {"ids": ids, "version": batch.learner_version, "batch": _pack_frames(encode(batch)), "owner": owner},
        )

    def restamp(self, version: int, *, from_version: int | None = None, owner: int = -1) -> None:
        """Log that the held batch served for ``from_version`` (None: the newest) now stands for
        ``version`` and belongs to ``owner`` (:data:`LOST`: to be served again)."""
        payload = {"version": version, "owner": owner}
        if from_version is not None:
            payload["from"] = from_version
        self._append(RecordType.RESTAMP, payload)

    def ack(self, version: int) -> None:
        """Log that the learner durably trained the held batch served for ``version``."""
        self._append(RecordType.ACK, {"version": version})

    def commit(self, *, force: bool = False) -> None:
        """Make appended records durable according to the fsync policy (``force``: always fsync)."""
        if not self._dirty or self._fd is None:
            return
        now = time.monotonic()
        due = {
            FsyncPolicy.ALWAYS: True,
            FsyncPolicy.INTERVAL: now - self._last_fsync >= self.fsync_interval_s,
            FsyncPolicy.NEVER: False,
        }[self.fsync_policy]
        if due or force:
            start = time.perf_counter()
            os.fsync(self._fd)
            self.fsync_seconds += time.perf_counter() - start
            self.fsyncs += 1
            self._last_fsync = now
            self._dirty = False

    def needs_compaction(self) -> bool:
        """True when more than ``max_segments`` segments exist."""
        return self._segment > 0 and len(_segments(self.directory)) > self.max_segments

    def compact(self, groups: list[RecoveredGroup], unacknowledged: Batch | list[HeldBatch] | None) -> None:
        """Write the live state as a snapshot segment, then delete the older segments.

        Args:
            groups: the groups held now, in serve order (see ``ReplayBuffer.snapshot``).
            unacknowledged: the held batches awaiting the learner's acknowledgement, oldest first
                (one batch or None: an owner of -1).
        """
        old = _segments(self.directory)
        self._open_segment((old[-1][0] if old else 0) + 1, snapshot=True)
        for group in groups:
            for member in group.members:
                self.accept(encode(member))
            if group.served:
                self._append(
                    RecordType.SERVED, {"ids": [m.rollout.rollout_id for m in group.members], "served": group.served}
                )
        if isinstance(unacknowledged, Batch):
            unacknowledged = [HeldBatch(unacknowledged)]
        for held in unacknowledged or []:
            self._append(
                RecordType.UNACKED,
                {
                    "ids": [s.rollout.rollout_id for s in held.batch.rollouts],
                    "batch": _pack_frames(encode(held.batch)),
                    "owner": held.owner,
                },
            )
        self._append(RecordType.SNAPSHOT_END, {})
        self.commit(force=True)
        if self.keep_history:
            self._archive([path for _, path in old])
        for _, path in old:
            path.unlink(missing_ok=True)
        self._fsync_directory()
        self.compactions += 1

    def close(self) -> None:
        """Flush (fsync) and close the current segment."""
        if self._fd is not None:
            self.commit(force=True)
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ reading

    def recover(self, *, repair: bool = False) -> Recovered:
        """Rebuild the buffer's state from the segments on disk (see :meth:`compact` and the module docstring).

        Args:
            repair: go on past damage: move damaged segments to ``damaged/`` and quarantine the groups
                whose records may be lost. Without it recovery changes nothing on disk.

        Raises:
            JournalDamaged: records were lost other than at the torn tail of the newest segment
                (without ``repair``); the message names each problem and the fix.
        """
        result = Recovered()
        lost_before = 0  # groups with a member accepted at a position below this are quarantined
        live: OrderedDict[str, RecoveredGroup] = OrderedDict()  # group_id -> group
        group_of: dict[str, str] = {}  # rollout_id -> group_id
        accepted_at: dict[str, int] = {}  # rollout_id -> replay position of its ACCEPT
        held: list[tuple[HeldBatch, int]] = []  # (batch, replay position of its SERVE/UNACKED record)
        position = 0

        def retire(group_id: str) -> None:
            group = live.pop(group_id, None)
            for m in group.members if group else ():
                group_of.pop(m.rollout.rollout_id, None)

        for kind, payload in self._replay(result):
            position += 1
            if kind is None:  # records were lost here: everything accepted so far is in doubt
                lost_before = position
                continue
            try:
                if kind is RecordType.ACCEPT:
                    item = decode(payload, expected=[ScoredRollout])
                    r = item.rollout
                    group = live.get(r.group_id)
                    if group is None:
                        group = live[r.group_id] = RecoveredGroup(members=[], order=position)
                    group.members.append(item)
                    group_of[r.rollout_id] = r.group_id
                    accepted_at[r.rollout_id] = position
                    if len(group.members) == r.group_size:
                        group.order = position  # complete groups queue in completion order
                elif kind is RecordType.REMOVE:
                    for group_id in {group_of[i] for i in payload["ids"] if i in group_of}:
                        retire(group_id)
                elif kind is RecordType.SERVE:
                    for group_id in dict.fromkeys(group_of[i] for i in payload["ids"] if i in group_of):
                        group = live[group_id]
                        group.served += 1
                        group.order = position
                        if group.served >= self.max_reuse:
                            retire(group_id)
                    held.append((_held(payload), position))
                elif kind is RecordType.UNACKED:
                    held.append((_held(payload), position))
                elif kind is RecordType.RESTAMP and held:
                    at = _find(held, payload.get("from"))
                    if at is not None:
                        entry = held.pop(at)
                        entry[0].batch.learner_version = int(payload["version"])
                        entry[0].owner = int(payload.get("owner", entry[0].owner))
                        held.append(entry)  # held batches stay in the order they were last served
                elif kind is RecordType.ACK:
                    at = _find(held, payload.get("version"), exact=True)
                    if at is not None:
                        held.pop(at)
                elif kind is RecordType.SERVED:
                    for group_id in {group_of[i] for i in payload["ids"] if i in group_of}:
                        live[group_id].served = int(payload["served"])
            except (ProtocolError, KeyError, TypeError, ValueError) as err:
                result.bad_records += 1
                log.warning("journal: unreadable %s record (%s); skipped", kind.name, err)
        if result.damage and not repair:
            raise JournalDamaged(
                f"buffer journal {self.directory} is damaged: "
                + "; ".join(result.damage)
                + ". Records were lost, so replay could serve rollouts that were already trained or removed. "
                "fix: restore the folder from a backup, or start with buffer.journal_repair = true to move the "
                "damaged segments to damaged/ (kept, never deleted) and quarantine every group the lost records "
                "may have concerned"
            )
        for group_id, group in list(live.items()):
            if min(accepted_at[m.rollout.rollout_id] for m in group.members) < lost_before:
                result.quarantined += len(group.members)
                retire(group_id)
        if result.damage:  # repair: keep the damaged files aside, never delete them
            moved = self.move_damaged()
            log.error(
                "journal repaired: %s; moved aside: %s; quarantined %d rollouts accepted before the lost "
                "records (not served)",
                "; ".join(result.damage),
                [str(m) for m in moved] or "nothing",
                result.quarantined,
            )
        result.groups = sorted(live.values(), key=lambda g: g.order)
        result.held = [h for h, at in held if not (lost_before and at < lost_before)]
        result.unacknowledged = result.held[-1].batch if result.held else None
        return result

    def history(self) -> Iterator[tuple[str, list[str]]]:
        """Every ``(event, rollout_ids)`` still on disk: ``history.jsonl`` then the segments.

        Events: ``accepted``, ``dropped_stale``, ``evicted``, ``sampled``, ``acked``
        (the ids of the acknowledged batch). Snapshot segments repeat the
        ``accepted`` of live items, so treat ids as sets.
        """
        path = self.directory / "history.jsonl"
        if path.exists():
            with path.open() as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        yield entry["event"], entry["ids"]
        yield from self._events([p for _, p in _segments(self.directory)])

    # ------------------------------------------------------------------ internals

    def _replay(self, result: Recovered) -> Iterator[tuple[RecordType | None, Any]]:
        """State records from the newest complete snapshot on; ``(None, reason)`` where records were lost.

        Appends each loss other than a torn tail of the newest segment to ``result.damage`` and,
        when the caller repairs, that is what it quarantines against (it moves nothing itself:
        :meth:`recover` raises before anything changes on disk without ``repair``).
        """
        segments = _segments(self.directory)
        start = self._newest_snapshot(segments)
        replay = segments[start:]
        if replay:
            first_number, first_path = replay[0]
            begin = self._begin(first_path)
            if begin is not None and begin.get("previous") is not None:
                result.damage.append(f"segment {begin['previous']:06d} before {first_path.name} is missing")
                yield None, "missing predecessor"
        previous_number = None
        for index, (number, path) in enumerate(replay):
            if previous_number is not None and number != previous_number + 1:
                result.damage.append(f"segments {previous_number + 1:06d}..{number - 1:06d} are missing")
                yield None, "gap"
            previous_number = number
            newest = index == len(replay) - 1
            for kind, payload in read_records(path):
                if kind is None:
                    result.bad_records += 1
                    if newest and str(payload).startswith("torn tail"):
                        result.torn_rollouts += payload.rollouts
                        log.warning("journal %s: %s (a crash mid-write); ignored", path.name, payload)
                    else:
                        result.damage.append(f"{path.name}: {payload}")
                        log.error("journal %s: %s", path.name, payload)
                        self._damaged.append(path)
                        yield None, payload
                    break
                if kind in MARKERS:
                    continue
                result.records += 1
                yield kind, payload

    def _newest_snapshot(self, segments: list[tuple[int, Path]]) -> int:
        """Index in ``segments`` of the newest complete snapshot (0 when none)."""
        for index in range(len(segments) - 1, -1, -1):
            begin = self._begin(segments[index][1])
            if begin is not None and begin.get("snapshot"):
                if any(kind is RecordType.SNAPSHOT_END for kind, _ in read_records(segments[index][1])):
                    return index
        return 0

    @staticmethod
    def _begin(path: Path) -> dict | None:
        """The BEGIN payload of a segment, or None (a journal written before BEGIN records, or damaged)."""
        for kind, payload in read_records(path):
            return payload if kind is RecordType.BEGIN else None
        return None

    def move_damaged(self) -> list[Path]:
        """Move the segments :meth:`recover` found damaged to ``damaged/`` (kept for inspection); returns
        the new paths."""
        moved = []
        if self._damaged:
            target = self.directory / "damaged"
            target.mkdir(exist_ok=True)
            for path in self._damaged:
                destination = target / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
                path.rename(destination)
                moved.append(destination)
            self._fsync_directory()
            self._damaged = []
        return moved

    def _events(self, paths: list[Path]) -> Iterator[tuple[str, list[str]]]:
        unacked: dict[int, list[str]] = {}  # version served for -> ids
        for path in paths:
            for kind, payload in read_records(path):
                if kind is None:
                    break
                if kind is RecordType.ACCEPT:
                    header = msgpack.unpackb(payload[0], raw=False)
                    yield "accepted", [header["rollout"]["rollout_id"]]
                elif kind is RecordType.REMOVE:
                    yield payload["event"], payload["ids"]
                elif kind is RecordType.SERVE:
                    unacked[payload["version"]] = payload["ids"]
                    yield "sampled", payload["ids"]
                elif kind is RecordType.UNACKED:
                    header = msgpack.unpackb(payload["batch"][0], raw=False)
                    unacked[header["learner_version"]] = payload["ids"]
                elif kind is RecordType.RESTAMP and unacked:
                    old = payload.get("from", next(reversed(unacked)))
                    if old in unacked:
                        unacked[payload["version"]] = unacked.pop(old)
                elif kind is RecordType.ACK:
                    yield "acked", unacked.pop(payload["version"], [])

    def _archive(self, paths: list[Path]) -> None:
        with (self.directory / "history.jsonl").open("a") as f:
            for event, ids in self._events(paths):
                f.write(json.dumps({"event": event, "ids": ids}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _append(self, kind: RecordType, payload: object) -> None:
        if self._fd is None:
            existing = _segments(self.directory)
            self._open_segment((existing[-1][0] if existing else 0) + 1)
        elif self._segment_size >= self.segment_bytes:
            self.commit(force=True)
            self._open_segment(self._segment + 1)
        assert self._fd is not None  # _open_segment opened one
        body = msgpack.packb(payload, use_bin_type=True)
        record = HEADER.pack(len(body), zlib.crc32(bytes([kind]) + body), kind) + body
        os.write(self._fd, record)
        self._segment_size += len(record)
        self.bytes_written += len(record)
        self._dirty = True

    def _open_segment(self, number: int, *, snapshot: bool = False) -> None:
        """Start segment ``number`` with its BEGIN record (a snapshot, or the continuation of ``number - 1``)."""
        continues = self._fd is not None or any(n < number for n, _ in _segments(self.directory))
        if self._fd is not None:
            self.commit(force=True)
            os.close(self._fd)
        path = self.directory / f"segment-{number:06d}.log"
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as err:
            raise JournalError(f"cannot write journal segment {path}: {err}") from err
        self._segment = number
        self._segment_size = os.fstat(self._fd).st_size
        self._fsync_directory()
        if self._segment_size == 0:
            self._append(
                RecordType.BEGIN,
                {
                    "segment": number,
                    "snapshot": snapshot,
                    "previous": number - 1 if continues and not snapshot else None,
                },
            )

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
