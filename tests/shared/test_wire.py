from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import wire
from shared.wire import (
    GUEST_TO_HOST,
    HOST_TO_GUEST,
    MAX_FRAME,
    ErrorReply,
    FrameReader,
    InjectException,
    MsrResult,
    WireError,
    decode,
    encode,
    make,
)

SAMPLES = {
    "hello": dict(proto=1, vm="vm0", vcpu=None, boot=1, kind="normal", pid=42, transport="socket"),
    "msr_write": dict(msr=0x4B564D02, value=(1 << 64) - 1),
    "msr_read": dict(msr=0x4B564D02),
    "exit_mem": dict(gpa=4096, write=True, user=False, irq=True),
    "exit_hlt": dict(timeout_us=50_000),
    "exit_timer": dict(user=True, irq=True),
    "vmm_snapshot": dict(proto=6, directory="/snap", msrs="kvm"),
    "welcome": dict(proto=1, vm="vm0", vcpu=0, boot=1, vcpus=2, pages=8, page_size=4096, shm="/x", cpuid=16400),
    "msr_result": dict(msr=1, ok=False, error="#GP", value=None),
    "exception": dict(vector=14, cr2=4096),
    "resume": dict(gpa=0),
    "interrupt": dict(vector=0xF3),
    "vmm_done": dict(directory="/snap", vcpus=2),
    "error": dict(code="malformed", message="m", fatal=False),
}


def test_every_message_type_has_a_sample():
    assert SAMPLES.keys() == GUEST_TO_HOST.keys() | HOST_TO_GUEST.keys()


@pytest.mark.parametrize("msg_type", sorted(SAMPLES))
def test_round_trip(msg_type):
    schema = GUEST_TO_HOST if msg_type in GUEST_TO_HOST else HOST_TO_GUEST
    msg = make(schema, msg_type, **SAMPLES[msg_type])
    (payload,) = FrameReader().feed(encode(msg))
    decoded = decode(payload, schema)
    assert decoded == msg and type(decoded) is schema[msg_type]
    assert msgpack.unpackb(payload) == {"t": msg_type, **SAMPLES[msg_type]}  # the documented map, field by field


def test_msr_result_carries_a_read_value():
    (payload,) = FrameReader().feed(encode(MsrResult(0x4B564D06, True, None, 0xF3)))
    assert decode(payload, HOST_TO_GUEST) == MsrResult(0x4B564D06, True, None, 0xF3)
    with pytest.raises(WireError, match="value"):
        decode(msgpack.packb({"t": "msr_result", "msr": 1, "ok": True, "error": None, "value": "x"}), HOST_TO_GUEST)
    with pytest.raises(WireError, match="cr2"):
        decode(msgpack.packb({"t": "exception", "vector": 14}), HOST_TO_GUEST)
    assert decode(msgpack.packb({"t": "exception", "vector": 14, "cr2": 1}), HOST_TO_GUEST) == InjectException(14, 1)


@given(st.lists(st.sampled_from(sorted(GUEST_TO_HOST)), min_size=1, max_size=20), st.data())
def test_frames_survive_any_split(types, data):
    stream = b"".join(encode(make(GUEST_TO_HOST, t, **SAMPLES[t])) for t in types)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader()
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += reader.feed(stream[prev:cut])
        prev = cut
    assert [decode(p, GUEST_TO_HOST).TYPE for p in out] == types
    assert reader.pending == 0


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"\xc1", "malformed"),  # never-used msgpack byte
        (msgpack.packb([1, 2]), "malformed"),
        (msgpack.packb({"x": 1}), "malformed"),
        (msgpack.packb({1: 2}), "malformed"),  # int keys are refused (hash-DoS guard)
        (msgpack.packb({"t": "reboot"}), "unknown_type"),
        (msgpack.packb({"t": "msr_write", "msr": 1}), "bad_field"),
        (msgpack.packb({"t": "msr_write", "msr": 1, "value": "1"}), "bad_field"),
        (msgpack.packb({"t": "msr_write", "msr": True, "value": 1}), "bad_field"),
        (msgpack.packb({"t": "msr_write", "msr": 1, "value": 1, "extra": 0}), "bad_field"),
        (b"\x91" * 2000 + b"\x01", "malformed"),  # nesting beyond msgpack's limit
    ],
)
def test_bad_payloads_are_rejected_without_breaking_the_stream(payload, code):
    with pytest.raises(WireError) as info:
        decode(payload, GUEST_TO_HOST)
    assert info.value.code == code
    assert not info.value.fatal


def test_oversized_frame_is_fatal_before_it_is_buffered():
    reader = FrameReader()
    with pytest.raises(WireError) as info:
        reader.feed(wire.HEADER.pack(MAX_FRAME + 1))
    assert info.value.fatal and info.value.code == "frame_too_large"


def test_encode_refuses_oversized_messages():
    with pytest.raises(WireError):
        encode(ErrorReply("x", "m" * MAX_FRAME, False))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_wire_errors(data):
    reader = FrameReader()
    try:
        for payload in reader.feed(data):
            with contextlib.suppress(WireError):
                decode(payload, GUEST_TO_HOST)
    except WireError as exc:
        assert exc.fatal
