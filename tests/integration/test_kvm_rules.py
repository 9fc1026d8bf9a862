# KVM's rules of delivery, shown on the real host daemon with a scripted vCPU (no guest agent): the artificial halt
# (kvm_can_do_async_pf, KVM_REQ_APF_HALT), delivery at entry (kvm_arch_async_page_present_queued,
# kvm_check_async_pf_completion), the wake-all skip (kvm_async_pf_wakeup_all), the ACK's bit 0, the LAPIC's software
# enable (kvm_arch_can_dequeue_async_page_present), RDMSR (kvm_get_msr_common) and the disable's wait for the page-ins
# in flight (kvm_clear_async_pf_completion_queue). Each test reads the host's log for what happened inside the host,
# and the frames for what reached the guest.
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shared.abi import (
    APIC_SPIV_APIC_ENABLED,
    APIC_SPIV_RESET,
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_APF_WAKE_ALL_TOKEN,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_X2APIC_SPIV,
    SPURIOUS_APIC_VECTOR,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.wire import PF_VECTOR, ExitMem, InjectException, Interrupt, MsrResult, MsrWrite, Resume, Welcome

from .helpers import HostProcess, WireClient, wait_until

PAGES, RESIDENT = 64, 16
OUT = list(range(RESIDENT + 1, PAGES))  # swapped out at start


class Vcpu:
    """vCPU 0, scripted: its frames, and its APF area in guest RAM."""

    def __init__(self, host: HostProcess) -> None:
        self.host = host
        self.c = WireClient(host.socket)
        assert isinstance(self.c.hello(host.vm, vcpu=0), Welcome)
        self.ram = GuestRam.open(host.vm, RamLayout(PAGES))
        self.area = KvmVcpuPvApfData(self.ram.u32, 0)

    def fault(self, gfn: int, *, user: bool = True) -> int:
        """An access with interrupts on that must become an injected APF; returns its token (CR2)."""
        pf = self.c.exit_mem(gfn, user=user)
        assert isinstance(pf, InjectException) and pf.vector == PF_VECTOR, pf
        self.area.flags = 0  # kvm_read_and_reset_apf_flags
        return pf.cr2

    def interrupt(self) -> None:
        assert self.c.receive() == Interrupt(HYPERVISOR_CALLBACK_VECTOR)

    def take_page_ready(self) -> int:
        """sysvec_kvm_asyncpf_interrupt: read the slot, write 0, ACK. Returns the token it found."""
        token = self.area.token
        self.area.token = 0
        assert self.c.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1).ok
        return token

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.host.events() if e["event"] == name and all(e.get(k) == v for k, v in match.items())]

    def wait_completed(self, token: int) -> None:
        wait_until(lambda: bool(self.events("kvm_async_pf_completed", token=token)), 10, f"{token:#x} to complete")

    def close(self) -> None:
        self.area.release()
        self.ram.close()
        self.c.close()


@pytest.fixture
def vcpu(request, tmp_path, vm_id) -> Iterator[Vcpu]:
    latency = getattr(request, "param", ["--page-in-latency", "fixed:150ms"])
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", str(RESIDENT), *latency)
    v = Vcpu(host)
    try:
        yield v
    finally:
        v.close()
        assert host.stop() == 0


def enable(v: Vcpu) -> None:
    v.c.enable_apf(v.area)  # the LAPIC, the vector, APF on; the wake-all taken
    v.c.interrupts = 0  # from here on, `interrupts` counts the page-readies that came before a reply


# Page-in latencies drawn from the host's seeded generator: with seed 1 the first three page-ins take about 84, 427
# and 387 ms, so x's is done well before z's (equal latencies would let trio wake both in one batch, in any order).
@pytest.mark.parametrize("vcpu", [["--seed", "1", "--page-in-latency", "uniform:20ms:500ms"]], indirect=True,
                         ids=["seeded"])
def test_artificial_halt_delivers_interrupts_and_injects_nothing_of_its_own(vcpu):
    """kvm_can_do_async_pf allows the halt with interrupts on; kvm_arch_async_page_not_present cannot deliver at
    CPL 0 without SEND_ALWAYS (kvm_can_deliver_async_pf), so it requests KVM_REQ_APF_HALT; a fault on a gfn already
    in the hash is kvm_async_pf_repeated_fault, which halts too; the halted vCPU takes the page-ready of another
    token (kvm_vcpu_has_events), and its own event is traced ready but never injected (notpresent_injected)."""
    v = vcpu
    enable(v)
    x, z, y = OUT[0], OUT[1], OUT[2]
    tx = v.fault(x)
    tz = v.fault(z)
    # kernel mode on z: z is being paged in, so this is a repeated fault, and the vCPU halts until it has events;
    # x's page-in started first and ends first: its page-ready reaches the halted vCPU, before the exit's reply
    v.c.send(ExitMem(z * PAGE_SIZE, True, False, True))
    v.interrupt()
    assert v.area.token == tx
    assert v.c.receive() == Resume(z * PAGE_SIZE)
    assert v.take_page_ready() == tx
    # a fresh page in kernel mode: the event exists (counted, hashed, traced) but only the halt follows; the halt
    # also ends when z's event is done (kvm_arch_async_page_present ends it for any item), so the guest retries, as
    # Linux does, taking the page-readies that come meanwhile, until y is in
    assert v.c.exit_mem(y, user=False) == Resume(y * PAGE_SIZE)
    (ny,) = v.events("kvm_async_pf_not_present", gfn=y)
    taken = []
    while not v.events("kvm_async_pf_ready", token=ny["token"]):
        if v.area.token:
            taken.append(v.take_page_ready())
        assert v.c.exit_mem(y, user=False) == Resume(y * PAGE_SIZE)
    if tz not in taken:
        wait_until(lambda: v.area.token == tz, 10, "z's page-ready in the slot")
        taken.append(v.take_page_ready())
    assert taken == [tz]
    assert v.events("kvm_async_pf_repeated_fault", gfn=z, gva=z * PAGE_SIZE)
    assert ny["injected"] is False
    (ry,) = v.events("kvm_async_pf_ready", token=ny["token"])
    assert ry["injected"] is False and ry["vector"] is None
    assert {e["reason"] for e in v.events("apf_halt")} == {"repeated_fault", "kernel_mode"}
    assert [e["token"] for e in v.events("kvm_async_pf_ready", injected=True)] == [KVM_APF_WAKE_ALL_TOKEN, tx, tz]


def test_a_completion_after_the_slot_is_freed_waits_for_the_ack(vcpu):
    """kvm_arch_async_page_present_queued kicks the vCPU only if no page-ready is pending; Linux frees the slot and
    then ACKs with no exit between, so the completion is delivered by the ACK (kvm_set_msr_common ->
    kvm_check_async_pf_completion), before the ACK's own result."""
    v = vcpu
    enable(v)
    a = v.fault(OUT[0])
    v.interrupt()
    assert v.area.token == a
    v.area.token = 0  # freed; the ACK not yet written
    b = v.fault(OUT[1])
    v.wait_completed(b)
    assert v.c.interrupts == 0
    v.c.send(MsrWrite(MSR_KVM_ASYNC_PF_ACK, 1))
    v.interrupt()
    assert isinstance(v.c.receive(), MsrResult)
    assert v.take_page_ready() == b
    (ack,) = [e for e in v.events("apf_ack")][-2:-1]
    (ready_b,) = v.events("kvm_async_pf_ready", token=b)
    (completed_b,) = v.events("kvm_async_pf_completed", token=b)
    assert completed_b["mono_ns"] < ack["mono_ns"] < ready_b["mono_ns"]


def test_enabling_skips_the_wake_all_while_events_are_done(vcpu):
    """kvm_async_pf_wakeup_all returns at once if the done list is not empty: re-enabling then queues no wake-all,
    and what was done is delivered as it is."""
    v = vcpu
    enable(v)
    a = v.fault(OUT[0])
    v.interrupt()
    assert v.area.token == a  # left in the slot: the next completion stays on the done list
    b = v.fault(OUT[1])
    v.wait_completed(b)
    assert v.c.wrmsr(MSR_KVM_ASYNC_PF_EN, async_pf_en_value(0)).ok  # enabled again, same area
    assert v.take_page_ready() == a
    assert v.c.interrupts == 1  # b, raised by the ACK's entry
    assert v.take_page_ready() == b
    (skipped,) = v.events("apf_wakeup_all_skipped")
    assert skipped["done"] == 1
    assert [e["token"] for e in v.events("kvm_async_pf_ready")] == [KVM_APF_WAKE_ALL_TOKEN, a, b]


def test_the_ack_acts_on_bit_0(vcpu):
    """MSR_KVM_ASYNC_PF_ACK: `if (data & 0x1)` clears pageready_pending and re-scans. 2 leaves the page-ready
    pending, so a completion is not kicked in; 3 is an ACK."""
    v = vcpu
    enable(v)
    a = v.fault(OUT[0])
    v.interrupt()
    v.area.token = 0
    assert v.c.wrmsr(MSR_KVM_ASYNC_PF_ACK, 2).ok  # not an ACK: pageready_pending stays
    b = v.fault(OUT[1])
    v.wait_completed(b)
    assert v.c.interrupts == 0
    assert v.c.wrmsr(MSR_KVM_ASYNC_PF_ACK, 3).ok
    assert v.c.interrupts == 1
    assert v.take_page_ready() == b
    acks = v.events("apf_ack")
    assert [e["value"] for e in acks] == [1, 3, 1]  # the wake-all's, 3, b's: the 2 did nothing
    (ready_b,) = v.events("kvm_async_pf_ready", token=b)
    assert ready_b["mono_ns"] > acks[1]["mono_ns"]
    assert a != b


def test_no_page_ready_while_the_lapic_is_disabled(vcpu):
    """kvm_arch_can_dequeue_async_page_present: with APF on, the LAPIC must be enabled. Not-present #PFs are still
    injected (kvm_can_deliver_async_pf does not look at it); their page-readies wait, and enabling the LAPIC
    (apic_set_spiv raises KVM_REQ_APF_READY) delivers the wake-all, then the rest."""
    v = vcpu
    assert v.c.rdmsr(MSR_X2APIC_SPIV).value == APIC_SPIV_RESET
    v.c.enable_apf(v.area, lapic=False)
    assert v.c.interrupts == 0  # the wake-all is queued, not delivered
    a = v.fault(OUT[0])
    v.wait_completed(a)
    assert v.c.wrmsr(MSR_KVM_ASYNC_PF_EN, async_pf_en_value(0)).ok  # entries, but nothing can be dequeued
    assert v.c.interrupts == 0 and v.area.token == 0
    assert not v.events("kvm_async_pf_ready")
    assert v.c.wrmsr(MSR_X2APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR).ok
    assert v.c.interrupts == 1
    assert v.take_page_ready() == KVM_APF_WAKE_ALL_TOKEN
    assert v.c.interrupts == 2
    assert v.take_page_ready() == a


def test_rdmsr_returns_what_kvm_returns(vcpu):
    """kvm_get_msr_common: MSR_KVM_ASYNC_PF_EN and _INT as written, _ACK reads 0; an unknown MSR is #GP."""
    v = vcpu
    assert (v.c.rdmsr(MSR_KVM_ASYNC_PF_EN).value, v.c.rdmsr(MSR_KVM_ASYNC_PF_INT).value) == (0, 0)
    enable(v)
    assert v.c.rdmsr(MSR_KVM_ASYNC_PF_EN) == MsrResult(MSR_KVM_ASYNC_PF_EN, True, None, async_pf_en_value(0))
    assert v.c.rdmsr(MSR_KVM_ASYNC_PF_INT).value == HYPERVISOR_CALLBACK_VECTOR
    assert v.c.rdmsr(MSR_KVM_ASYNC_PF_ACK).value == 0
    assert v.c.rdmsr(MSR_X2APIC_SPIV).value == APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR
    unknown = v.c.rdmsr(0x4B564DFF)
    assert unknown.ok is False and unknown.value is None


def test_disabling_waits_for_the_page_ins_in_flight(vcpu):
    """kvm_clear_async_pf_completion_queue calls cancel_work_sync for every queued item: the disabling WRMSR exit
    lasts until each page-in that is running has finished, which completes as usual (kvm_async_pf_completed); then
    everything is freed and nothing reaches the guest."""
    v = vcpu
    enable(v)
    a = v.fault(OUT[0])  # 150 ms of page-in ahead
    assert v.c.wrmsr(MSR_KVM_ASYNC_PF_EN, 0).ok
    # The reply has come: by then the page-in has ended and been traced, and the event eaten.
    (completed,) = v.events("kvm_async_pf_completed", token=a)
    (dropped,) = v.events("apf_ready_dropped", token=a)
    (disable,) = v.events("msr_write", msr="MSR_KVM_ASYNC_PF_EN", value=0)
    assert disable["mono_ns"] < completed["mono_ns"] < dropped["mono_ns"]
    assert dropped["reason"] == "apf_disabled" and not v.events("kvm_async_pf_ready", token=a)
    assert v.c.interrupts == 0 and v.area.token == 0
