# The host's per-vCPU APF state machine, sans I/O: MSR validation and the ready queue under arbitrary interleavings.
from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from host_daemon.vcpu import VcpuApf
from shared.abi import (
    ASYNC_PF_PER_VCPU,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    token_is_well_formed,
)
from tests.conftest import EventLog

PAGES = 16
AREA = 64 * 3
ON = AREA | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT


def make_vcpu(vcpu_id: int = 3) -> tuple[VcpuApf, EventLog]:
    log = EventLog()
    ram = memoryview(bytearray(PAGES * 4096)).cast("I")
    return VcpuApf(vcpu_id, ram, PAGES, log), log


def enable(vcpu: VcpuApf, value: int = ON) -> None:
    """Enable APF as a guest does and consume the wake-all that enabling sends (release the slot, ACK)."""
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, value).ok
    assert vcpu.check_completion() is not None
    assert vcpu.area is not None and vcpu.area.token == KVM_APF_WAKE_ALL_TOKEN
    vcpu.area.token = 0
    vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 1)


@pytest.mark.parametrize(
    "msr,value,ok",
    [
        (MSR_KVM_ASYNC_PF_INT, 0xF3, True),
        (MSR_KVM_ASYNC_PF_INT, 0x1F3, False),  # bits 63:8 reserved
        (MSR_KVM_ASYNC_PF_EN, ON, True),
        (MSR_KVM_ASYNC_PF_EN, ON | 0x10, False),  # bit 4 reserved
        (MSR_KVM_ASYNC_PF_EN, ON | 0x20, False),  # bit 5 reserved
        (MSR_KVM_ASYNC_PF_EN, ON | KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT, False),  # feature not advertised
        (MSR_KVM_ASYNC_PF_EN, (PAGES * 4096) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, False),
        (MSR_KVM_ASYNC_PF_EN, ((PAGES * 4096) - 64) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, True),
        (MSR_KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED, True),  # accepted, but APF stays off
        (MSR_KVM_ASYNC_PF_EN, 0, True),
        (MSR_KVM_ASYNC_PF_ACK, 1, True),
        (MSR_KVM_ASYNC_PF_ACK, 7, True),  # ignored
        (0x4B564D09, 0, False),  # unknown MSR
        (MSR_KVM_ASYNC_PF_INT, 1 << 64, False),
        (MSR_KVM_ASYNC_PF_INT, -1, False),
    ],
)
def test_msr_writes_are_validated_like_kvm(msr, value, ok):
    vcpu, _ = make_vcpu()
    assert vcpu.write_msr(msr, value).ok is ok


def test_enabled_without_int_delivery_never_delivers():
    vcpu, log = make_vcpu()
    vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED)
    assert not vcpu.apf_enabled
    assert vcpu.on_fault(5, user=True, irq=True).reason == "apf_disabled"
    assert vcpu.check_completion() is None
    assert "kvm_async_pf_not_present" not in log.names()


def test_enable_queues_a_wake_all():
    vcpu, _log = make_vcpu()
    vcpu.write_msr(MSR_KVM_ASYNC_PF_INT, 0xF3)
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON).rescan
    assert vcpu.check_completion() == 0xF3
    assert vcpu.area is not None and vcpu.area.token == KVM_APF_WAKE_ALL_TOKEN


@pytest.mark.parametrize(
    "user,irq,send_always,reason",
    [(True, False, False, "irq_disabled"), (False, True, False, "kernel_mode"), (False, True, True, None),
     (True, True, False, None)],
)
def test_when_an_apf_may_be_delivered(user, irq, send_always, reason):
    vcpu, _ = make_vcpu()
    enable(vcpu, ON | (KVM_ASYNC_PF_SEND_ALWAYS if send_always else 0))
    decision = vcpu.on_fault(5, user=user, irq=irq)
    assert decision.reason == reason
    assert (decision.apf is not None) == (reason is None)


def test_apf_put_user_notpresent_writes_flags_without_reading_them():
    """KVM stores KVM_PV_REASON_PAGE_NOT_PRESENT and injects; a `flags` the guest has not reset refuses nothing
    (x86.c apf_put_user_notpresent, kvm_arch_async_page_not_present)."""
    vcpu, log = make_vcpu()
    enable(vcpu)
    first = vcpu.on_fault(5, user=True, irq=True).apf
    assert first is not None and vcpu.area is not None and vcpu.area.flags == 1
    vcpu.area.flags = 0xDEAD  # left over, or garbage: not read
    second = vcpu.on_fault(6, user=True, irq=True).apf
    assert second is not None and vcpu.area.flags == 1
    assert vcpu.on_fault(5, user=True, irq=True).reason == "repeated_fault"
    assert "kvm_async_pf_repeated_fault" in log.names()


def test_no_token_is_handed_out_before_the_guest_acked_the_wake_all():
    vcpu, _ = make_vcpu()
    vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON)
    assert vcpu.on_fault(5, user=True, irq=True).reason == "wake_all_pending"  # queued
    vcpu.check_completion()
    assert vcpu.on_fault(5, user=True, irq=True).reason == "wake_all_pending"  # delivered, not yet taken
    assert vcpu.area is not None
    vcpu.area.token = 0
    vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 1)
    assert vcpu.on_fault(5, user=True, irq=True).apf is not None


def test_queue_is_capped_at_64():
    vcpu, _ = make_vcpu()
    enable(vcpu)
    assert vcpu.area is not None
    for gfn in range(ASYNC_PF_PER_VCPU):
        assert vcpu.on_fault(1000 + gfn, user=True, irq=True).apf is not None
        vcpu.area.flags = 0
    assert vcpu.on_fault(2000, user=True, irq=True).reason == "queue_full"


def test_disable_eats_completions_and_synchronous_faults_get_no_ready():
    vcpu, log = make_vcpu()
    enable(vcpu)
    item = vcpu.on_fault(5, user=True, irq=True).apf
    assert item is not None
    vcpu.on_fault(6, user=True, irq=False)  # synchronous
    vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, 0)
    assert not vcpu.complete(item)
    assert vcpu.check_completion() is None
    dropped = [kw for e, kw in log.events if e == "apf_ready_dropped"]
    assert dropped == [{"token": item.token, "gfn": 5, "reason": "apf_disabled"}]


class ReadyQueueMachine(RuleBasedStateMachine):
    """The host side with a well-behaved guest: faults, page-in completions, guest slot handling and ACKs, disable
    and re-enable, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.vcpu, self.log = make_vcpu(5)
        self.vcpu.write_msr(MSR_KVM_ASYNC_PF_INT, 0xEC)
        self.vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON)
        self.in_flight: list = []  # items whose page-in has not completed
        self.slot_holder: int | None = None  # token delivered and not yet released by the guest
        self.injected: set[int] = set()
        self.delivered: list[int] = []
        self.enabled = True
        self.rescan()

    def rescan(self) -> None:
        before = len([e for e in self.log.names() if e == "kvm_async_pf_ready"])
        vector = self.vcpu.check_completion()
        after = [kw for e, kw in self.log.events if e == "kvm_async_pf_ready"]
        if vector is None:
            assert len(after) == before
            return
        assert vector == 0xEC and self.enabled
        assert self.slot_holder is None, "page-ready while the slot is taken"
        token = after[-1]["token"]
        assert self.vcpu.area is not None and self.vcpu.area.token == token
        if token != KVM_APF_WAKE_ALL_TOKEN:
            assert token in self.injected and token not in self.delivered
        self.delivered.append(token)
        self.slot_holder = token

    @rule(gfn=st.integers(1, 40), user=st.booleans(), irq=st.booleans())
    def fault(self, gfn, user, irq) -> None:
        decision = self.vcpu.on_fault(gfn, user=user, irq=irq)
        if decision.apf is not None:
            assert self.enabled and user and irq
            token = decision.apf.token
            assert token_is_well_formed(token, 5) and token not in self.injected
            self.injected.add(token)
            self.in_flight.append(decision.apf)
            assert self.vcpu.area is not None
            self.vcpu.area.flags = 0  # the guest's #PF handler consumes it

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def complete(self, data) -> None:
        item = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        if self.vcpu.complete(item):
            self.rescan()

    @precondition(lambda self: self.slot_holder is not None)
    @rule(ack_first=st.booleans())
    def guest_interrupt(self, ack_first) -> None:
        assert self.vcpu.area is not None
        self.vcpu.area.token = 0
        self.slot_holder = None
        if ack_first:
            self.vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 1)
            self.rescan()

    @rule()
    def ack(self) -> None:
        self.vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 1)
        self.rescan()

    @rule()
    def disable(self) -> None:
        self.vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, 0)
        self.enabled = False
        self.slot_holder = None
        assert self.vcpu.queued == 0

    @precondition(lambda self: not self.enabled)
    @rule()
    def enable(self) -> None:
        self.vcpu.area = None
        self.vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON)
        assert self.vcpu.area is not None
        self.vcpu.area.token = 0
        self.vcpu.area.flags = 0
        self.enabled = True
        self.rescan()

    def teardown(self) -> None:
        # Liveness: once every page-in completes and the guest keeps releasing and ACKing, every injected token that
        # was not eaten by a disable gets exactly one page-ready.
        while self.in_flight:
            self.complete_now(self.in_flight.pop())
        if self.slot_holder is None:
            self.ack()  # a guest that released the slot ACKs too (KVM re-scans only on ACK or a new completion)
        while self.slot_holder is not None:
            self.guest_interrupt(ack_first=True)
        dropped = {kw["token"] for e, kw in self.log.events if e == "apf_ready_dropped"}
        delivered = [t for t in self.delivered if t != KVM_APF_WAKE_ALL_TOKEN]
        assert sorted(delivered) == sorted(self.injected - dropped)

    def complete_now(self, item) -> None:
        if self.vcpu.complete(item):
            self.rescan()

    @invariant()
    def bounded(self) -> None:
        assert self.vcpu.queued <= ASYNC_PF_PER_VCPU + 1  # 64 faults, plus a wake-all
        assert len(self.vcpu.gfn_hash) <= ASYNC_PF_PER_VCPU


TestReadyQueueMachine = ReadyQueueMachine.TestCase


@pytest.mark.parametrize(
    "msr,value,gfn",
    [(MSR_KVM_ASYNC_PF_EN, (5 * 4096 + 128) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, 5),
     (MSR_KVM_ASYNC_PF_EN, ON | 0x10, None), (MSR_KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED, None),
     (MSR_KVM_ASYNC_PF_EN, 0, None), (MSR_KVM_ASYNC_PF_INT, ON, None),
     (MSR_KVM_ASYNC_PF_EN, (PAGES * 4096) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, None)],
)
def test_area_gfn_enabled_by_agrees_with_write_msr(msr, value, gfn):
    vcpu, _ = make_vcpu()
    assert vcpu.area_gfn_enabled_by(msr, value) == gfn
    vcpu.write_msr(msr, value)
    assert (vcpu.area.gpa // 4096 if vcpu.area is not None else None) == gfn
