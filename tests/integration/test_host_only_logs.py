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
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_APF_WAKE_ALL_TOKEN,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import GuestRam, RamLayout
from shared.wire import InjectException, Interrupt, MsrRead, MsrResult, Welcome

from .helpers import ROOT, HostProcess, WireClient, wait_until

PAGES = 32


class ScriptedGuest:
    """vCPU 0 of a guest that logs nothing, driven message by message."""

    def __init__(self, host: HostProcess, vm_id: str) -> None:
        self.host = host
        self.c = WireClient(host.socket)
        assert isinstance(self.c.hello(vm_id, vcpu=0), Welcome)
        self.ram = GuestRam.open(vm_id, RamLayout(PAGES))
        self.area = KvmVcpuPvApfData(self.ram.u32, 0)

    @property
    def interrupts(self) -> int:
        return self.c.interrupts

    def interrupt(self) -> None:
        msg = self.c.receive()
        assert msg == Interrupt(HYPERVISOR_CALLBACK_VECTOR), msg

    def enable(self) -> None:
        """The LAPIC software-enabled, then MSR_KVM_ASYNC_PF_INT and _EN (the wake-all, if it comes before the
        result, is counted in `interrupts`)."""
        self.c.enable_apf(None)

    def fault(self, gfn: int) -> int:
        """A user-mode access to a swapped-out page: the injected #PF's token (CR2); the flags are read and reset."""
        pf = self.c.exit_mem(gfn)
        assert isinstance(pf, InjectException), pf
        self.area.flags = 0
        return pf.cr2

    def release_and_ack(self) -> None:
        self.area.token = 0
        assert self.c.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1).ok

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
    between is not kicked in (pageready_pending, kvm_arch_async_page_present_queued), but the next exit's entry
    delivers it, since kvm_arch_can_dequeue_async_page_present looks only at the slot; the host's `released` says
    the slot was found free, and the checker takes it as the release."""
    g = ScriptedGuest(host, vm_id)
    try:
        g.enable()
        if g.interrupts == 0:
            g.interrupt()  # the wake-all
        assert g.area.token == KVM_APF_WAKE_ALL_TOKEN
        g.release_and_ack()
        a = g.fault(20)
        g.interrupt()
        assert g.area.token == a
        g.area.token = 0  # released; the ACK comes later
        b = g.fault(21)
        wait_until(lambda: any(e["event"] == "kvm_async_pf_completed" and e["token"] == b for e in host.events()),
                   5, "the second page-in to complete")
        # any exit (here a RDMSR) ends with an entry that delivers it, before the exit's own result
        g.c.send(MsrRead(MSR_KVM_ASYNC_PF_EN))
        g.interrupt()
        assert isinstance(g.c.receive(), MsrResult)
        assert g.area.token == b
        assert g.c.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1).ok  # the first page-ready's ACK
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
        g.fault(22)
        g.interrupt()  # its page-ready: left unread, not ACKed
        assert g.c.wrmsr(MSR_KVM_ASYNC_PF_EN, 0).ok
        before = g.interrupts
        g.enable()
        assert g.interrupts == before  # the wake-all waits for the slot
        g.release_and_ack()
        if g.interrupts == before:
            g.interrupt()
        assert g.area.token == KVM_APF_WAKE_ALL_TOKEN
        g.release_and_ack()
        g.fault(23)
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
