# Bad input against the real host daemon: every bad frame, message or MSR value gets a clear logged error, only
# fatal framing errors drop the connection, and the other vCPUs keep being served.
from __future__ import annotations

import os

import msgpack
import pytest

from shared.abi import (
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_ENABLED,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.wire import HEADER, MAX_FRAME

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


def enable_apf(client: WireClient, vm_id: str, vcpu: int) -> None:
    assert client.request("msr_write", msr=MSR_KVM_ASYNC_PF_INT, value=0xF3)["ok"]
    client.send("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=async_pf_en_value(vcpu * 64))
    replies = [client.receive(), client.receive()]  # the wake-all interrupt, then the result
    assert {r["t"] for r in replies} == {"interrupt", "msr_result"}
    ram = GuestRam.open(vm_id, RamLayout(PAGES))  # take the wake-all: release the slot and ACK
    area = KvmVcpuPvApfData(ram.u32, vcpu * 64)
    area.token = 0
    area.release()
    ram.close()
    assert client.request("msr_write", msr=0x4B564D07, value=1)["ok"]


def healthy(client: WireClient, vm_id: str, vcpu: int, gfn: int) -> None:
    """A vCPU that keeps working: a full APF cycle on a swapped-out page."""
    ram = GuestRam.open(vm_id, RamLayout(PAGES))
    area = KvmVcpuPvApfData(ram.u32, vcpu * 64)
    try:
        area.token = 0
        pf = client.request("exit_mem", gpa=gfn * PAGE_SIZE, write=True, user=True, irq=True)
        assert pf["t"] == "inject_pf"
        assert area.read_and_reset_flags() == 1
        assert client.receive() == {"t": "interrupt", "vector": 0xF3}
        assert area.token == pf["cr2"]
        area.token = 0
        assert client.request("msr_write", msr=0x4B564D07, value=1)["ok"]
    finally:
        area.release()
        ram.close()


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
    assert bad.hello(vm_id, vcpu=0)["t"] == "welcome"
    assert good.hello(vm_id, vcpu=1)["t"] == "welcome"
    enable_apf(good, vm_id, 1)
    bad.send_raw(frame(payload))
    reply = bad.receive()
    assert reply is not None and reply["t"] == "error"
    assert reply["code"] == code and reply["fatal"] is False
    # the same connection still works
    assert bad.request("msr_write", msr=MSR_KVM_ASYNC_PF_INT, value=0xF3)["ok"]
    healthy(good, vm_id, 1, gfn=20)
    wait_until(lambda: any(e["code"] == code for e in host.events() if e["event"] == "wire_error"), 5,
               "the error in the host log")
    bad.close()
    good.close()


@pytest.mark.parametrize(
    "value,why",
    [
        (0x40 | 0x10 | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, "reserved"),
        (0x48 | 0x04 | KVM_ASYNC_PF_ENABLED, "DELIVERY_AS_PF_VMEXIT"),
        ((PAGES * PAGE_SIZE) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, "outside guest RAM"),
        ((1 << 63) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, "outside guest RAM"),
    ],
)
def test_bad_msr_values_get_gp(host, vm_id, value, why):
    c = WireClient(host.socket)
    c.hello(vm_id, vcpu=2)
    reply = c.request("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=value)
    assert reply["t"] == "msr_result" and reply["ok"] is False and why in reply["error"]
    assert c.request("msr_write", msr=MSR_KVM_ASYNC_PF_INT, value=1 << 8)["ok"] is False
    assert c.request("msr_write", msr=0x4B564DFF, value=0)["ok"] is False
    assert c.request("msr_write", msr=MSR_KVM_ASYNC_PF_INT, value=-1)["ok"] is False
    c.close()


def test_out_of_range_exit_is_an_error_not_a_crash(host, vm_id):
    c = WireClient(host.socket)
    c.hello(vm_id, vcpu=0)
    for gpa in (PAGES * PAGE_SIZE, -1, (1 << 64) - 1):
        reply = c.request("exit_mem", gpa=gpa, write=True, user=True, irq=True)
        assert reply["t"] == "error" and reply["code"] in ("bad_address", "malformed") and not reply["fatal"]
    c.close()


def test_fatal_frames_drop_only_their_connection(host, vm_id):
    good = WireClient(host.socket)
    good.hello(vm_id, vcpu=1)
    enable_apf(good, vm_id, 1)

    oversized = WireClient(host.socket)
    oversized.hello(vm_id, vcpu=0)
    oversized.send_raw(HEADER.pack(MAX_FRAME + 1) + b"x" * 100)
    reply = oversized.receive()
    assert reply["t"] == "error" and reply["code"] == "frame_too_large" and reply["fatal"]
    assert oversized.receive() is None  # closed

    truncated = WireClient(host.socket)
    truncated.hello(vm_id, vcpu=0)  # vCPU 0 is free again
    truncated.send_raw(HEADER.pack(100) + b"abc")
    truncated.sock.shutdown(1)
    reply = truncated.receive()
    assert reply["t"] == "error" and reply["code"] == "truncated"

    healthy(good, vm_id, 1, gfn=21)
    wait_until(lambda: sum(1 for e in host.events() if e["event"] == "vcpu_disconnect") >= 2, 5, "disconnects")
    for c in (good, oversized, truncated):
        c.close()


def test_handshake_refusals(host, vm_id):
    first = WireClient(host.socket)
    assert first.hello(vm_id, vcpu=3)["t"] == "welcome"
    for vm, vcpu, code in [("other-vm", 0, "wrong_vm"), (vm_id, 3, "vcpu_busy"), (vm_id, 9, "bad_vcpu")]:
        c = WireClient(host.socket)
        reply = c.hello(vm, vcpu=vcpu)
        assert reply["t"] == "error" and reply["code"] == code and reply["fatal"]
        assert c.receive() is None
        c.close()
    assigned = WireClient(host.socket)
    assert assigned.hello(vm_id, vcpu=None)["vcpu"] == 0  # the host hands out the lowest free vCPU
    garbage_first = WireClient(host.socket)
    garbage_first.send_raw(frame(b"\xc1"))
    assert garbage_first.receive()["fatal"] is True
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
    ram = GuestRam.open(vm_id, RamLayout(PAGES))
    area = KvmVcpuPvApfData(ram.u32, 0)
    area.token = 0x12345678  # garbage
    area.flags = 0xFFFFFFFF
    pf = bad.request("exit_mem", gpa=23 * PAGE_SIZE, write=True, user=True, irq=True)
    assert pf["t"] == "inject_pf"  # flags is written, never read (apf_put_user_notpresent)
    assert area.flags == 1
    wait_until(lambda: any(e["event"] == "apf_slot_busy" for e in host.events()), 5, "apf_slot_busy in the log")
    healthy(good, vm_id, 1, gfn=24)
    area.release()
    ram.close()
    bad.close()
    good.close()


def test_a_second_hello_is_fatal_and_frees_the_vcpu(host, vm_id):
    c = WireClient(host.socket)
    assert c.hello(vm_id, vcpu=2)["t"] == "welcome"
    c.send("hello", proto=2, vm=vm_id, vcpu=2, boot=1, kind="normal", pid=os.getpid(), transport="socket")
    reply = c.receive()
    assert reply is not None and reply["t"] == "error" and reply["code"] == "unexpected" and reply["fatal"]
    assert c.receive() is None  # closed
    c.close()
    wait_until(lambda: any(e["event"] == "vcpu_disconnect" and e["vcpu"] == 2 for e in host.events()), 5,
               "the host to reset vCPU 2")
    again = WireClient(host.socket)
    assert again.hello(vm_id, vcpu=2, boot=1)["t"] == "welcome"  # the same boot again: only a free vCPU takes it
    again.close()
