# Bad input against the real host daemon: every bad frame, message or MSR value gets a clear logged error, only
# fatal framing errors drop the connection, and the other vCPUs keep being served.
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import msgpack
import pytest

from shared.abi import (
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
    KVM_ASYNC_PF_ENABLED,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.wire import (
    HEADER,
    MAX_FRAME,
    PF_VECTOR,
    PROTOCOL_VERSION,
    ErrorReply,
    ExitMem,
    Hello,
    InjectException,
    Interrupt,
    Welcome,
)

from .helpers import HostProcess, WireClient, wait_until

PAGES = 32


@pytest.fixture
def host(tmp_path, vm_id):
    h = HostProcess(tmp_path, vm_id, "--vcpus", "4", "--pages", str(PAGES), "--resident", "16",
                    "--page-in-latency", "fixed:1ms")
    yield h
    assert h.stop() == 0, "the host must survive bad input and still stop cleanly"
    assert not h.shm_exists()
    assert not h.socket.exists()


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


@contextlib.contextmanager
def apf_area(vm_id: str, vcpu: int) -> Iterator[KvmVcpuPvApfData]:
    """vCPU `vcpu`'s struct kvm_vcpu_pv_apf_data, at guest physical address vcpu * 64 of the VM's RAM."""
    ram = GuestRam.open(vm_id, RamLayout(PAGES))
    area = KvmVcpuPvApfData(ram.u32, vcpu * 64)
    try:
        yield area
    finally:
        area.release()
        ram.close()


def enable_apf(client: WireClient, vm_id: str, vcpu: int) -> None:
    with apf_area(vm_id, vcpu) as area:
        client.enable_apf(area, gpa=vcpu * 64)


def healthy(client: WireClient, vm_id: str, vcpu: int, gfn: int) -> None:
    """A vCPU that keeps working: a full APF cycle on a swapped-out page."""
    with apf_area(vm_id, vcpu) as area:
        area.token = 0
        pf = client.exit_mem(gfn)
        assert isinstance(pf, InjectException) and pf.vector == PF_VECTOR
        assert area.read_and_reset_flags() == KVM_PV_REASON_PAGE_NOT_PRESENT
        assert client.receive() == Interrupt(HYPERVISOR_CALLBACK_VECTOR)
        assert area.token == pf.cr2
        area.token = 0
        assert client.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1).ok


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"\xc1\xc1", "malformed"),
        (msgpack.packb(["not", "a", "map"]), "malformed"),
        (msgpack.packb({"t": "format_disk"}), "unknown_type"),
        (msgpack.packb({"t": "msr_write", "msr": "EN", "value": 1}), "bad_field"),
        (msgpack.packb({"t": "exit_mem", "gpa": 0}), "bad_field"),
    ],
)
def test_bad_messages_are_answered_and_the_connection_lives_on(host, vm_id, payload, code):
    bad = WireClient(host.socket)
    good = WireClient(host.socket)
    assert isinstance(bad.hello(vm_id, vcpu=0), Welcome)
    assert isinstance(good.hello(vm_id, vcpu=1), Welcome)
    enable_apf(good, vm_id, 1)
    bad.send_raw(frame(payload))
    reply = bad.receive()
    assert isinstance(reply, ErrorReply)
    assert reply.code == code and reply.fatal is False
    # the same connection still works
    assert bad.wrmsr(MSR_KVM_ASYNC_PF_INT, HYPERVISOR_CALLBACK_VECTOR).ok
    healthy(good, vm_id, 1, gfn=20)
    wait_until(lambda: any(e["code"] == code for e in host.events() if e["event"] == "wire_error"), 5,
               "the error in the host log")
    bad.close()
    good.close()


@pytest.mark.parametrize(
    "value,why",
    [
        (0x40 | 0x10 | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, "reserved"),
        (0x48 | 0x20 | KVM_ASYNC_PF_ENABLED, "reserved"),
        ((PAGES * PAGE_SIZE) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, "outside guest RAM"),
        ((1 << 63) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, "outside guest RAM"),
    ],
)
def test_bad_msr_values_get_gp(host, vm_id, value, why):
    c = WireClient(host.socket)
    c.hello(vm_id, vcpu=2)
    reply = c.wrmsr(MSR_KVM_ASYNC_PF_EN, value)
    assert reply.ok is False and reply.error is not None and why in reply.error
    assert c.wrmsr(MSR_KVM_ASYNC_PF_INT, 1 << 8).ok is False
    assert c.wrmsr(0x4B564DFF, 0).ok is False
    assert c.rdmsr(0x4B564DFF).ok is False
    assert c.wrmsr(MSR_KVM_ASYNC_PF_INT, -1).ok is False
    c.close()


@pytest.mark.parametrize("enforce", [False, True])
def test_delivery_as_pf_vmexit_is_a_gp_only_when_pv_cpuid_is_enforced(tmp_path, vm_id, enforce):
    """kvm_pv_enable_async_pf refuses DELIVERY_AS_PF_VMEXIT without KVM_FEATURE_ASYNC_PF_VMEXIT only where
    guest_pv_has is false, i.e. with KVM_CAP_ENFORCE_PV_FEATURE_CPUID (--enforce-pv-cpuid); KVM's default stores it."""
    h = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", "16",
                    *(["--enforce-pv-cpuid"] if enforce else []))
    c = WireClient(h.socket)
    try:
        c.hello(vm_id, vcpu=0)
        value = 0x40 | KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
        reply = c.wrmsr(MSR_KVM_ASYNC_PF_EN, value)
        assert reply.ok is not enforce
        assert c.rdmsr(MSR_KVM_ASYNC_PF_EN).value == (0 if enforce else value)
    finally:
        c.close()
        assert h.stop() == 0


def test_out_of_range_exit_is_an_error_not_a_crash(host, vm_id):
    c = WireClient(host.socket)
    c.hello(vm_id, vcpu=0)
    for gpa in (PAGES * PAGE_SIZE, -1, (1 << 64) - 1):
        reply = c.request(ExitMem(gpa, True, True, True))
        assert isinstance(reply, ErrorReply) and reply.code in ("bad_address", "malformed") and not reply.fatal
    c.close()


def test_fatal_frames_drop_only_their_connection(host, vm_id):
    good = WireClient(host.socket)
    good.hello(vm_id, vcpu=1)
    enable_apf(good, vm_id, 1)

    oversized = WireClient(host.socket)
    oversized.hello(vm_id, vcpu=0)
    oversized.send_raw(HEADER.pack(MAX_FRAME + 1) + b"x" * 100)
    reply = oversized.receive()
    assert isinstance(reply, ErrorReply) and reply.code == "frame_too_large" and reply.fatal
    assert oversized.receive() is None  # closed

    truncated = WireClient(host.socket)
    truncated.hello(vm_id, vcpu=0)  # vCPU 0 is free again
    truncated.send_raw(HEADER.pack(100) + b"abc")
    truncated.sock.shutdown(1)
    reply = truncated.receive()
    assert isinstance(reply, ErrorReply) and reply.code == "truncated"

    healthy(good, vm_id, 1, gfn=21)
    wait_until(lambda: sum(1 for e in host.events() if e["event"] == "vcpu_disconnect") >= 2, 5, "disconnects")
    for c in (good, oversized, truncated):
        c.close()


def test_handshake_refusals(host, vm_id):
    first = WireClient(host.socket)
    assert isinstance(first.hello(vm_id, vcpu=3), Welcome)
    for vm, vcpu, code in [("other-vm", 0, "wrong_vm"), (vm_id, 3, "vcpu_busy"), (vm_id, 9, "bad_vcpu")]:
        c = WireClient(host.socket)
        reply = c.hello(vm, vcpu=vcpu)
        assert isinstance(reply, ErrorReply) and reply.code == code and reply.fatal
        assert c.receive() is None
        c.close()
    old = WireClient(host.socket)  # a client of the previous protocol version is told so
    reply = old.hello(vm_id, vcpu=0, proto=PROTOCOL_VERSION - 1)
    assert isinstance(reply, ErrorReply) and reply.code == "bad_version" and reply.fatal
    old.close()
    assigned = WireClient(host.socket)
    assert assigned.hello(vm_id, vcpu=None).vcpu == 0  # the host hands out the lowest free vCPU
    garbage_first = WireClient(host.socket)
    garbage_first.send_raw(frame(b"\xc1"))
    assert garbage_first.receive().fatal is True
    for c in (first, assigned, garbage_first):
        c.close()


def test_garbage_in_the_guests_own_apf_area_is_survived(host, vm_id):
    """A guest that scribbles over its token slot only hurts itself: the host logs it and serves the others."""
    bad = WireClient(host.socket)
    good = WireClient(host.socket)
    bad.hello(vm_id, vcpu=0)
    good.hello(vm_id, vcpu=1)
    enable_apf(bad, vm_id, 0)
    enable_apf(good, vm_id, 1)
    with apf_area(vm_id, 0) as area:
        area.token = 0x12345678  # garbage
        area.flags = 0xFFFFFFFF
        pf = bad.exit_mem(23)
        assert isinstance(pf, InjectException)  # flags is written, never read (apf_put_user_notpresent)
        assert area.flags == KVM_PV_REASON_PAGE_NOT_PRESENT
        wait_until(lambda: any(e["event"] == "apf_slot_busy" for e in host.events()), 5, "apf_slot_busy in the log")
        healthy(good, vm_id, 1, gfn=24)
    bad.close()
    good.close()


def test_a_second_hello_is_fatal_and_frees_the_vcpu(host, vm_id):
    c = WireClient(host.socket)
    assert isinstance(c.hello(vm_id, vcpu=2), Welcome)
    c.send(Hello(PROTOCOL_VERSION, vm_id, 2, 1, "normal", os.getpid(), "socket"))
    reply = c.receive()
    assert isinstance(reply, ErrorReply) and reply.code == "unexpected" and reply.fatal
    assert c.receive() is None  # closed
    c.close()
    wait_until(lambda: any(e["event"] == "vcpu_disconnect" and e["vcpu"] == 2 for e in host.events()), 5,
               "the host to reset vCPU 2")
    again = WireClient(host.socket)
    assert isinstance(again.hello(vm_id, vcpu=2, boot=1), Welcome)  # the same boot again: only a free vCPU takes it
    again.close()
