"""Round trip of every wire type and rejection of malformed messages."""

from __future__ import annotations

import hashlib
import math

import msgpack
import numpy as np
import pytest

from streamrl.common import messages as m
from streamrl.common.messages import ProtocolError, RejectReason


def make_rollout(**overrides) -> m.Rollout:
    fields = dict(
        sender="generator-test",
        prompt_id="p1",
        group_id="g1",
        rollout_id="r1",
        generator_id="generator-test",
        group_size=2,
        prompt_tokens=np.array([5, 6, 7], dtype=np.int32),
        completion_tokens=np.array([8, 9], dtype=np.int32),
        behaviour_logprobs=np.array([-0.5, -1.25], dtype=np.float32),
        policy_version=3,
        finish_reason=m.FinishReason.STOP,
        sampling=m.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16),
        prompt_text="hello",
        completion_text="world",
        metadata={"answer": "42"},
    )
    fields.update(overrides)
    return m.Rollout(**fields)


def make_scored(**overrides) -> m.ScoredRollout:
    return m.ScoredRollout(rollout=make_rollout(**overrides), reward=0.75, reward_parts={"vader": 0.75}, scorer_id="s0")


def all_messages() -> list[m.Message]:
    blob_specs = [
        m.TensorSpec(name="a.weight", dtype="float32", shape=[2, 3], offset=0, nbytes=24),
        m.TensorSpec(name="b.bias", dtype="bfloat16", shape=[4], offset=24, nbytes=8),
    ]
    return [
        make_rollout(),
        make_scored(),
        m.BatchRequest(learner_version=4, num_groups=2),
        m.Batch(
            learner_version=4,
            rollouts=[make_scored(), make_scored(rollout_id="r2")],
            dropped_stale=3,
            evicted=1,
            buffered_groups=5,
        ),
        m.WeightsAnnounce(
            version=7, manifest=blob_specs, total_bytes=32, chunk_bytes=10, num_chunks=4, sha256="ab" * 32
        ),
        m.WeightsChunkRequest(version=7, chunk_index=2),
        m.WeightsChunk(version=7, chunk_index=2, data=bytes(range(10))),
        m.Error(code=m.ErrorCode.UNKNOWN_VERSION, message="gone", reply_to="x"),
        make_rollout(
            selection=m.Selection(
                candidates=4, probability=0.5, by_model=True, density_ratio=2.5, human_value=0.25, model_version=3
            )
        ),
        m.ScoredRollout(
            rollout=make_rollout(),
            reward=0.5,
            human=m.HumanScore(value=-0.5, eligibility=0.25, model_version=3, active=False),
        ),
        m.HumanModel(
            version=3,
            active=True,
            feature="mean_last_hidden",
            mean=np.zeros(3, np.float32),
            scale=np.ones(3, np.float32),
            weight=np.array([0.5, -1, 2], np.float32),
            bias=0.125,
            anchors=np.arange(6, dtype=np.float32).reshape(2, 3),
            anchor_times=np.array([1.5, 2.5]),
            labels=7,
        ),
        m.CreditRequest(sender="gen-0-ab12", instance="generator-0", policy_version=3, groups_sent=17, want=2),
        m.CreditGrant(reply_to="x", credits=2, learner_version=4, epoch="e1", reason="2 of 3", trained_groups=9),
        m.GroupDropped(
            group_id="g:3",
            generator_id="generator-test",
            rollout_id="g:3:1",
            group_size=4,
            reason="ValueError",
            error="ValueError: no answer",
        ),
        m.ScoredRollout(
            rollout=make_rollout(),
            reward=0.25,
            reference_logprobs=np.linspace(-3, -0.5, len(make_rollout().completion_tokens), dtype=np.float32),
        ),
    ]


def assert_same(a, b):
    assert type(a) is type(b)
    for f in a.__dataclass_fields__:
        va, vb = getattr(a, f), getattr(b, f)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape
            np.testing.assert_array_equal(va, vb)
        elif isinstance(va, list) and va and isinstance(va[0], m.Message):
            for x, y in zip(va, vb, strict=True):
                assert_same(x, y)
        elif isinstance(va, m.Message):
            assert_same(va, vb)
        else:
            assert va == vb, f


def test_every_message_type_is_covered():
    assert {type(msg).KIND for msg in all_messages()} == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", all_messages(), ids=lambda x: x.KIND)
def test_round_trip(msg):
    frames = m.encode(msg)
    frames = [bytes(f) for f in frames]  # as received from the wire
    back = m.decode(frames)
    assert_same(msg, back)


def test_arrays_travel_in_extra_frames_not_in_header():
    msg = make_rollout(
        completion_tokens=np.arange(1000, dtype=np.int32), behaviour_logprobs=np.full(1000, -1.0, dtype=np.float32)
    )
    frames = m.encode(msg)
    assert len(frames) == 4  # header + prompt, completion, logprobs
    assert len(frames[0]) < 600
    assert bytes(frames[2]) == np.arange(1000, dtype="<i4").tobytes()


def test_big_endian_input_is_sent_little_endian():
    msg = make_rollout(prompt_tokens=np.array([1, 2], dtype=">i4").astype(np.int32))
    back = m.decode([bytes(f) for f in m.encode(msg)])
    assert back.prompt_tokens.tolist() == [1, 2]


def test_sent_at_is_evaluated_per_message():
    a = m.BatchRequest(learner_version=0, num_groups=1)
    b = m.BatchRequest(learner_version=0, num_groups=1)
    assert a.msg_id != b.msg_id
    assert b.sent_at >= a.sent_at


def header_of(msg) -> tuple[dict, list]:
    frames = [bytes(f) for f in m.encode(msg)]
    return msgpack.unpackb(frames[0], raw=False), frames[1:]


def repack(header, payloads):
    return [msgpack.packb(header, use_bin_type=True), *payloads]


def reject(frames, reason, **kw):
    with pytest.raises(ProtocolError) as err:
        m.decode(frames, **kw)
    assert err.value.reason is reason, err.value
    return err.value


def test_rejects_garbage_header():
    reject([b"\xc1\xff\x00"], RejectReason.MALFORMED)
    reject([msgpack.packb([1, 2, 3])], RejectReason.MALFORMED)
    reject([], RejectReason.MALFORMED)


def test_rejects_unknown_kind_and_other_major():
    header, payloads = header_of(m.BatchRequest(learner_version=1, num_groups=1))
    header["kind"] = "launch_missiles"
    reject(repack(header, payloads), RejectReason.UNKNOWN_KIND)
    header["kind"] = "batch_request"
    header["schema"] = [2, 0]
    reject(repack(header, payloads), RejectReason.SCHEMA_VERSION)


def test_accepts_newer_minor_with_extra_fields():
    header, payloads = header_of(m.BatchRequest(learner_version=1, num_groups=3))
    header["schema"] = [1, 9]
    header["priority"] = "high"
    assert m.decode(repack(header, payloads)).num_groups == 3


def test_rejects_unexpected_kind_for_socket():
    frames = m.encode(m.BatchRequest(learner_version=1, num_groups=1))
    reject(frames, RejectReason.UNEXPECTED_KIND, expected=[m.Rollout])


def test_rejects_wrong_field_types():
    header, payloads = header_of(m.BatchRequest(learner_version=1, num_groups=1))
    header["num_groups"] = "many"
    reject(repack(header, payloads), RejectReason.BAD_FIELD)
    header["num_groups"] = True  # bool is not an int on the wire
    reject(repack(header, payloads), RejectReason.BAD_FIELD)
    del header["num_groups"]
    reject(repack(header, payloads), RejectReason.BAD_FIELD)


def test_rejects_wrong_dtype_shape_and_length():
    header, payloads = header_of(make_rollout())
    bad = dict(header)
    ref = msgpack.unpackb(header["completion_tokens"].data)
    bad["completion_tokens"] = msgpack.ExtType(1, msgpack.packb([ref[0], "float64", ref[2]]))
    reject(repack(bad, payloads), RejectReason.BAD_ARRAY)
    bad["completion_tokens"] = msgpack.ExtType(1, msgpack.packb([ref[0], "int32", [2, 1]]))
    reject(repack(bad, payloads), RejectReason.BAD_ARRAY)
    bad["completion_tokens"] = msgpack.ExtType(1, msgpack.packb([ref[0], "int32", [3]]))
    reject(repack(bad, payloads), RejectReason.BAD_ARRAY)
    bad["completion_tokens"] = msgpack.ExtType(1, msgpack.packb([ref[0], "object", [2]]))
    reject(repack(bad, payloads), RejectReason.BAD_ARRAY)


def test_rejects_frame_reuse_and_missing_frames():
    header, payloads = header_of(make_rollout())
    header["completion_tokens"] = header["prompt_tokens"]
    reject(repack(header, payloads), RejectReason.MALFORMED)
    header, payloads = header_of(make_rollout())
    reject(repack(header, payloads[:1]), RejectReason.MALFORMED)
    reject(repack(header, payloads + [b"extra"]), RejectReason.MALFORMED)


def test_rejects_oversize():
    frames = m.encode(make_rollout())
    reject(frames, RejectReason.OVERSIZE, max_bytes=64)
    reject(frames, RejectReason.OVERSIZE, max_frames=2)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(policy_version=-1),
        dict(group_size=0),
        dict(behaviour_logprobs=np.array([-0.5, np.nan], dtype=np.float32)),
        dict(behaviour_logprobs=np.array([-0.5, 3.0], dtype=np.float32)),
        dict(behaviour_logprobs=np.array([-0.5], dtype=np.float32)),
        dict(completion_tokens=np.zeros(0, dtype=np.int32), behaviour_logprobs=np.zeros(0, dtype=np.float32)),
        dict(sampling=m.SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=4)),
    ],
)
def test_rejects_absurd_rollout_values(overrides):
    reject(m.encode(make_rollout(**overrides)), RejectReason.BAD_VALUE)


def test_rejects_nan_reward():
    msg = make_scored()
    msg.reward = math.nan
    reject(m.encode(msg), RejectReason.BAD_VALUE)


def test_rejects_bad_manifest():
    msg = all_messages()[4]
    msg.num_chunks = 9
    reject(m.encode(msg), RejectReason.BAD_VALUE)


def test_encode_refuses_object_arrays():
    with pytest.raises(TypeError):
        m.encode(make_rollout(prompt_tokens=np.array([object()], dtype=object)))


def test_reference_logprobs_are_optional_and_checked():
    plain = m.decode(m.encode(make_scored()), expected=[m.ScoredRollout])
    assert plain.reference_logprobs is None  # sent as null
    header, payloads = header_of(make_scored())
    del header["reference_logprobs"]  # a 1.1 sender does not know the field
    assert m.decode(repack(header, payloads), expected=[m.ScoredRollout]).reference_logprobs is None
    msg = make_scored()
    msg.reference_logprobs = np.array([-0.5], dtype=np.float32)  # the completion has 2 tokens
    reject(m.encode(msg), RejectReason.BAD_VALUE)
    msg.reference_logprobs = np.array([-0.5, np.nan], dtype=np.float32)
    reject(m.encode(msg), RejectReason.BAD_VALUE)
    msg.reference_logprobs = np.array([-0.5, -2.0], dtype=np.float64)  # declared float32
    with pytest.raises(TypeError):
        m.encode(msg)


# ----------------------------------------------------------------- the wire bytes, pinned


def pinned(msg: m.Message, i: int = 0) -> m.Message:
    """``msg`` with its envelope (and that of every message inside it) fixed, so its bytes are too."""
    for inner in [msg, *getattr(msg, "rollouts", []), *[s.rollout for s in getattr(msg, "rollouts", [])]]:
        inner.msg_id, inner.sent_at = f"{i:032x}", 1_700_000_000.25 + i
    if isinstance(msg, m.ScoredRollout):
        msg.rollout.msg_id, msg.rollout.sent_at = f"{i:032x}", 1_700_000_000.25 + i
    return msg


def ext(code: int, args: list) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(args))


def test_wire_bytes_of_a_credit_request_follow_the_documented_layout():
    """Frame 0 is the msgpack map of the envelope, then the fields in declaration order, then
    ``kind`` and ``schema`` (module docstring of ``streamrl.common.messages``); built here by hand."""
    msg = pinned(m.CreditRequest(sender="gen-0", instance="generator-0", policy_version=3, groups_sent=17, want=2))
    header = {
        "msg_id": "0" * 32,
        "sender": "gen-0",
        "sent_at": 1_700_000_000.25,
        "instance": "generator-0",
        "policy_version": 3,
        "groups_sent": 17,
        "want": 2,
        "kind": "credit_request",
        "schema": list(m.SCHEMA_VERSION),
    }
    assert [bytes(f) for f in m.encode(msg)] == [msgpack.packb(header, use_bin_type=True)]


def test_wire_bytes_of_a_rollout_put_arrays_and_bytes_in_frames():
    """Arrays travel as little-endian frames referenced by extension 1 ``[frame, dtype, shape]``,
    ``bytes`` fields by extension 2 ``[frame]``; nested dataclasses and enums as maps and values."""
    msg = pinned(make_rollout())
    header = {
        "msg_id": "0" * 32,
        "sender": "generator-test",
        "sent_at": 1_700_000_000.25,
        "prompt_id": "p1",
        "group_id": "g1",
        "rollout_id": "r1",
        "generator_id": "generator-test",
        "group_size": 2,
        "prompt_tokens": ext(1, [1, "int32", [3]]),
        "completion_tokens": ext(1, [2, "int32", [2]]),
        "behaviour_logprobs": ext(1, [3, "float32", [2]]),
        "policy_version": 3,
        "finish_reason": "stop",
        "sampling": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 16},
        "prompt_text": "hello",
        "completion_text": "world",
        "metadata": {"answer": "42"},
        "selection": None,
        "model_fingerprint": "",
        "kind": "rollout",
        "schema": list(m.SCHEMA_VERSION),
    }
    assert [bytes(f) for f in m.encode(msg)] == [
        msgpack.packb(header, use_bin_type=True),
        bytes([5, 0, 0, 0, 6, 0, 0, 0, 7, 0, 0, 0]),
        bytes([8, 0, 0, 0, 9, 0, 0, 0]),
        np.array([-0.5, -1.25], dtype="<f4").tobytes(),
    ]
    chunk = pinned(m.WeightsChunk(version=7, chunk_index=2, data=b"\x00\x01\x02"))
    frames = [bytes(f) for f in m.encode(chunk)]
    assert msgpack.unpackb(frames[0], raw=False)["data"] == ext(2, [1]) and frames[1:] == [b"\x00\x01\x02"]


WIRE_DIGEST = "adff84f7630646dc578c2e6c938810fb589bd56b31f6c21f1287649ce147ab7f"
"""sha256 over every frame (8-byte little-endian length, then the bytes) of ``all_messages()``, pinned:
schema 1.4 (``WeightsAnnounce.adapter``; 1.3 before the package split was b2aaa4e0...). A change here changes what
goes on the wire, which needs a new ``SCHEMA_VERSION`` and a note in DESIGN.md, "The wire"."""


def test_wire_bytes_of_every_message_type_are_pinned():
    digest = hashlib.sha256()
    for i, msg in enumerate(all_messages()):
        for frame in m.encode(pinned(msg, i)):
            data = bytes(frame)
            digest.update(len(data).to_bytes(8, "little") + data)
    assert digest.hexdigest() == WIRE_DIGEST
