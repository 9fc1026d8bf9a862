# The two sans-I/O cores wired to each other, in one process, over one guest RAM: host_daemon/vcpu.py (KVM) and
# guest_agent/apf.py (Linux 5.8+). Interleavings that need both sides are replayed here step by step, exactly as
# the two kernels would run them, to say whether a failure is apf-emu's or KVM's and Linux's own.
from __future__ import annotations

from dataclasses import dataclass

from guest_agent.apf import GuestApf, Pf
from host_daemon.vcpu import AsyncPf, Fault, VcpuApf
from shared.abi import (
    APF_EMU_CPUID_FEATURES,
    APIC_SPIV_APIC_ENABLED,
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_APF_WAKE_ALL_TOKEN,
    MSR_X2APIC_SPIV,
    SPURIOUS_APIC_VECTOR,
)
from shared.apf_data import KvmVcpuPvApfData
from tests.conftest import EventLog

PAGES, AREA = 64, 0


@dataclass(frozen=True)
class Task:
    tid: int


class Machine:
    """One vCPU: KVM's state for it, the Linux guest on it, and the IRR bit of the page-ready vector."""

    def __init__(self) -> None:
        ram = memoryview(bytearray(PAGES * 4096)).cast("I")
        self.host_log, self.guest_log = EventLog(), EventLog()
        self.kvm = VcpuApf(0, ram, PAGES, self.host_log)
        self.linux: GuestApf[Task] = GuestApf(KvmVcpuPvApfData(ram, AREA), self.guest_log)
        self.irr = False
        self.items: dict[int, AsyncPf] = {}  # every event created, also after KVM dropped it

    def wrmsr(self, msr: int, value: int) -> None:
        """A WRMSR exit, and the entry that ends it. Turning APF off waits for the page-ins in flight
        (kvm_clear_async_pf_completion_queue): they complete during the exit."""
        result = self.kvm.write_msr(msr, value)
        assert result.ok, result.error
        if result.flush is not None:
            for item in result.flush:
                self.kvm.complete(item)
            self.kvm.clear_async_pf_completion_queue("apf_disabled")
        self._raise(list(result.vectors) + self.kvm.entry())

    def entry(self) -> None:
        self._raise(self.kvm.entry())

    def _raise(self, vectors: list[int]) -> None:
        if vectors:
            assert vectors == [HYPERVISOR_CALLBACK_VECTOR]
            self.irr = True

    def boot(self) -> None:
        self.wrmsr(MSR_X2APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR)  # setup_local_APIC
        assert self.linux.guest_cpu_init(self.wrmsr, cpuid=APF_EMU_CPUID_FEATURES, vector=HYPERVISOR_CALLBACK_VECTOR)
        self.take_interrupt()  # the wake-all of the enabling write

    def take_interrupt(self) -> list[int]:
        """Interrupts on: sysvec_kvm_asyncpf_interrupt if the vector is pending. Returns the tids woken."""
        if not self.irr:
            return []
        self.irr = False
        woken = self.linux.asyncpf_interrupt(self.wrmsr)
        return [w.task.tid for w in woken or []]

    def user_fault(self, gfn: int, task: Task) -> int:
        """A user task touches a swapped-out page: KVM injects a not-present, Linux puts the task to sleep."""
        decision = self.kvm.on_fault(gfn, gfn * 4096, user=True, irq=True)
        assert decision.kind is Fault.INJECT and decision.item is not None
        self.items[decision.item.token] = decision.item
        self.entry()
        flags = self.linux.read_and_reset_flags()
        assert self.linux.handle_async_pf(flags, decision.item.token, task, user=True, irq=True) is Pf.SLEEP
        return decision.item.token

    def complete(self, token: int) -> None:
        """async_pf_execute; a kick (an entry) if KVM asks for one."""
        if self.kvm.complete(self.items[token]):
            self.entry()


def test_the_stale_slot_race_of_cpu_offline_blocks_every_later_page_ready():
    """Linux's kvm_cpu_down_prepare disables interrupts, then kvm_guest_cpu_offline(false) writes
    MSR_KVM_ASYNC_PF_EN = 0 and wakes its sleepers (apf_task_wake_all). A page-ready that KVM delivered before that
    write, while interrupts were already off, is taken after it: sysvec_kvm_asyncpf_interrupt sees async_pf_enabled
    false and neither clears the slot nor ACKs. kvm_guest_cpu_init on online does not clear the slot either, so
    kvm_arch_can_dequeue_async_page_present is false from then on: the wake-all of the enabling write and every later
    page-ready stay queued, and the tasks that sleep on them never wake. This is KVM's and Linux's own race; apf-emu's
    guest has --online-clears-token as the way out (docs/PROTOCOL.md, section 10)."""
    m = Machine()
    m.boot()
    t1 = m.user_fault(20, Task(1))
    # cpuhp: local_irq_disable; the page-in completes and the kick's entry delivers the page-ready (IF=0: pending)
    m.complete(t1)
    assert m.irr and m.linux.area.token == t1
    assert [w.task.tid for w in m.linux.guest_cpu_offline(m.wrmsr, shutdown=False)] == [1]
    assert m.take_interrupt() == [] and m.linux.area.token == t1  # local_irq_enable: APF is off, the slot stays
    assert m.linux.guest_cpu_init(m.wrmsr, cpuid=APF_EMU_CPUID_FEATURES, vector=HYPERVISOR_CALLBACK_VECTOR)
    assert not m.irr  # the wake-all waits for a slot that nobody will clear
    t2 = m.user_fault(21, Task(2))
    m.complete(t2)
    m.entry()
    assert not m.irr and m.linux.area.token == t1
    assert [item.token for item in m.kvm.done] == [KVM_APF_WAKE_ALL_TOKEN, t2]
    assert m.linux.sleepers.sleepers == 1  # task 2 sleeps for good


def test_a_guest_that_clears_the_slot_on_online_recovers():
    """The same interleaving with the token slot written 0 before kvm_guest_cpu_init (--online-clears-token): the
    wake-all is delivered at the enabling write's entry and task 2's page-ready after it."""
    m = Machine()
    m.boot()
    t1 = m.user_fault(20, Task(1))
    m.complete(t1)
    m.linux.guest_cpu_offline(m.wrmsr, shutdown=False)
    m.take_interrupt()
    m.linux.area.token = 0
    assert m.linux.guest_cpu_init(m.wrmsr, cpuid=APF_EMU_CPUID_FEATURES, vector=HYPERVISOR_CALLBACK_VECTOR)
    assert m.irr and m.linux.area.token == KVM_APF_WAKE_ALL_TOKEN
    assert m.take_interrupt() == []
    t2 = m.user_fault(21, Task(2))
    m.complete(t2)
    assert m.take_interrupt() == [2]
    assert m.linux.sleepers.sleepers == 0


def test_no_not_present_can_be_injected_ahead_of_the_wake_all_of_an_enable():
    """The question behind the host rule apf-emu used to have ("no new token before a wake-all is ACKed"): can a
    Linux task sleep on a token that the enabling write's wake-all then wakes too early, leaving its page-ready to
    make a dummy? kvm_pv_enable_async_pf queues the wake-all and the entry of that very WRMSR delivers it whenever
    the slot is free (kvm_check_async_pf_completion), before the guest runs another instruction; Linux enables APF
    with a slot it last cleared itself. The one way for the slot to be busy is the stale-slot race above, and then
    nothing is ever delivered again: no dummy either. So the rule is gone, and no dummy appears here."""
    m = Machine()
    m.boot()
    for gfn in range(20, 32):  # re-enable with an event in flight, or done and taken, or done after the disable
        token = m.user_fault(gfn, Task(gfn))
        if gfn % 3 == 0:
            m.complete(token)
            assert m.take_interrupt() == [gfn]  # interrupts on: taken at once
        m.linux.pv_disable_apf(m.wrmsr)  # (kvm_cpu_down_prepare: interrupts off from here ...)
        if gfn % 3 == 1:
            m.complete(token)  # dropped by the disable: nothing is delivered
        m.linux.sleepers.wake_all()  # kvm_guest_cpu_offline(false): apf_task_wake_all
        m.take_interrupt()  # (... to here)
        assert m.linux.guest_cpu_init(m.wrmsr, cpuid=APF_EMU_CPUID_FEATURES, vector=HYPERVISOR_CALLBACK_VECTOR)
        assert m.irr and m.linux.area.token == KVM_APF_WAKE_ALL_TOKEN  # delivered by the enabling write's entry
        m.take_interrupt()
        if gfn % 3 == 2:
            m.complete(token)  # dropped by the disable
        assert not m.irr
    assert m.linux.sleepers.dummy_tokens() == []
    assert m.kvm.done == type(m.kvm.done)()
