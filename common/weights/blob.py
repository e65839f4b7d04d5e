"""The weight blob: a policy ``state_dict`` as one contiguous buffer of raw tensors (dtype
configurable: float32, bfloat16, float16; never pickled) described by a manifest of
``(name, dtype, shape, offset, nbytes)``, cut into ``chunk_bytes`` chunks.

Integrity. Every chunk has an XXH3-128 digest (:func:`chunk_digests`); the
announcement's ``sha256`` is the sha256 of those digests in chunk order
(:func:`digest_root`), so it binds every byte of the blob, its position and
its version. A generator hashes each chunk as it lands (XXH3 runs at about
10 GB/s, so verification overlaps the transfer instead of following it) and
compares the root once the last chunk is in: a corrupted, truncated, missing,
swapped or other-version chunk changes the root and the version is never
loaded (:class:`WeightSyncError`). XXH3 guards against accidents and races,
not forgery: an attacker who can inject chunks can also forge the
announcement, which is what CURVE (:mod:`streamrl.common.security`) is for.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from streamrl.common.messages import TensorSpec, WeightsAnnounce
from streamrl.common.modes import WeightDtype

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

DIGEST_BYTES = 16
"""Bytes of one chunk digest (XXH3-128)."""
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


class WeightSyncError(RuntimeError):
    """A weight fetch failed (timeout, digest mismatch, version retired)."""


class FetchStopped(WeightSyncError):
    """The process was asked to stop (its ``stop`` event was set) before a fetch completed."""


def allocate_blob(nbytes: int) -> np.ndarray:
    """A ``[nbytes]`` uint8 array whose pages are mapped up front (``MAP_POPULATE`` on Linux).

    Touching freshly allocated memory page by page costs a page fault per 4 KiB (on
    the 2-core VM of ``bench/RESULTS.md``, about 2 s per GB); populating the mapping
    in one call is several times faster, and the blob is then reused across versions.
    """
    if nbytes <= 0:
        return np.zeros(0, dtype=np.uint8)
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if not flags:
        return np.empty(nbytes, dtype=np.uint8)  # no anonymous mmap flags here (Windows)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags | getattr(mmap, "MAP_POPULATE", 0)), dtype=np.uint8)


def chunk_digests(blob: np.ndarray | memoryview | bytes | bytearray, chunk_bytes: int) -> bytes:
    """XXH3-128 digest of every ``chunk_bytes`` chunk of ``blob``, concatenated (16 bytes per chunk)."""
    view = memoryview(blob).cast("B")  # type: ignore[arg-type]  # numpy stubs: no __buffer__ before 3.12
    return b"".join(xxhash.xxh3_128_digest(view[i : i + chunk_bytes]) for i in range(0, view.nbytes, chunk_bytes))


def digest_root(digests: bytes | bytearray) -> str:
    """The announcement's ``sha256``: hex sha256 of the per-chunk digests in chunk order."""
    return hashlib.sha256(digests).hexdigest()


@dataclass
class PackedWeights:
    """One version's weights on the learner side.

    Attributes:
        announce: the :class:`WeightsAnnounce` describing the blob.
        blob: ``[total_bytes]`` uint8 numpy array of raw little-endian tensors.
    """

    announce: WeightsAnnounce
    blob: np.ndarray

    def chunk(self, index: int) -> memoryview:
        """Bytes of chunk ``index`` (a view, not a copy)."""
        size = self.announce.chunk_bytes
        # numpy's stubs declare ndarray.__buffer__ for Python 3.12+ only
        return memoryview(self.blob[index * size : (index + 1) * size])  # type: ignore[arg-type]


def tied_duplicates(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Names of tensors that share storage with an earlier entry (tied weights such as
    ``lm_head.weight`` = ``embed_tokens.weight``); they are sent once, under the first name."""
    seen: set[tuple[int, int | torch.SymInt, tuple[int, ...]]] = set()
    duplicates = set()
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            duplicates.add(name)
        seen.add(key)
    return duplicates


def blob_layout(state_dict: dict[str, torch.Tensor], dtype: WeightDtype) -> tuple[list[TensorSpec], int]:
    """Where each tensor of ``state_dict`` lies in the blob: floating-point tensors in ``dtype``,
    others in their own dtype, tied duplicates (:func:`tied_duplicates`) left out, packed
    back to back in ``state_dict`` order.

    Returns:
        The manifest and the blob size in bytes.

    Raises:
        ValueError: a tensor dtype that cannot be sent.
    """
    wire = _TORCH_DTYPES[dtype.value]
    specs: list[TensorSpec] = []
    offset = 0
    skip = tied_duplicates(state_dict)
    for name, tensor in state_dict.items():
        if name in skip:
            continue
        t_dtype = wire if tensor.is_floating_point() else tensor.dtype
        name_dtype = str(t_dtype).removeprefix("torch.")
        if name_dtype not in _TORCH_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be sent as weights")
        nbytes = tensor.numel() * torch.empty(0, dtype=t_dtype).element_size()
        specs.append(TensorSpec(name=name, dtype=name_dtype, shape=list(tensor.shape), offset=offset, nbytes=nbytes))
        offset += nbytes
    return specs, offset


def _snapshot(state_dict: dict[str, torch.Tensor], specs: list[TensorSpec], blob: np.ndarray) -> None:
    """Copy (and cast) every tensor named in ``specs`` into its place in ``blob``."""
    raw = torch.from_numpy(blob)
    with torch.no_grad():
        for spec in specs:
            dtype = _TORCH_DTYPES[spec.dtype]
            source = state_dict[spec.name].detach()
            target = raw[spec.offset : spec.offset + spec.nbytes]
            if source.device.type == "cpu" and source.dtype == dtype:
                # a plain memcpy on this thread (torch's copy_ would fan out to its intra-op
                # pool, which on a loaded machine costs several times the copy itself)
                np.copyto(blob[spec.offset : spec.offset + spec.nbytes], source.reshape(-1).view(torch.uint8).numpy())
            elif spec.offset % torch.empty(0, dtype=dtype).element_size() == 0:
                target.view(dtype).view(spec.shape).copy_(source)  # cast while copying, no temporary
            else:  # an unaligned offset (a 2-byte tensor before a 4-byte one): go through bytes
                target.copy_(source.to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8))


def _announce(
    specs: list[TensorSpec], blob: np.ndarray, *, version: int, chunk_bytes: int, sender: str
) -> WeightsAnnounce:
    total = int(blob.size)
    return WeightsAnnounce(
        sender=sender,
        version=version,
        manifest=specs,
        total_bytes=total,
        chunk_bytes=chunk_bytes,
        num_chunks=-(-total // chunk_bytes),
        sha256=digest_root(chunk_digests(blob, chunk_bytes)),
    )


def pack_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    version: int,
    dtype: WeightDtype,
    chunk_bytes: int,
    sender: str,
    out: np.ndarray | None = None,
) -> PackedWeights:
    """Pack ``state_dict`` into one blob (layout: :func:`blob_layout`) and describe it.

    Args:
        state_dict: parameter name -> tensor (any device).
        version: the policy version.
        dtype: wire dtype for floating-point tensors.
        chunk_bytes: chunk size in bytes.
        sender: process identity for the announcement.
        out: a ``[total_bytes]`` uint8 array to pack into (reused across versions); None = a new one.

    Raises:
        ValueError: a tensor dtype that cannot be sent, or ``out`` of another size.
    """
    specs, total = blob_layout(state_dict, dtype)
    if out is not None and out.size != total:
        raise ValueError(f"out has {out.size} bytes, the weights need {total}")
    blob = allocate_blob(total) if out is None else out
    _snapshot(state_dict, specs, blob)
    return PackedWeights(
        announce=_announce(specs, blob, version=version, chunk_bytes=chunk_bytes, sender=sender), blob=blob
    )


def _tensor_views(announce: WeightsAnnounce, blob) -> dict[str, torch.Tensor]:
    out = {}
    raw = torch.frombuffer(blob, dtype=torch.uint8) if len(blob) else torch.zeros(0, dtype=torch.uint8)
    for spec in announce.manifest:
        dtype = _TORCH_DTYPES.get(spec.dtype)
        if dtype is None:
            raise WeightSyncError(f"{spec.name}: unknown dtype {spec.dtype}")
        piece = raw[spec.offset : spec.offset + spec.nbytes]
        out[spec.name] = piece.view(dtype).reshape(spec.shape)
    return out


def unpack_state_dict(announce: WeightsAnnounce, blob: np.ndarray | bytearray | bytes) -> dict[str, torch.Tensor]:
    """Verify a whole blob and return the tensors of ``announce.manifest`` as views of it (no copies).

    The slow reference of what :meth:`WeightClient.fetch` checks chunk by chunk.

    Raises:
        WeightSyncError: the blob's size or digest does not match the announcement.
    """
    if len(blob) != announce.total_bytes:
        raise WeightSyncError(f"blob has {len(blob)} bytes, announce says {announce.total_bytes}")
    if digest_root(chunk_digests(blob, announce.chunk_bytes)) != announce.sha256:
        raise WeightSyncError(f"sha256 of the chunk digests does not match for version {announce.version}")
    return _tensor_views(announce, blob)
