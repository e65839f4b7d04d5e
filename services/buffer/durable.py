"""The buffer service's state without its sockets: admission, the journal, the batch protocol.

:class:`DurableBuffer` joins the :class:`~streamrl.services.buffer.store.ReplayBuffer`
to its :class:`~streamrl.services.buffer.journal.Journal` (optional) and keeps the
two pieces of state the learner protocol needs:

* **Write-ahead journal.** An accepted rollout is journaled, with the wire frames it
  arrived in, *before* the store changes (the store's :meth:`admission` tells what
  :meth:`add` will answer); removals (dropped stale, evicted) are journaled from the
  store's ledger events; a served batch is journaled and committed before it is sent.
* **Acknowledgement.** A served batch is *held* until the learner states it was
  durably trained: each request carries ``durable_version`` (the version of the
  learner's newest checkpoint) and ``resumed_at`` (the version its process started
  at, which names the process). A held batch served for a version older than
  ``durable_version`` is acknowledged (forgotten). A request for a version the
  process was already served (the batch was lost in transit) gets that batch again.
  When a new learner process asks, the batches served to the previous one that its
  checkpoint does not cover were trained by a process that died before checkpointing
  them: they are marked *lost* and served again, oldest first and each restamped with
  the requesting version, before any new data (``checkpoint_every > 1`` loses nothing).
  A request from an older learner (no ``durable_version``) keeps the old rule: a
  request for a newer version acknowledges, one for the same or an older version
  gets the batch again. A batch the learner refused entirely (``refused_batch``) is
  journaled as removed (``refused``) and forgotten, so it is not served forever.
* **Pending request.** A request that cannot be served yet (too few complete groups)
  is kept, the newest replacing an older one, and served as soon as it can be.

Route ids are the ROUTER's opaque identity frames; nothing here touches a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from streamrl.common.config import Config
from streamrl.common.ledger import Ledger
from streamrl.common.messages import Batch, BatchRequest, ScoredRollout
from streamrl.common.service import journal_folder
from streamrl.services.buffer.journal import LOST, HeldBatch, Journal, Recovered, RecoveredGroup
from streamrl.services.buffer.store import AddOutcome, BufferEvent, ReplayBuffer

log = logging.getLogger(__name__)


def open_journal(config: Config) -> Journal:
    """The buffer's journal as ``[buffer]`` configures it (fsync policy, segments, history, reuse), in
    :func:`~streamrl.common.service.journal_folder`; for the buffer and for ``streamrl`` commands that
    rewrite it offline (they hold the folder's run lock first)."""
    b = config.buffer
    return Journal(
        journal_folder(config),
        fsync=b.fsync,
        fsync_interval_s=b.fsync_interval_s,
        segment_bytes=b.segment_bytes,
        max_segments=b.max_segments,
        keep_history=b.keep_history,
        max_reuse=b.max_reuse,
    )


def admission_capacity(capacity_groups: int, groups_per_step: int, max_staleness: int) -> int:
    """Groups the buffer may hold: never more than the learner consumes within
    ``max_staleness + 1`` versions (AReaL's admission control, Fu et al. 2025, sec. 4),
    so a full buffer does not just age into stale drops while producers keep sampling;
    never less than one batch."""
    return max(groups_per_step, min(capacity_groups, groups_per_step * (max_staleness + 1)))


class DurableBuffer:
    """The store, its journal and the learner protocol of one buffer process (module docstring).

    Args:
        store: the replay buffer; its ledger hook is set here (it must have none).
        journal: the write-ahead journal, or None (``buffer.journal = false``: nothing survives a crash).
        ledger: the buffer's measured counts (:mod:`streamrl.common.ledger`): each store event
            (``accepted``, ``dropped_stale``, ``evicted``, ``reward_failed``), ``refused`` (rollouts
            not admitted), ``learner_refused``, and the gauges ``held`` (rollouts in groups) and
            ``served_unacked_ids`` (rollouts of batches served and not yet acknowledged), written
            after each journal commit so they never count what the journal could still lose.

    Raises:
        ValueError: ``store`` already has a ledger hook.
    """

    def __init__(self, store: ReplayBuffer, journal: Journal | None, ledger: Ledger | None = None):
        if store.on_event is not None:
            raise ValueError("the store already has a ledger hook; DurableBuffer journals its events")
        self.store = store
        self.journal = journal
        self.ledger = ledger if ledger is not None else Ledger()
        store.on_event = self._on_event
        self.held: list[HeldBatch] = []  # served, not yet durably trained; oldest first
        self.pending: tuple[bytes, BatchRequest] | None = None

    # ------------------------------------------------------------------ producers

    def add(self, item: ScoredRollout, frames: Sequence) -> AddOutcome:
        """Admit a scored rollout received as ``frames`` (journaled write-ahead when accepted).

        The journal is made durable by :meth:`commit`, which the caller runs before anything
        accepted is counted or served.
        """
        if self.journal is not None and self.store.admission(item) is AddOutcome.ACCEPTED:
            self.journal.accept(frames)
        outcome = self.store.add(item)
        if outcome is not AddOutcome.ACCEPTED:
            self.ledger.add("refused", flush=False)
        return outcome

    def drop_group(self, group_id: str) -> int:
        """A scorer dropped ``group_id`` (its reward raised on a member): what is held of it is evicted
        (journaled as removed, event ``reward_failed``) and its later members are refused
        (:meth:`ReplayBuffer.drop_group`). Returns the rollouts evicted. Made durable by :meth:`commit`."""
        return self.store.drop_group(group_id)

    def commit(self) -> None:
        """Make what was journaled durable (per the journal's fsync policy), then write the measured ledger."""
        if self.journal is not None:
            self.journal.commit()
        self._flush_ledger()

    # ------------------------------------------------------------------ the learner

    @property
    def unacked(self) -> Batch | None:
        """The newest held batch (served, not yet durably trained), or None."""
        return self.held[-1].batch if self.held else None

    def take_request(self, route: bytes, request: BatchRequest) -> Batch | None:
        """Handle a batch request from ``route`` (the protocol in the module docstring).

        Returns:
            A held batch to send now (lost in transit, or lost with a learner process that
            died before checkpointing it), or None: the request is kept pending for new data.

        Raises:
            ValueError: the request asks for more groups than the buffer ever holds (it could never be met).
        """
        if request.num_groups > self.store.capacity_groups:
            raise ValueError(f"{request.num_groups} groups > capacity {self.store.capacity_groups}")
        legacy = request.durable_version < 0
        durable = request.learner_version if legacy else request.durable_version
        refused = next(
            (h for h in self.held if request.refused_batch and h.batch.msg_id == request.refused_batch), None
        )
        if refused is not None:  # every rollout failed the learner's checks: recorded, never served again
            if self.journal is not None:
                self.journal.remove("refused", [s.rollout.rollout_id for s in refused.batch.rollouts])
            self.ledger.add("learner_refused", len(refused.batch.rollouts), flush=False)
            self.acknowledge(refused)
        for held in list(self.held):
            if held.owner == LOST:
                continue  # only serving it again makes it trainable, and only a checkpoint after that durable
            if held.batch.learner_version < durable:
                self.acknowledge(held)
            elif not legacy and held.owner != request.resumed_at:
                self._restamp(held, held.batch.learner_version, LOST)  # its process died before checkpointing it
                log.warning(
                    "the learner restarted (now at version %d, checkpoint %d): the batch served for version "
                    "%d was not checkpointed and will be served again",
                    request.learner_version,
                    request.durable_version,
                    held.batch.learner_version,
                )
        owner = -1 if legacy else request.resumed_at
        again = next(
            (h for h in self.held if h.owner == owner and h.batch.learner_version >= request.learner_version), None
        ) or next((h for h in self.held if h.owner == LOST), None)
        if again is not None:
            return self.serve_again(request, again)
        self.pending = (route, request)  # a newer request replaces an older unanswered one
        return None

    def acknowledge(self, held: HeldBatch | None = None) -> None:
        """Forget ``held`` (default: the newest held batch): the learner durably trained it."""
        held = held or (self.held[-1] if self.held else None)
        if held is None:
            return
        if self.journal is not None:
            self.journal.ack(held.batch.learner_version)
        self.held.remove(held)

    def serve_again(self, request: BatchRequest, held: HeldBatch | None = None) -> Batch:
        """``held`` (default: the newest held batch) restamped with ``request``'s version and owner
        (journaled and committed), with a new ``sent_at``.

        Raises:
            RuntimeError: there is no held batch.
        """
        held = held or (self.held[-1] if self.held else None)
        if held is None:
            raise RuntimeError("no unacknowledged batch to serve again")
        batch = held.batch
        log.info(
            "learner asked for version %d; serving the held batch of version %d again",
            request.learner_version,
            batch.learner_version,
        )
        owner = -1 if request.durable_version < 0 else request.resumed_at
        if batch.learner_version != request.learner_version or held.owner != owner:
            self._restamp(held, request.learner_version, owner)
        self.commit()
        batch.sent_at = time.time()
        return batch

    def _restamp(self, held: HeldBatch, version: int, owner: int) -> None:
        """``held`` now stands for ``version`` and belongs to ``owner`` (journaled; it becomes the newest
        held batch)."""
        if self.journal is not None:
            self.journal.restamp(version, from_version=held.batch.learner_version, owner=owner)
        held.batch.learner_version, held.owner = version, owner
        self.held.remove(held)
        self.held.append(held)

    def serve_pending(self, sender: str) -> tuple[bytes, Batch] | None:
        """Serve the pending request if enough complete groups are held.

        Returns:
            ``(route, batch)`` to send, or None (no request pending, or too few groups yet).
        """
        if self.pending is None:
            return None
        route, request = self.pending
        batch = self.serve(
            request.num_groups,
            request.learner_version,
            sender,
            owner=-1 if request.durable_version < 0 else request.resumed_at,
        )
        if batch is None:
            return None
        self.pending = None
        return route, batch

    def serve(self, num_groups: int, learner_version: int, sender: str, owner: int = -1) -> Batch | None:
        """Sample ``num_groups`` groups for ``learner_version`` into a batch held for learner process
        ``owner`` until acknowledged (journaled and committed); None when too few complete groups are held."""
        sample = self.store.sample(num_groups, learner_version)
        if sample is None:
            return None
        batch = Batch(
            sender=sender,
            learner_version=learner_version,
            rollouts=sample.rollouts,
            dropped_stale=sample.dropped_stale,
            evicted=sample.evicted,
            buffered_groups=sample.buffered_groups,
        )
        if self.journal is not None:
            self.journal.serve(batch, owner)
            self.journal.commit()
        self.held.append(HeldBatch(batch, owner))
        return batch

    # ------------------------------------------------------------------ durability

    def recover(self, *, repair: bool = False) -> Recovered:
        """Rebuild the store and the unacknowledged batch from the journal, then compact it.

        ``repair``: go on past a damaged journal (``buffer.journal_repair``; see :meth:`Journal.recover`).

        Raises:
            RuntimeError: there is no journal.
        """
        if self.journal is None:
            raise RuntimeError("no journal to recover from")
        recovered = self.journal.recover(repair=repair)
        self.store.restore([(g.members, g.served) for g in recovered.groups])
        self.held = list(recovered.held)
        if recovered.records:
            log.info(
                "recovered %d rollouts in %d groups from %s (%d records, %d bad, %d rollouts lost in a torn tail)%s",
                recovered.rollouts,
                len(recovered.groups),
                self.journal.directory,
                recovered.records,
                recovered.bad_records,
                recovered.torn_rollouts,
                f"; batches for versions {[h.batch.learner_version for h in self.held]} await acknowledgement"
                if self.held
                else "",
            )
        self.compact()
        return recovered

    def compact(self) -> None:
        """Rewrite the journal as one snapshot of what is held now (no-op without a journal)."""
        if self.journal is not None:
            groups = [RecoveredGroup(members=members, served=served) for members, served in self.store.snapshot()]
            self.journal.compact(groups, self.held)

    def housekeeping(self) -> None:
        """Periodic work: expire incomplete groups, make the journal durable, compact it when due."""
        self.store.expire()
        if self.journal is not None:
            self.journal.commit()
            if self.journal.needs_compaction():
                self.compact()
        self._flush_ledger()

    def close(self) -> None:
        """Close the journal (fsync: a clean stop leaves everything on disk)."""
        if self.journal is not None:
            self.journal.close()
            log.info("journal flushed: %d rollouts held in %s", self.store.held_rollouts, self.journal.directory)
        self._flush_ledger()

    def _flush_ledger(self) -> None:
        """Write the measured counts and what is held now (after the journal made them durable)."""
        self.ledger.set_gauge("held", self.store.held_rollouts)
        self.ledger.set_gauge(
            "served_unacked_ids", sorted(s.rollout.rollout_id for h in self.held for s in h.batch.rollouts)
        )
        self.ledger.flush()

    def _on_event(self, event: BufferEvent, rollout_ids: list[str]) -> None:
        """The store's ledger hook: each event is counted (written with the next commit), removals go
        to the journal. ``ACCEPTED`` was journaled write-ahead by :meth:`add`; ``SAMPLED`` is journaled
        with the whole batch by :meth:`serve`."""
        if event is not BufferEvent.SAMPLED:
            self.ledger.add(event.value, len(rollout_ids), flush=False)
        if self.journal is None:
            return
        if event in (BufferEvent.DROPPED_STALE, BufferEvent.EVICTED, BufferEvent.REWARD_FAILED):
            self.journal.remove(event.value, rollout_ids)
