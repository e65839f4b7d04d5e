"""The buffer's conversations: batch requests and batches (learner), credit requests and grants (generators).

Part of :mod:`streamrl.common.messages` (its docstring describes the wire format); import the
names from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from streamrl.common.messages.envelope import Message, require
from streamrl.common.messages.rollouts import ScoredRollout


@dataclass(kw_only=True)
class BatchRequest(Message):
    """The learner asks the buffer for a batch (learner -> buffer).

    Attributes:
        learner_version: the learner's current policy version; the buffer drops
            items with ``learner_version - policy_version > max_staleness``.
        num_groups: number of complete groups wanted.
        durable_version: (schema 1.2, optional) the version of the learner's newest checkpoint:
            every batch it was served for an older version is durably trained and may be
            forgotten; -1 (an older learner): a request for a newer version acknowledges.
        resumed_at: (schema 1.2, optional) the version this learner process started at (names
            the process: batches served to an earlier process and not covered by
            ``durable_version`` were lost with it and are served again); -1: not stated.
        refused_batch: (schema 1.2, optional) ``msg_id`` of a batch the learner refused entirely
            (no rollout passed its checks: another model's fingerprint, an id past the
            vocabulary, another sampling distribution): the buffer forgets it, journaled as
            removed with event ``refused``, instead of serving it again; "" = none.
    """

    KIND: ClassVar[str] = "batch_request"
    learner_version: int
    num_groups: int
    durable_version: int = -1
    resumed_at: int = -1
    refused_batch: str = ""

    def check(self) -> None:
        require(self.learner_version >= 0, "learner_version must be >= 0")
        require(self.num_groups >= 1, "num_groups must be >= 1")
        require(self.durable_version >= -1 and self.resumed_at >= -1, "durable_version, resumed_at must be >= -1")
        require(
            self.durable_version <= self.learner_version and self.resumed_at <= self.learner_version,
            "durable_version and resumed_at cannot be newer than learner_version",
        )


@dataclass(kw_only=True)
class CreditRequest(Message):
    """A generator asks the buffer for generation credits before sampling (generator -> buffer,
    DEALER -> the buffer's batch ROUTER; the reply is a :class:`CreditGrant`).

    Admission before generation (AReaL, Fu et al. 2025, sec. 4): a generator samples
    a group only while it holds a credit. Counts are cumulative per ``sender`` (the generator id,
    unique per process start), so a lost or repeated request changes nothing.

    Attributes:
        instance: the generator's stable name (``generator-0``); a request from a new ``sender``
            with the same instance means the old process restarted: its unspent credits expire.
        policy_version: version of the weights the generator will sample with (its behaviour policy).
        groups_sent: groups this process has sampled so far (sent, or lost while stopping).
        want: groups it would sample next (its ``prompts_per_batch``).
    """

    KIND: ClassVar[str] = "credit_request"
    instance: str
    policy_version: int
    groups_sent: int
    want: int

    def check(self) -> None:
        require(self.policy_version >= 0, "policy_version must be >= 0")
        require(self.groups_sent >= 0, "groups_sent must be >= 0")
        require(self.want >= 1, "want must be >= 1")
        require(bool(self.instance), "instance must not be empty")


@dataclass(kw_only=True)
class CreditGrant(Message):
    """The buffer's answer to a :class:`CreditRequest` (buffer -> generator).

    Attributes:
        reply_to: ``msg_id`` of the request.
        credits: groups the generator may sample now with ``policy_version`` weights, beyond its
            ``groups_sent`` (0: wait; ask again after loading newer weights or a short pause).
            It replaces whatever an earlier grant allowed (unspent credits never accumulate).
        learner_version: newest version the learner asked a batch for (-1: none seen yet).
        epoch: random id of the buffer process (a new one after a restart).
        reason: why fewer credits than wanted were granted ("" when all were).
        trained_groups: groups of this generator id the buffer has served to the learner so far
            (trained / generated is the generator's useful ratio).
    """

    KIND: ClassVar[str] = "credit_grant"
    reply_to: str
    credits: int
    learner_version: int = -1
    epoch: str = ""
    reason: str = ""
    trained_groups: int = 0

    def check(self) -> None:
        require(self.credits >= 0 and self.trained_groups >= 0, "credits and trained_groups must be >= 0")
        require(self.learner_version >= -1, "learner_version must be >= -1")


@dataclass(kw_only=True)
class Batch(Message):
    """A batch of complete groups (buffer -> learner).

    Attributes:
        learner_version: echo of the request's version.
        rollouts: the scored rollouts, groups contiguous.
        dropped_stale: rollouts dropped as too stale since the previous batch.
        evicted: rollouts evicted (capacity or incomplete-group timeout) since the previous batch.
        buffered_groups: complete groups still held after this batch.
    """

    KIND: ClassVar[str] = "batch"
    learner_version: int
    rollouts: list[ScoredRollout]
    dropped_stale: int = 0
    evicted: int = 0
    buffered_groups: int = 0

    def check(self) -> None:
        for item in self.rollouts:
            item.check()
        require(self.dropped_stale >= 0 and self.evicted >= 0, "negative counts")
