"""The buffer service's state without its sockets: admission, the journal, the batch protocol.

:class:`DurableBuffer` joins the :class:`~streamrl.services.buffer.store.ReplayBuffer`
to its :class:`~streamrl.services.buffer.journal.Journal` (optional) and keeps the
two pieces of state the learner protocol needs:

* **Write-ahead journal.** An accepted rollout is journaled, with the wire frames it
  arrived in, *before* the store changes (the store's :meth:`admission` tells what
  :meth:`add` will answer); removals (dropped stale, evicted) are journaled from the
  store's ledger events; a served batch is journaled and committed before it is sent.
* **Acknowledgement.** The last batch served stays *unacknowledged* until a request
  for a newer version arrives (proof the learner trained on it). A request for the
  same or an older version (the learner restarted, or the batch was lost) gets that
  batch again, restamped with the requested version, instead of new data.
* **Pending request.** A request that cannot be served yet (too few complete groups)
  is kept, the newest replacing an older one, and served as soon as it can be.

Route ids are the ROUTER's opaque identity frames; nothing here touches a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from streamrl.common.messages import Batch, BatchRequest, ScoredRollout
from streamrl.services.buffer.journal import Journal, Recovered, RecoveredGroup
from streamrl.services.buffer.store import AddOutcome, BufferEvent, ReplayBuffer

log = logging.getLogger(__name__)


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

    Raises:
        ValueError: ``store`` already has a ledger hook.
    """

    def __init__(self, store: ReplayBuffer, journal: Journal | None):
        if store.on_event is not None:
            raise ValueError("the store already has a ledger hook; DurableBuffer journals its events")
        self.store = store
        self.journal = journal
        if journal is not None:
            store.on_event = self._journal_removal
        self.unacked: Batch | None = None
        self.pending: tuple[bytes, BatchRequest] | None = None

    # ------------------------------------------------------------------ producers

    def add(self, item: ScoredRollout, frames: Sequence) -> AddOutcome:
        """Admit a scored rollout received as ``frames`` (journaled write-ahead when accepted).

        The journal is made durable by :meth:`commit`, which the caller runs before anything
        accepted is counted or served.
        """
        if self.journal is not None and self.store.admission(item) is AddOutcome.ACCEPTED:
            self.journal.accept(frames)
        return self.store.add(item)

    def commit(self) -> None:
        """Make what was journaled durable (per the journal's fsync policy); no-op without a journal."""
        if self.journal is not None:
            self.journal.commit()

    # ------------------------------------------------------------------ the learner

    def take_request(self, route: bytes, request: BatchRequest) -> Batch | None:
        """Handle a batch request from ``route``.

        Returns:
            The unacknowledged batch to send again now (a request for the same or an older
            version), or None: the request is kept pending (a request for a newer version
            first acknowledges the unacknowledged batch).

        Raises:
            ValueError: the request asks for more groups than the buffer ever holds (it could never be met).
        """
        if request.num_groups > self.store.capacity_groups:
            raise ValueError(f"{request.num_groups} groups > capacity {self.store.capacity_groups}")
        if self.unacked is not None:
            if request.learner_version <= self.unacked.learner_version:
                return self.serve_again(request)
            self.acknowledge()
        self.pending = (route, request)  # a newer request replaces an older unanswered one
        return None

    def acknowledge(self) -> None:
        """The learner asked for a newer version: it trained on the unacknowledged batch, which is forgotten."""
        if self.unacked is None:
            return
        if self.journal is not None:
            self.journal.ack(self.unacked.learner_version)
        self.unacked = None

    def serve_again(self, request: BatchRequest) -> Batch:
        """The unacknowledged batch, restamped with ``request``'s version (journaled and committed) and a new ``sent_at``.

        Raises:
            RuntimeError: there is no unacknowledged batch.
        """
        batch = self.unacked
        if batch is None:
            raise RuntimeError("no unacknowledged batch to serve again")
        log.info("learner asked again for version %d; serving the unacknowledged batch of version %d again",
                 request.learner_version, batch.learner_version)
        if batch.learner_version != request.learner_version:
            batch.learner_version = request.learner_version
            if self.journal is not None:
                self.journal.restamp(request.learner_version)
        self.commit()
        batch.sent_at = time.time()
        return batch

    def serve_pending(self, sender: str) -> tuple[bytes, Batch] | None:
        """Serve the pending request if enough complete groups are held.

        Returns:
            ``(route, batch)`` to send, or None (no request pending, or too few groups yet).
        """
        if self.pending is None:
            return None
        route, request = self.pending
        batch = self.serve(request.num_groups, request.learner_version, sender)
        if batch is None:
            return None
        self.pending = None
        return route, batch

    def serve(self, num_groups: int, learner_version: int, sender: str) -> Batch | None:
        """Sample ``num_groups`` groups for ``learner_version`` into a batch that becomes the
        unacknowledged one (journaled and committed); None when too few complete groups are held."""
        sample = self.store.sample(num_groups, learner_version)
        if sample is None:
            return None
        batch = Batch(sender=sender, learner_version=learner_version, rollouts=sample.rollouts,
                      dropped_stale=sample.dropped_stale, evicted=sample.evicted,
                      buffered_groups=sample.buffered_groups)
        if self.journal is not None:
            self.journal.serve(batch)
            self.journal.commit()
        self.unacked = batch
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
        self.unacked = recovered.unacknowledged
        if recovered.records:
            log.info("recovered %d rollouts in %d groups from %s (%d records, %d bad)%s",
                     recovered.rollouts, len(recovered.groups), self.journal.directory, recovered.records,
                     recovered.bad_records,
                     f"; batch for version {self.unacked.learner_version} awaits acknowledgement"
                     if self.unacked else "")
        self.compact()
        return recovered

    def compact(self) -> None:
        """Rewrite the journal as one snapshot of what is held now (no-op without a journal)."""
        if self.journal is not None:
            groups = [RecoveredGroup(members=members, served=served) for members, served in self.store.snapshot()]
            self.journal.compact(groups, self.unacked)

    def housekeeping(self) -> None:
        """Periodic work: expire incomplete groups, make the journal durable, compact it when due."""
        self.store.expire()
        if self.journal is not None:
            self.journal.commit()
            if self.journal.needs_compaction():
                self.compact()

    def close(self) -> None:
        """Close the journal (fsync: a clean stop leaves everything on disk)."""
        if self.journal is not None:
            self.journal.close()
            log.info("journal flushed: %d rollouts held in %s", self.store.held_rollouts, self.journal.directory)

    def _journal_removal(self, event: BufferEvent, rollout_ids: list[str]) -> None:
        """The store's ledger hook: removals go to the journal. ``ACCEPTED`` was journaled
        write-ahead by :meth:`add`; ``SAMPLED`` is journaled with the whole batch by :meth:`serve`."""
        if event in (BufferEvent.DROPPED_STALE, BufferEvent.EVICTED):
            self.journal.remove(event.value, rollout_ids)
