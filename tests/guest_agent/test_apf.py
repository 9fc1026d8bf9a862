# The guest kernel's APF code (guest_agent/apf.py), sans I/O: one test per Linux rule, named after the function of
# arch/x86/kernel/kvm.c it follows, and a hypothesis machine that throws not-presents, page-readies, wake-alls, empty
# slots and CPU offline/online at it in any order a host could.
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guest_agent.apf import GuestApf, Panic, Pf
from shared.abi import (
    APF_EMU_CPUID_FEATURES,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_ASYNC_PF_SEND_ERROR,
    KVM_FEATURE_ASYNC_PF,
    KVM_FEATURE_ASYNC_PF_ERROR,
    KVM_FEATURE_ASYNC_PF_INT,
    KVM_FEATURE_ASYNC_PF_VE,
    KVM_PV_REASON_PAGE_ERROR,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_APF_EMU_VE_INFO,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    make_token,
)
from shared.apf_data import KvmVcpuPvApfData
from tests.conftest import EventLog

AREA = 64 * 2
VECTOR = 0xF3


@dataclass(frozen=True)
class Task:
    tid: int


class Msrs:
    """A recording wrmsr."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def __call__(self, msr: int, value: int) -> None:
        self.writes.append((msr, value))


def make_guest(*, enable: bool = True) -> tuple[GuestApf[Task], KvmVcpuPvApfData, Msrs, EventLog]:
    log = EventLog()
    area = KvmVcpuPvApfData(memoryview(bytearray(4096)).cast("I"), AREA)
    apf: GuestApf[Task] = GuestApf(area, log)
    msrs = Msrs()
    if enable:
        assert apf.guest_cpu_init(msrs, cpuid=APF_EMU_CPUID_FEATURES, vector=VECTOR)
    return apf, area, msrs, log


def not_present(apf: GuestApf[Task], area: KvmVcpuPvApfData, token: int, task: Task, *, user: bool = True,
                irq: bool = True) -> Pf:
    """What KVM does (flags, then #PF with CR2 = token) and the guest's #PF entry."""
    area.flags = KVM_PV_REASON_PAGE_NOT_PRESENT
    return apf.handle_async_pf(apf.read_and_reset_flags(), token, task, user=user, irq=irq)


def page_ready(apf: GuestApf[Task], area: KvmVcpuPvApfData, token: int, msrs: Msrs) -> list[int] | None:
    area.token = token
    woken = apf.asyncpf_interrupt(msrs)
    return None if woken is None else [w.task.tid for w in woken]


# --- boot and offline -----------------------------------------------------------------------------------------------
def test_kvm_guest_cpu_init_writes_int_then_en_and_sets_enabled_whatever_the_host_said():
    apf, area, msrs, _ = make_guest(enable=False)
    area.token = 0x5005  # not zeroed, not even on re-online
    assert apf.guest_cpu_init(msrs, cpuid=APF_EMU_CPUID_FEATURES, vector=VECTOR, send_always=True)
    assert msrs.writes == [(MSR_KVM_ASYNC_PF_INT, VECTOR),
                           (MSR_KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
                            | KVM_ASYNC_PF_SEND_ALWAYS)]
    assert apf.enabled and area.token == 0x5005


@pytest.mark.parametrize("cpuid,kvmapf", [(APF_EMU_CPUID_FEATURES & ~KVM_FEATURE_ASYNC_PF_INT, True),
                                          (APF_EMU_CPUID_FEATURES, False)])
def test_kvm_guest_cpu_init_needs_async_pf_int_and_kvmapf(cpuid, kvmapf):
    apf, _, msrs, _ = make_guest(enable=False)
    assert not apf.guest_cpu_init(msrs, cpuid=cpuid, vector=VECTOR, kvmapf=kvmapf)
    assert msrs.writes == [] and not apf.enabled


def test_kvm_guest_cpu_offline_wakes_every_sleeper_locally():
    """kvm_guest_cpu_offline(false) (CPU offline, suspend): disable APF, then apf_task_wake_all, sleepers and
    dummies, without any word from the host."""
    apf, area, msrs, log = make_guest()
    assert not_present(apf, area, make_token(1, 2), Task(1)) is Pf.SLEEP
    assert not_present(apf, area, make_token(2, 2), Task(2)) is Pf.SLEEP
    page_ready(apf, area, make_token(3, 2), msrs)  # a dummy
    woken = apf.guest_cpu_offline(msrs, shutdown=False)
    assert sorted(w.task.tid for w in woken) == [1, 2] and len(apf.sleepers) == 0
    assert msrs.writes[-1] == (MSR_KVM_ASYNC_PF_EN, 0) and not apf.enabled
    assert [kw for e, kw in log.events if e == "guest_apf_wake_all"][-1] == {"count": 2, "dummies": 1,
                                                                             "reason": "offline"}


def test_kvm_guest_cpu_offline_on_shutdown_only_disables():
    """kvm_pv_guest_cpu_reboot and kvm_crash_shutdown: kvm_guest_cpu_offline(true) wakes nobody."""
    apf, area, msrs, _ = make_guest()
    not_present(apf, area, make_token(1, 2), Task(1))
    assert apf.guest_cpu_offline(msrs, shutdown=True) == []
    assert apf.sleepers.sleepers == 1 and not apf.enabled


def test_kvm_pv_disable_apf_only_when_enabled():
    apf, _, msrs, _ = make_guest(enable=False)
    apf.pv_disable_apf(msrs)
    assert msrs.writes == []


# --- #PF ------------------------------------------------------------------------------------------------------------
def test_kvm_read_and_reset_apf_flags_reads_0_while_disabled():
    apf, area, _, _ = make_guest(enable=False)
    area.flags = KVM_PV_REASON_PAGE_NOT_PRESENT
    assert apf.read_and_reset_flags() == 0 and area.flags == KVM_PV_REASON_PAGE_NOT_PRESENT
    apf.enabled = True
    assert apf.read_and_reset_flags() == KVM_PV_REASON_PAGE_NOT_PRESENT and area.flags == 0


def test___kvm_handle_async_pf_flags_0_is_a_genuine_fault():
    apf, _, _, _ = make_guest()
    assert apf.handle_async_pf(0, 0x1234, Task(1), user=False, irq=False) is Pf.GENUINE


@pytest.mark.parametrize("user,irq,message", [
    (True, False, "Host injected async #PF in interrupt disabled region"),
    (False, False, "Host injected async #PF in interrupt disabled region"),
    (False, True, "Host injected async #PF in kernel mode"),
])
def test___kvm_handle_async_pf_panics(user, irq, message):
    """Interrupts off: panic, whatever the flags; PAGE_NOT_PRESENT in kernel mode: panic, SEND_ALWAYS or not."""
    apf, area, msrs, _ = make_guest(enable=False)
    apf.guest_cpu_init(msrs, cpuid=APF_EMU_CPUID_FEATURES, vector=VECTOR, send_always=True)
    with pytest.raises(Panic, match=message):
        not_present(apf, area, make_token(1, 2), Task(1), user=user, irq=irq)


def test___kvm_handle_async_pf_warns_once_on_other_flags():
    apf, _, _, log = make_guest()
    assert apf.handle_async_pf(2, 0x1000, Task(1), user=True, irq=True) is Pf.WARN
    assert apf.handle_async_pf(4, 0x1000, Task(1), user=False, irq=True) is Pf.WARN
    assert [kw["flags"] for e, kw in log.events if e == "guest_apf_warn"] == [2]
    assert apf.handle_async_pf(3, 0x2000, Task(1), user=True, irq=True) is Pf.SLEEP  # a bit test, as Linux's


def test_kvm_async_pf_queue_task_consumes_a_dummy_or_frees_another_tasks_node():
    apf, area, msrs, log = make_guest()
    token = make_token(1, 2)
    assert page_ready(apf, area, token, msrs) == []  # the wake came first: a dummy
    assert not_present(apf, area, token, Task(1)) is Pf.NO_SLEEP and len(apf.sleepers) == 0
    other = make_token(2, 2)
    assert not_present(apf, area, other, Task(1)) is Pf.SLEEP
    # The same token again (a host that hands a token out twice): Linux takes task 1's node for a dummy.
    assert not_present(apf, area, other, Task(2)) is Pf.NO_SLEEP
    assert apf.sleepers.sleepers == 0 and apf.sleepers.lost == [Task(1)]
    freed = [fields for name, fields in log.events if name == "guest_apf_node_freed"]
    assert [(f["token"], f["task"]) for f in freed] == [(other, 1)]
    assert page_ready(apf, area, other, msrs) == []  # task 1 is not woken


# --- page-ready -----------------------------------------------------------------------------------------------------
def test_sysvec_kvm_asyncpf_interrupt_wakes_clears_the_slot_and_acks():
    apf, area, msrs, log = make_guest()
    token = make_token(1, 2)
    not_present(apf, area, token, Task(7))
    msrs.writes.clear()
    assert page_ready(apf, area, token, msrs) == [7]
    assert area.token == 0 and msrs.writes == [(MSR_KVM_ASYNC_PF_ACK, 1)]
    assert log.names()[-2:] == ["guest_apf_wake", "guest_apf_ack"]


def test_guest_apf_ack_is_logged_before_the_store_that_releases_the_slot():
    """The checker orders a release by its log line: a host entry may deliver the next page-ready as soon as the slot
    reads 0, so the line must come before the store (docs/LOGGING.md's ordering guarantee)."""
    apf, area, msrs, log = make_guest()
    slot_at_log: list[int] = []

    def info(event: str, **_kw: object) -> None:
        if event == "guest_apf_ack":
            slot_at_log.append(area.token)

    log.info = info  # type: ignore[method-assign]
    token = make_token(1, 2)
    not_present(apf, area, token, Task(7))
    page_ready(apf, area, token, msrs)
    assert slot_at_log == [token] and area.token == 0


def test_sysvec_kvm_asyncpf_interrupt_wakes_token_0_as_a_dummy():
    """An interrupt with an empty slot (a re-raised IRR after the slot was released) still runs
    kvm_async_pf_task_wake(0): a dummy for token 0 stays until a wake-all."""
    apf, area, msrs, log = make_guest()
    assert page_ready(apf, area, 0, msrs) == []
    assert apf.sleepers.dummy_tokens() == [0]
    assert ("guest_apf_dummy", {"token": 0, "action": "created"}) in log.events
    assert msrs.writes[-1] == (MSR_KVM_ASYNC_PF_ACK, 1)
    assert page_ready(apf, area, KVM_APF_WAKE_ALL_TOKEN, msrs) == [] and len(apf.sleepers) == 0


def test_sysvec_kvm_asyncpf_interrupt_does_nothing_while_disabled():
    """With async_pf_enabled false the handler only EOIs: the slot keeps its token and nothing is ACKed."""
    apf, area, msrs, _ = make_guest()
    token = make_token(1, 2)
    not_present(apf, area, token, Task(1))
    apf.pv_disable_apf(msrs)
    msrs.writes.clear()
    assert page_ready(apf, area, token, msrs) is None
    assert area.token == token and msrs.writes == [] and apf.sleepers.sleepers == 1


def test_kvm_async_pf_task_wake_all_token_wakes_sleepers_and_drops_dummies():
    apf, area, msrs, _ = make_guest()
    not_present(apf, area, make_token(1, 2), Task(1))
    page_ready(apf, area, make_token(5, 2), msrs)
    assert page_ready(apf, area, KVM_APF_WAKE_ALL_TOKEN, msrs) == [1]
    assert len(apf.sleepers) == 0 and area.token == 0


# --- any order a host could choose ----------------------------------------------------------------------------------
class GuestApfMachine(RuleBasedStateMachine):
    """A host that follows KVM's rules only as far as the guest can tell (a token is not-present once and ready at
    most once; the slot is written only when free), in any order, against the guest core.

    Safety: a task sleeps on exactly one token, one the host made not-present and has not readied; every interrupt
    handled with APF on leaves the slot 0 and ACKs; with APF off it touches nothing. Liveness: a page-ready for
    every token, or a wake-all, leaves nobody asleep."""

    def __init__(self) -> None:
        super().__init__()
        self.apf, self.area, self.msrs, self.log = make_guest()
        self.next_id = 1
        self.running = {Task(t) for t in range(4)}
        self.sleeping: dict[int, Task] = {}  # token -> task
        self.not_readied: set[int] = set()

    def _woken(self, tids: list[int] | None) -> None:
        for tid in tids or []:
            task = Task(tid)
            assert task in self.sleeping.values()
            self.sleeping = {t: k for t, k in self.sleeping.items() if k != task}
            self.running.add(task)

    @precondition(lambda self: self.running and self.apf.enabled)
    @rule(data=st.data())
    def not_present(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(sorted(self.running, key=lambda t: t.tid)))
        token = make_token(self.next_id, 2)
        self.next_id += 1
        result = not_present(self.apf, self.area, token, task)
        assert self.area.flags == 0
        self.not_readied.add(token)
        if result is Pf.SLEEP:
            self.running.discard(task)
            self.sleeping[token] = task
        else:
            assert result is Pf.NO_SLEEP

    @precondition(lambda self: self.not_readied)
    @rule(data=st.data())
    def ready(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(sorted(self.not_readied)))
        self._interrupt(token)

    @rule(token=st.sampled_from([0, KVM_APF_WAKE_ALL_TOKEN]))
    def special(self, token: int) -> None:
        self._interrupt(token)

    def _interrupt(self, token: int) -> None:
        before = len(self.msrs.writes)
        sleeper = self.sleeping.get(token)
        tids = page_ready(self.apf, self.area, token, self.msrs)
        if tids is None:
            assert not self.apf.enabled and self.area.token == token and len(self.msrs.writes) == before
            self.area.token = 0  # (the machine's host moves on; a real one would wait: see test_cores)
            return
        self.not_readied.discard(token)
        assert self.area.token == 0 and self.msrs.writes[before:] == [(MSR_KVM_ASYNC_PF_ACK, 1)]
        if token == KVM_APF_WAKE_ALL_TOKEN:
            assert sorted(tids) == sorted(t.tid for t in self.sleeping.values())
        else:
            assert tids == ([sleeper.tid] if sleeper is not None else [])
        self._woken(tids)

    @precondition(lambda self: self.apf.enabled)
    @rule(shutdown=st.booleans())
    def offline(self, shutdown: bool) -> None:
        woken = self.apf.guest_cpu_offline(self.msrs, shutdown=shutdown)
        if not shutdown:
            assert sorted(w.task.tid for w in woken) == sorted(t.tid for t in self.sleeping.values())
            self._woken([w.task.tid for w in woken])
            self.not_readied.clear()  # KVM ate them with the disable

    @precondition(lambda self: not self.apf.enabled)
    @rule()
    def online(self) -> None:
        assert self.apf.guest_cpu_init(self.msrs, cpuid=APF_EMU_CPUID_FEATURES, vector=VECTOR)

    @invariant()
    def sleepers_match(self) -> None:
        table = self.apf.sleepers
        assert table.sleepers == len(self.sleeping)
        assert set(self.sleeping) <= set(table.tokens())
        assert len(set(self.sleeping.values())) == len(self.sleeping)

    def teardown(self) -> None:
        if not self.apf.enabled:
            self.online()
        for token in sorted(self.not_readied):
            self._interrupt(token)
        assert not self.sleeping and self.apf.sleepers.sleepers == 0


TestGuestApfMachine = GuestApfMachine.TestCase


# --- the `ve` ABI (apf-emu's design of not-present as #VE) --------------------------------------------------------
def make_abi_guest(abi: str, cpuid: int):
    log = EventLog()
    area = KvmVcpuPvApfData(memoryview(bytearray(4096)).cast("I"), AREA)
    apf: GuestApf[Task] = GuestApf(area, log, abi)
    msrs = Msrs()
    assert apf.guest_cpu_init(msrs, cpuid=cpuid, vector=VECTOR)
    return apf, area, msrs, log


def make_ve_guest(cpuid: int = APF_EMU_CPUID_FEATURES | KVM_FEATURE_ASYNC_PF_VE):
    return make_abi_guest("ve", cpuid)


def test_a_ve_guest_places_its_area_before_enabling_apf_only_if_the_host_offers_it():
    apf, _area, msrs, _ = make_ve_guest()
    assert [m for m, _ in msrs.writes] == [MSR_KVM_ASYNC_PF_INT, MSR_APF_EMU_VE_INFO, MSR_KVM_ASYNC_PF_EN]
    assert apf.ve is not None and msrs.writes[1][1] == (AREA + 16) | 1
    plain, _area, msrs, _ = make_ve_guest(APF_EMU_CPUID_FEATURES)  # an `int` host: #PF it is
    assert plain.ve is None and [m for m, _ in msrs.writes] == [MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_EN]


def test_handle_ve_takes_the_token_from_the_area_and_releases_it_before_sleeping():
    apf, _area, _msrs, _ = make_ve_guest()
    assert apf.ve is not None
    token = make_token(3, 2)
    apf.ve.deliver(token, 0x5000)
    assert apf.handle_ve(Task(1), user=True, irq=True) == (Pf.SLEEP, token)
    assert apf.ve.busy == 0 and apf.sleepers.sleepers == 1


def test_handle_ve_panics_where_linux_would_and_warns_on_a_ve_it_did_not_expect():
    apf, _area, _msrs, log = make_ve_guest()
    assert apf.ve is not None
    assert apf.handle_ve(Task(1), user=True, irq=True) == (Pf.WARN, 0)  # busy clear: not an APF
    assert "guest_apf_warn" in log.names()
    for user, irq, message in ((False, True, "kernel mode"), (True, False, "interrupt disabled")):
        apf.ve.deliver(make_token(4, 2), 0x6000)
        with pytest.raises(Panic, match=message):
            apf.handle_ve(Task(1), user=user, irq=irq)


# --- the `int-error` ABI (Vivek Goyal's RFC, June 2020) ---------------------------------------------------------
def make_error_guest(cpuid: int = APF_EMU_CPUID_FEATURES | KVM_FEATURE_ASYNC_PF_ERROR):
    return make_abi_guest("int-error", cpuid)


def test_an_int_error_guest_asks_for_errors_only_if_the_host_offers_them():
    apf, _area, msrs, _ = make_error_guest()
    assert apf.send_error and msrs.writes[-1][1] & KVM_ASYNC_PF_SEND_ERROR
    plain, _area, msrs, _ = make_error_guest(APF_EMU_CPUID_FEATURES)
    assert not plain.send_error and not msrs.writes[-1][1] & KVM_ASYNC_PF_SEND_ERROR


def test_kvm_async_pf_intr_passes_the_error_to_the_task_it_wakes():
    """The RFC's page-ready handler reads ready_flags after the token and hands is_err to the wake."""
    apf, area, msrs, _ = make_error_guest()
    token = make_token(1, 2)
    not_present(apf, area, token, Task(7))
    area.ready_flags = KVM_PV_REASON_PAGE_ERROR
    area.token = token
    woken = apf.asyncpf_interrupt(msrs)
    assert woken is not None and [(w.task.tid, w.error) for w in woken] == [(7, True)]
    assert area.token == 0 and area.ready_flags == KVM_PV_REASON_PAGE_ERROR  # never cleared by the guest


def test_a_dummy_keeps_the_error_for_the_fault_that_consumes_it():
    """The wake came first and carried an error: the dummy keeps it (n->is_err), and the #PF that finds the dummy
    does not sleep, it gets the error (SIGBUS)."""
    apf, area, msrs, _ = make_error_guest()
    token = make_token(1, 2)
    area.ready_flags = KVM_PV_REASON_PAGE_ERROR
    area.token = token
    assert apf.asyncpf_interrupt(msrs) == []
    assert not_present(apf, area, token, Task(1)) is Pf.ERROR
    other = make_token(2, 2)
    area.ready_flags = 0
    area.token = other
    apf.asyncpf_interrupt(msrs)
    assert not_present(apf, area, other, Task(2)) is Pf.NO_SLEEP  # a plain dummy: no error


# --- the `pf` ABI: Linux 5.7's do_async_page_fault ------------------------------------------------------------
def make_pf_guest(cpuid: int = KVM_FEATURE_ASYNC_PF):
    return make_abi_guest("pf", cpuid)


def test_a_5_7_guest_enables_apf_with_the_en_msr_alone():
    """5.7's kvm_guest_cpu_init: KVM_FEATURE_ASYNC_PF is enough, no MSR_KVM_ASYNC_PF_INT, no DELIVERY_AS_INT."""
    apf, _area, msrs, _ = make_pf_guest()
    assert apf.enabled and msrs.writes == [(MSR_KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED)]
    log = EventLog()
    always: GuestApf[Task] = GuestApf(KvmVcpuPvApfData(memoryview(bytearray(4096)).cast("I"), AREA), log, "pf")
    assert always.guest_cpu_init(msrs, cpuid=KVM_FEATURE_ASYNC_PF, vector=VECTOR, send_always=True)
    assert msrs.writes[-1][1] == AREA | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_SEND_ALWAYS  # CONFIG_PREEMPTION


def test_do_async_page_fault_switches_on_the_reason():
    """0 (or anything not 1 or 2): do_page_fault; 1: kvm_async_pf_task_wait, schedule in user mode, halt in kernel
    mode (n.halted), no panic; 2: kvm_async_pf_task_wake, a dummy when nobody sleeps on the token."""
    apf, _area, _msrs, _log = make_pf_guest()
    user, kernel = Task(1), Task(2)
    assert apf.do_async_page_fault(0, 0x7F00_0000_1000, user, user=True) == (Pf.GENUINE, [])
    assert apf.do_async_page_fault(3, 0x1001, user, user=True) == (Pf.GENUINE, [])
    assert apf.do_async_page_fault(1, make_token(1, 2), user, user=True) == (Pf.SLEEP, [])
    assert apf.do_async_page_fault(1, make_token(2, 2), kernel, user=False) == (Pf.HALT, [])
    result, woken = apf.do_async_page_fault(2, make_token(1, 2), Task(9), user=True)
    assert result is Pf.WAKE and [w.task for w in woken] == [user]
    assert apf.sleepers.holds(make_token(2, 2), kernel)
    result, woken = apf.do_async_page_fault(2, make_token(3, 2), Task(9), user=True)
    assert result is Pf.WAKE and woken == [] and apf.sleepers.dummy_tokens() == [make_token(3, 2)]
    assert apf.do_async_page_fault(1, make_token(3, 2), user, user=True) == (Pf.NO_SLEEP, [])  # the dummy
    wake_all, woken = apf.do_async_page_fault(2, 0xFFFF_FFFF_FFFF_FFFF, Task(9), user=False)  # CR2 = ~0 as u32
    assert wake_all is Pf.WAKE and [w.task for w in woken] == [kernel] and not apf.sleepers.holds(make_token(2, 2),
                                                                                                   kernel)


class GuestPfMachine(RuleBasedStateMachine):
    """A 5.7 guest's sleep table under #PFs in any order a 5.7 host can send them (page-ready before or after its
    not-present, wake-alls), with the nested genuine #PF of the entry now and then reading the reason of the APF
    #PF it interrupted. Without such a nested #PF every sleeper wakes and no dummy stays; each nested one that
    read a reason leaves exactly 5.7's damage: a task halted on its own address, or a dummy for it."""

    def __init__(self) -> None:
        super().__init__()
        self.apf, self.area, _msrs, self.log = make_pf_guest()
        self.next_id = 1
        self.outstanding: set[int] = set()  # tokens the host sent a not-present for, and no page-ready yet
        self.readied: set[int] = set()
        self.stuck: dict[int, Task] = {}  # bogus token -> the task halted on it
        self.bogus_dummies: set[int] = set()
        self.lost: set[int] = set()  # tokens whose #PF a nested fault ate

    def _take(self, reason: int, cr2: int, task: Task, *, nested: bool, user: bool = True) -> None:
        """The #PF entry (reason written by the host just before), with or without the nested genuine #PF."""
        self.area.flags = reason
        if nested:
            bogus = (0xFFFF_C900_0000_0000 + self.next_id * 4096 + 0xF48) & 0xFFFF_FFFF
            self.next_id += 1
            inner = self.apf.read_and_reset_flags()
            result, _ = self.apf.do_async_page_fault(inner, bogus, Task(100 + len(self.stuck)), user=False)
            if reason == 1:
                assert result is Pf.HALT
                self.stuck[bogus] = Task(100 + len(self.stuck))
            else:
                assert result is Pf.WAKE and bogus in self.apf.sleepers.dummy_tokens()
                self.bogus_dummies.add(bogus)
            self.lost.add(cr2)
        outer = self.apf.read_and_reset_flags()
        result, _woken = self.apf.do_async_page_fault(outer, cr2, task, user=user)
        if nested:
            assert outer == 0 and result is Pf.GENUINE  # the APF taken for an ordinary fault at CR2 = token
        return None

    @rule(nested=st.booleans())
    def not_present(self, nested: bool) -> None:
        token = make_token(self.next_id, 2)
        self.next_id += 1
        self.outstanding.add(token)
        self._take(1, token, Task(token), nested=nested)

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), nested=st.booleans())
    def page_ready(self, data: st.DataObject, nested: bool) -> None:
        token = data.draw(st.sampled_from(sorted(self.outstanding)))
        self.outstanding.discard(token)
        self.readied.add(token)
        self._take(2, token, Task(0), nested=nested)

    @invariant()
    def damage_is_5_7s(self) -> None:
        for bogus, _task in self.stuck.items():
            assert bogus in self.apf.sleepers.tokens()
        honest = [t for t in self.apf.sleepers.tokens() if t not in self.stuck and t not in self.bogus_dummies]
        for token in honest:  # a node for a real token: its page-ready or its not-present is still to come, or lost
            assert token in self.outstanding or token in self.readied or token in self.lost

    def teardown(self) -> None:
        for token in sorted(self.outstanding):
            self.page_ready_now(token)
        leftover = set(self.apf.sleepers.tokens()) - set(self.stuck) - self.bogus_dummies
        if not self.lost:
            assert not leftover and self.apf.sleepers.sleepers == 0
        else:  # an eaten not-present leaves its page-ready's dummy; an eaten page-ready, its sleeper
            assert leftover <= self.lost

    def page_ready_now(self, token: int) -> None:
        self.outstanding.discard(token)
        self.readied.add(token)
        self._take(2, token, Task(0), nested=False)


TestGuestPfMachine = GuestPfMachine.TestCase
