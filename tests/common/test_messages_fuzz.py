"""Property test of the decoder under hostile input (tests/fuzz_frames.py makes the stream).

For 12,500 hostile messages (2,500 for each of the four sockets streamrl binds, and for a
receiver of every kind) ``decode`` either returns a message or raises ``ProtocolError``,
with the reason the mutation calls for when that is known; whatever it accepts encodes
again to the same frames (a service that forwards it, like the scorer, cannot fail).
"""

from __future__ import annotations

import collections
import itertools
import tracemalloc

import msgpack
import numpy as np
import pytest

from fuzz_frames import (
    ACCEPTED,
    CATEGORIES,
    HUGE_CLAIMS,
    Raw,
    array_ref,
    frames_of,
    hostile,
    pack,
    samples,
    unpack_header,
)
from streamrl.common import messages as m
from streamrl.common.messages import ProtocolError, RejectReason

PER_SOCKET = 2_500
MAX_BYTES = 64 * 1024  # small, so the oversize cases stay cheap

SOCKETS = {
    "scorer-rollouts": m.Rollout,
    "buffer-scored-rollouts": m.ScoredRollout,
    "buffer-batch-requests": m.BatchRequest,
    "learner-chunk-requests": m.WeightsChunkRequest,
    "any-kind": None,
}


def outcome(frames, expected) -> str | RejectReason:
    """ACCEPTED or the reject reason; any other exception propagates (and fails the test)."""
    try:
        msg = m.decode(frames, expected=expected, max_bytes=MAX_BYTES)
    except ProtocolError as err:
        return err.reason
    again = frames_of(msg)
    assert frames_of(m.decode(again, expected=expected, max_bytes=MAX_BYTES)) == again
    return ACCEPTED


@pytest.mark.parametrize("socket", SOCKETS)
def test_hostile_messages_get_protocol_errors_only(socket):
    kind = SOCKETS[socket]
    expected = None if kind is None else [kind]
    reasons: collections.Counter = collections.Counter()
    categories: collections.Counter = collections.Counter()
    for case in itertools.islice(hostile(kind, seed=7, max_bytes=MAX_BYTES), PER_SOCKET):
        got = outcome(case.frames, expected)
        if case.expect is not None:
            assert got == case.expect, (case.category, case.frames[:1])
        reasons[got] += 1
        categories[case.category] += 1
    # every mutator ran except the rarest, and every reason this socket can give was seen
    assert set(categories) >= set(CATEGORIES) - {"too_many_frames", "oversize", "empty"}, categories
    possible = set(RejectReason) - ({RejectReason.UNEXPECTED_KIND} if kind is None else set())
    assert set(reasons) - {ACCEPTED} >= possible - {RejectReason.OVERSIZE} - (
        {RejectReason.BAD_ARRAY} if kind in (m.BatchRequest, m.WeightsChunkRequest) else set()
    ), reasons
    # mostly rejections: a random mutation rarely leaves a valid message
    assert reasons[ACCEPTED] < PER_SOCKET * 0.15, reasons


def test_rare_categories_give_their_reason():
    stream = hostile(
        m.Rollout,
        seed=3,
        max_bytes=MAX_BYTES,
        weights={name: 0 for name in CATEGORIES} | {"too_many_frames": 1, "oversize": 1, "empty": 1},
    )
    seen = collections.Counter()
    for case in itertools.islice(stream, 60):
        assert outcome(case.frames, [m.Rollout]) == case.expect
        seen[case.category, case.expect] += 1
    assert set(seen) == {
        ("too_many_frames", RejectReason.OVERSIZE),
        ("oversize", RejectReason.OVERSIZE),
        ("empty", RejectReason.MALFORMED),
    }


def test_stream_is_a_function_of_the_seed():
    def first(seed):
        return [(c.category, c.frames) for c in itertools.islice(hostile(m.Rollout, seed=seed), 200)]

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_claims_of_huge_sizes_are_rejected_without_allocating():
    rollout = samples()[0]
    frames = frames_of(rollout)
    header = unpack_header(frames[0])
    cases = [[claim] for claim in HUGE_CLAIMS]
    for claim in HUGE_CLAIMS:  # the claim in the middle of a valid header
        cases.append([pack(dict(header, metadata=Raw(claim))), *frames[1:]])
    index = msgpack.unpackb(header["prompt_tokens"].data)[0]
    for shape in ([2**40 - 1], [2**40], [2**39]):  # up to 4 TiB of int32 claimed for a 16-byte frame
        cases.append([pack(dict(header, prompt_tokens=array_ref(index, "int32", shape))), *frames[1:]])
    cases.append([pack(dict(header, prompt_tokens=array_ref(2**40, "int32", [4]))), *frames[1:]])
    tracemalloc.start()
    try:
        for case in cases:
            with pytest.raises(ProtocolError) as err:
                m.decode(case, expected=[m.Rollout])
            assert err.value.reason in (RejectReason.MALFORMED, RejectReason.BAD_ARRAY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"decoding size claims allocated {peak} bytes"


# --------------------------------------------------------------- regressions found by the fuzzer


def decode_rollout_with(**fields):
    frames = frames_of(samples()[0])
    header = unpack_header(frames[0])
    header.update(fields)
    return m.decode([pack(header), *frames[1:]], expected=[m.Rollout])


@pytest.mark.parametrize(
    "metadata",
    [
        {"when": msgpack.Timestamp(1, 0)},  # was accepted, then the scorer's re-encode raised TypeError
        {"blob": b"\x00\x01"},  # was accepted, re-encoded as a payload frame the buffer then rejected
        Raw(b"\x81\xa1a" * 900 + b"\x01"),  # 900 nested maps: was a RecursionError
        {"n": 2**64 - 1},  # past int64
    ],
    ids=["timestamp", "bytes", "deep", "uint64"],
)
def test_plain_maps_take_msgpack_primitives_only(metadata):
    with pytest.raises(ProtocolError) as err:
        decode_rollout_with(metadata=metadata)
    assert err.value.reason is RejectReason.BAD_FIELD


def test_plain_map_nesting_limit_is_exact():
    def nested(depth):
        value = 1
        for _ in range(depth):
            value = {"a": value}
        return value

    ok = decode_rollout_with(metadata=nested(m.MAX_MAP_DEPTH))
    assert frames_of(m.decode(frames_of(ok))) == frames_of(ok)
    with pytest.raises(ProtocolError):
        decode_rollout_with(metadata=nested(m.MAX_MAP_DEPTH + 1))


def test_integers_are_int64():
    assert decode_rollout_with(policy_version=2**63 - 1).policy_version == 2**63 - 1
    with pytest.raises(ProtocolError) as err:
        decode_rollout_with(policy_version=2**63)
    assert err.value.reason is RejectReason.BAD_FIELD


def test_negative_token_ids_are_rejected():
    rollout = samples()[0]
    rollout.completion_tokens = np.array([7, -1, 2], dtype=np.int32)
    with pytest.raises(ProtocolError) as err:
        m.decode(frames_of(rollout))
    assert err.value.reason is RejectReason.BAD_VALUE


def test_a_bool_is_not_a_frame_index():
    with pytest.raises(ProtocolError) as err:
        decode_rollout_with(prompt_tokens=array_ref(True, "int32", [4]))
    assert err.value.reason is RejectReason.MALFORMED


def test_every_sample_round_trips():
    for message in samples():
        frames = frames_of(message)
        decoded = m.decode(frames)
        assert type(decoded) is type(message) and decoded.msg_id == message.msg_id
        assert frames_of(decoded) == frames
