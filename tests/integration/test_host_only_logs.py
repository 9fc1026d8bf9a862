# The checker on the logs of guests that do not log (other people's clients, scripted here): the host's own view is
# all it has, and it must neither invent violations nor miss the ones that host-side events can show.
from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from apf_emu.checker import check_events
from shared.abi import (
    KVM_APF_WAKE_ALL_TOKEN,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout

from .helpers import ROOT, HostProcess, WireClient, wait_until

PAGES = 32


class ScriptedGuest:
    """vCPU 0 of a guest that logs nothing, driven message by message."""

    def __init__(self, host: HostProcess, vm_id: str) -> None:
        self.host = host
        self.c = WireClient(host.socket)
        assert self.c.hello(vm_id, vcpu=0)["t"] == "welcome"
        self.ram = GuestRam.open(vm_id, RamLayout(PAGES))
        self.area = KvmVcpuPvApfData(self.ram.u32, 0)
        self.reply = self.c.reply

    @property
    def interrupts(self) -> int:
        return self.c.interrupts

    def interrupt(self) -> None:
        msg = self.c.receive()
        assert msg == {"t": "interrupt", "vector": 0xF3}, msg

    def enable(self) -> None:
        assert self.reply("msr_write", msr=MSR_KVM_ASYNC_PF_INT, value=0xF3)["ok"]
        assert self.reply("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=async_pf_en_value(0))["ok"]

    def release_and_ack(self) -> None:
        self.area.token = 0
        assert self.reply("msr_write", msr=MSR_KVM_ASYNC_PF_ACK, value=1)["ok"]

    def close(self) -> None:
        self.area.release()
        self.ram.close()
        self.c.close()


@pytest.fixture
def host(tmp_path, vm_id):
    h = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", "16",
                    "--page-in-latency", "fixed:20ms")
    yield h
    assert h.stop() == 0


def host_log(host: HostProcess) -> list[dict]:
    return sorted(host.events(), key=lambda e: e["mono_ns"])


def test_a_guest_that_frees_the_slot_before_its_ack_passes(host, vm_id):
    """Linux's order (sysvec_kvm_asyncpf_interrupt): write 0 to the token, then ACK. A completion that comes in
    between finds the slot free; the host's `released` says so, and the checker takes it as the release."""
    g = ScriptedGuest(host, vm_id)
    try:
        g.enable()
        if g.interrupts == 0:
            g.interrupt()  # the wake-all
        assert g.area.token == KVM_APF_WAKE_ALL_TOKEN
        g.release_and_ack()
        first = g.reply("exit_mem", gpa=20 * PAGE_SIZE, write=True, user=True, irq=True)
        assert first["t"] == "inject_pf"
        g.area.flags = 0
        g.interrupt()
        a = g.area.token
        assert a == first["cr2"]
        g.area.token = 0  # released; the ACK comes later
        second = g.reply("exit_mem", gpa=21 * PAGE_SIZE, write=True, user=True, irq=True)
        assert second["t"] == "inject_pf"
        g.area.flags = 0
        b = second["cr2"]
        g.interrupt()  # its page-in completes while the slot is free and the ACK has not been written
        assert g.area.token == b
        assert g.reply("msr_write", msr=MSR_KVM_ASYNC_PF_ACK, value=1)["ok"]  # the first page-ready's ACK
        g.release_and_ack()
    finally:
        g.close()
    events = host_log(host)
    readies = [e for e in events if e["event"] == "kvm_async_pf_ready"]
    assert readies[-1]["token"] == b and readies[-1]["released"] == a
    acks = [e["mono_ns"] for e in events if e["event"] == "apf_ack"]
    assert readies[-1]["mono_ns"] < acks[-2]  # it really came before the first page-ready's ACK
    assert check_events(events) == []
    # ... and a page-ready whose slot the host had not found released is still flagged
    bad = [dict(e, released=None) if e is readies[-1] else e for e in events]
    assert {v.invariant for v in check_events(bad)} == {"one_unacked_ready"}


def test_disable_then_enable_with_a_page_ready_unread(host, vm_id):
    """kvm_pv_disable_apf leaves the slot as it is; after the re-enable the wake-all waits for the slot, the guest
    clears it and gets the wake-all. Nothing of it is a delivery while disabled."""
    g = ScriptedGuest(host, vm_id)
    try:
        g.enable()
        if g.interrupts == 0:
            g.interrupt()
        g.release_and_ack()
        pf = g.reply("exit_mem", gpa=22 * PAGE_SIZE, write=True, user=True, irq=True)
        assert pf["t"] == "inject_pf"
        g.interrupt()  # its page-ready: left unread
        assert g.reply("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=0)["ok"]
        before = g.interrupts
        g.enable()
        assert g.interrupts == before  # the wake-all waits for the slot
        g.release_and_ack()
        if g.interrupts == before:
            g.interrupt()
        assert g.area.token == KVM_APF_WAKE_ALL_TOKEN
        g.release_and_ack()
        pf2 = g.reply("exit_mem", gpa=23 * PAGE_SIZE, write=True, user=True, irq=True)
        assert pf2["t"] == "inject_pf"
        g.interrupt()
        g.release_and_ack()
    finally:
        g.close()
    events = host_log(host)
    names = [e["event"] for e in events]
    assert names.count("kvm_async_pf_ready") == 4  # wake-all, the unread one, wake-all again, the last
    assert check_events(events) == []


@pytest.mark.parametrize("content", [b"", b"hello\nworld\n", os.urandom(3000), b'{"event": "x"}\n'])
def test_a_check_that_finds_no_protocol_event_says_so(tmp_path, content):
    path = tmp_path / "not-a-log.jsonl"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing to check" in proc.stderr and "invariants" not in proc.stdout


def test_a_host_only_log_is_checked(host, vm_id, tmp_path):
    """...while a log with protocol events from the host alone is judged (exit 0, not 2)."""
    g = ScriptedGuest(host, vm_id)
    g.enable()
    g.close()
    wait_until(lambda: any(e["event"] == "vcpu_disconnect" for e in host.events()), 5, "the disconnect")
    path = tmp_path / "host.jsonl"
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert orjson.loads(path.read_bytes().splitlines()[0])["event"] == "host_ready"
