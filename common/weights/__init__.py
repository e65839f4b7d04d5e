"""Versioned weight push from the learner to the generators, at close to wire speed.

The learner's policy ``state_dict`` travels as one contiguous blob of raw tensors
(dtype configurable: float32, bfloat16, float16; never pickled) cut into chunks, each
with a digest bound into the version's announcement:

- :mod:`~streamrl.common.weights.blob`: blob layout, packing and unpacking, digests;
- :mod:`~streamrl.common.weights.server`: :class:`WeightServer` (learner side): announces
  versions on PUB and serves chunks on ROUTER, with bounded memory per peer;
- :mod:`~streamrl.common.weights.client`: :class:`WeightClient` (generator side): fetches a
  version with credit-based flow control and verifies every chunk.
"""

from streamrl.common.weights.blob import (
    DEFAULT_CHUNK_BYTES,
    DIGEST_BYTES,
    FetchStopped,
    PackedWeights,
    WeightSyncError,
    allocate_blob,
    blob_layout,
    chunk_digests,
    digest_root,
    pack_state_dict,
    tied_duplicates,
    unpack_state_dict,
)
from streamrl.common.weights.client import FetchedWeights, WeightClient
from streamrl.common.weights.server import STALLED_PEER_FORGET_S, PublishTiming, WeightServer

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DIGEST_BYTES",
    "FetchStopped",
    "FetchedWeights",
    "PackedWeights",
    "PublishTiming",
    "STALLED_PEER_FORGET_S",
    "WeightClient",
    "WeightServer",
    "WeightSyncError",
    "allocate_blob",
    "blob_layout",
    "chunk_digests",
    "digest_root",
    "pack_state_dict",
    "tied_duplicates",
    "unpack_state_dict",
]
