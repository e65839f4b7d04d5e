"""Weight synchronisation: the learner's announcements and the chunks generators fetch.

Part of :mod:`streamrl.common.messages` (its docstring describes the wire format); import the
names from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from streamrl.common.messages.envelope import Message, require


@dataclass(kw_only=True)
class TensorSpec:
    """Where one tensor lies in a weights blob.

    Attributes:
        name: parameter name in the model's ``state_dict``.
        dtype: wire dtype name (``float32``, ``bfloat16``, ``float16``).
        shape: tensor shape.
        offset: byte offset in the blob.
        nbytes: byte length in the blob.
    """

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


@dataclass(kw_only=True)
class AdapterSpec:
    """The LoRA adapter a weights blob holds (``learner.lora``; Hu et al. 2021, eq. 3).

    The blob's manifest then names, for each adapted linear layer ``<module>`` of the base model,
    ``<module>.lora_A.weight`` (``[rank, in]``) and ``<module>.lora_B.weight`` (``[out, rank]``); the
    generator computes ``<module>.weight = W0 + (alpha / rank) * B @ A`` from the base ``W0`` it loaded
    from its own ``model.path``. The base must be the one named by the announcement's
    ``model_fingerprint``.

    Attributes:
        rank: r.
        alpha: LoRA alpha (the update is scaled by ``alpha / rank``).
        target_modules: the adapted layers' names (PEFT ``target_modules``), for diagnostics.
    """

    rank: int
    alpha: float
    target_modules: list[str]

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank


@dataclass(kw_only=True)
class WeightsAnnounce(Message):
    """A new policy version is available (learner -> all, PUB; repeated periodically).

    Attributes:
        version: the policy version.
        manifest: one :class:`TensorSpec` per tensor.
        total_bytes: blob size in bytes.
        chunk_bytes: size of each chunk in bytes (the last may be shorter).
        num_chunks: number of chunks.
        sha256: hex digest of the whole blob.
        model_fingerprint: (schema 1.2, optional) the learner's model config and tokenizer
            fingerprint (``streamrl.common.fingerprint``); "" = not stated. With ``adapter``: the
            fingerprint of the base model the adapter was trained on.
        adapter: (schema 1.4, optional) the blob holds this LoRA adapter, not the whole policy.
    """

    KIND: ClassVar[str] = "weights_announce"
    version: int
    manifest: list[TensorSpec]
    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    sha256: str
    model_fingerprint: str = ""
    adapter: AdapterSpec | None = None

    def check(self) -> None:
        require(self.version >= 0, "version must be >= 0")
        if self.adapter is not None:
            require(self.adapter.rank >= 1 and self.adapter.alpha > 0, "adapter rank must be >= 1 and alpha > 0")
        require(self.chunk_bytes > 0, "chunk_bytes must be > 0")
        require(
            self.num_chunks == -(-self.total_bytes // self.chunk_bytes),
            "num_chunks does not match total_bytes / chunk_bytes",
        )
        end = 0
        for spec in self.manifest:
            require(spec.offset >= end and spec.nbytes >= 0, f"manifest entry {spec.name} overlaps")
            end = spec.offset + spec.nbytes
        require(end <= self.total_bytes, "manifest runs past total_bytes")
        require(len(self.sha256) == 64, "sha256 must be 64 hex digits")


@dataclass(kw_only=True)
class WeightsChunkRequest(Message):
    """Ask for one chunk of a version's blob (generator -> learner, DEALER -> ROUTER).

    Attributes:
        version: the policy version wanted.
        chunk_index: 0-based chunk index.
    """

    KIND: ClassVar[str] = "weights_chunk_request"
    version: int
    chunk_index: int

    def check(self) -> None:
        require(self.version >= 0 and self.chunk_index >= 0, "negative version or chunk_index")


@dataclass(kw_only=True)
class WeightsChunk(Message):
    """One chunk of a version's blob (learner -> generator).

    Attributes:
        version: policy version.
        chunk_index: 0-based chunk index.
        data: the chunk's bytes.
    """

    KIND: ClassVar[str] = "weights_chunk"
    version: int
    chunk_index: int
    data: bytes
