# The host's per-vCPU APF state machine (host_daemon/vcpu.py), sans I/O: one test per KVM rule, named after the KVM
# function it follows, and a hypothesis machine that runs faults, page-ins, entries, the guest's handler, ACKs,
# LAPIC and APF toggles in any order.
from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from host_daemon.vcpu import APF_HALT, APF_READY, AsyncPf, Fault, VcpuApf
from shared.abi import (
    APF_EMU_VE_INFO_ENABLED,
    APIC_SPIV_RESET,
    ASYNC_PF_PER_VCPU,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_ASYNC_PF_SEND_ERROR,
    KVM_PV_REASON_PAGE_ERROR,
    MSR_APF_EMU_VE_INFO,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_X2APIC_SPIV,
    make_token,
    token_is_well_formed,
)
from tests.conftest import EventLog

PAGES = 16
AREA = 64 * 3
ON = AREA | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
VECTOR = 0xF3
SPIV_ON = 0x1FF  # Linux's boot value: software enable | spurious vector 0xff


def make_vcpu(vcpu_id: int = 3) -> tuple[VcpuApf, EventLog]:
    log = EventLog()
    ram = memoryview(bytearray(PAGES * 4096)).cast("I")
    return VcpuApf(vcpu_id, ram, PAGES, log), log


def boot(vcpu: VcpuApf, en: int = ON, *, lapic: bool = True) -> None:
    """What Linux does at boot (setup_local_APIC, then kvm_guest_cpu_init: INT before EN), and the guest's handling
    of the wake-all that enabling queues: the entry delivers it, the handler clears the slot and ACKs."""
    if lapic:
        assert vcpu.write_msr(MSR_X2APIC_SPIV, SPIV_ON).ok
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_INT, VECTOR).ok
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, en).ok
    if lapic and vcpu.pv_enabled:
        assert vcpu.entry() == [VECTOR]
        release_and_ack(vcpu)


def release_and_ack(vcpu: VcpuApf) -> list[int]:
    """sysvec_kvm_asyncpf_interrupt's end: write 0 to the slot, then wrmsr MSR_KVM_ASYNC_PF_ACK = 1."""
    assert vcpu.area is not None
    vcpu.area.token = 0
    return list(vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 1).vectors)


def events(log: EventLog, name: str) -> list[dict[str, object]]:
    return [kw for e, kw in log.events if e == name]


# --- MSRs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "msr,value,ok",
    [
        (MSR_KVM_ASYNC_PF_INT, 0xF3, True),
        (MSR_KVM_ASYNC_PF_INT, 0x1F3, False),  # bits 63:8 reserved
        (MSR_KVM_ASYNC_PF_EN, ON, True),
        (MSR_KVM_ASYNC_PF_EN, ON | 0x10, False),  # bit 4 reserved
        (MSR_KVM_ASYNC_PF_EN, ON | 0x20, False),  # bit 5 reserved
        (MSR_KVM_ASYNC_PF_EN, ON | KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT, True),  # guest_pv_has: not enforced
        (MSR_KVM_ASYNC_PF_EN, (PAGES * 4096) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, False),
        (MSR_KVM_ASYNC_PF_EN, ((PAGES * 4096) - 64) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT, True),
        (MSR_KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED, True),  # accepted, but APF stays off
        (MSR_KVM_ASYNC_PF_EN, 0, True),
        (MSR_KVM_ASYNC_PF_ACK, 1, True),
        (MSR_KVM_ASYNC_PF_ACK, 7, True),
        (MSR_X2APIC_SPIV, SPIV_ON, True),
        (MSR_X2APIC_SPIV, 1 << 32, False),
        (0x4B564D09, 0, False),  # unknown MSR
        (MSR_KVM_ASYNC_PF_INT, 1 << 64, False),
        (MSR_KVM_ASYNC_PF_INT, -1, False),
    ],
)
def test_kvm_set_msr_common_validates_like_kvm(msr, value, ok):
    vcpu, _ = make_vcpu()
    assert vcpu.write_msr(msr, value).ok is ok


def test_kvm_pv_enable_async_pf_delivery_as_pf_vmexit_needs_the_feature_only_when_pv_cpuid_is_enforced():
    """`kvm_pv_enable_async_pf`: `!guest_pv_has(vcpu, KVM_FEATURE_ASYNC_PF_VMEXIT) && (data & DELIVERY_AS_PF_VMEXIT)`
    is a #GP, and guest_pv_has is false only with KVM_CAP_ENFORCE_PV_FEATURE_CPUID (apf-emu does not advertise the
    feature)."""
    vcpu, _ = make_vcpu()
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON | KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT).ok and vcpu.pv_enabled
    strict, _ = make_vcpu()
    strict.enforce_pv_cpuid = True
    assert not strict.write_msr(MSR_KVM_ASYNC_PF_EN, ON | KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT).ok
    assert strict.msr_en == 0
    assert strict.area_gfn_enabled_by(MSR_KVM_ASYNC_PF_EN, ON | KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT) is None


@pytest.mark.parametrize("bad", [ON | 0x10, ON | 0x20,
                                 (PAGES * 4096) | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT])
def test_kvm_pv_enable_async_pf_gp_stores_nothing(bad):
    """kvm_pv_enable_async_pf returns 1 (#GP) before `msr_en_val = data`: a refused write leaves the old value, and
    APF stays as it was (the area check is kvm_gfn_to_hva_cache_init, also before the store)."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    assert not vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, bad).ok
    assert vcpu.msr_en == ON and vcpu.pv_enabled
    assert events(log, "msr_write")[-1]["ok"] is False


def test_kvm_get_msr_common_reads_back_en_and_int_and_ack_reads_0():
    vcpu, _ = make_vcpu()
    boot(vcpu, ON | KVM_ASYNC_PF_SEND_ALWAYS)
    assert vcpu.read_msr(MSR_KVM_ASYNC_PF_EN).value == ON | KVM_ASYNC_PF_SEND_ALWAYS
    assert vcpu.read_msr(MSR_KVM_ASYNC_PF_INT).value == VECTOR
    assert vcpu.read_msr(MSR_KVM_ASYNC_PF_ACK).value == 0
    assert vcpu.read_msr(MSR_X2APIC_SPIV).value == SPIV_ON
    assert not vcpu.read_msr(0x4B564D09).ok
    refused = make_vcpu()[0]
    refused.write_msr(MSR_KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED)  # stored even though APF stays off
    assert refused.read_msr(MSR_KVM_ASYNC_PF_EN).value == AREA | KVM_ASYNC_PF_ENABLED


def test_msr_kvm_async_pf_ack_acts_on_bit_0():
    """kvm_set_msr_common, MSR_KVM_ASYNC_PF_ACK: `if (data & 0x1)`: 2 does nothing, 3 is an ACK."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    item = vcpu.on_fault(5, 5 * 4096, user=True, irq=True).item
    assert item is not None and vcpu.complete(item)
    assert vcpu.entry() == [VECTOR]
    second = vcpu.on_fault(6, 6 * 4096, user=True, irq=True).item
    assert second is not None and not vcpu.complete(second)  # a page-ready is pending: no kick
    assert vcpu.area is not None
    vcpu.area.token = 0
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 2).vectors == ()
    assert vcpu.pageready_pending
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 3).vectors == (VECTOR,)
    assert vcpu.area.token == second.token
    assert [kw["value"] for kw in events(log, "apf_ack")] == [1, 3]


def test_apic_set_spiv_enabling_requests_apf_ready():
    """apic_set_spiv: a write with APIC_SPIV_APIC_ENABLED raises KVM_REQ_APF_READY; kvm_lapic_reset leaves 0xff."""
    vcpu, _ = make_vcpu()
    assert vcpu.spiv == APIC_SPIV_RESET and not vcpu.lapic_enabled
    vcpu.write_msr(MSR_X2APIC_SPIV, 0xFF)
    assert APF_READY not in vcpu.requests
    vcpu.write_msr(MSR_X2APIC_SPIV, SPIV_ON)
    assert vcpu.lapic_enabled and APF_READY in vcpu.requests


# --- faults ---------------------------------------------------------------------------------------------------------
def test_kvm_can_do_async_pf_interrupts_off_is_synchronous():
    """kvm_can_do_async_pf: "If interrupts are off we cannot even use an artificial halt state": no token, no
    trace, no hash entry."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    decision = vcpu.on_fault(5, 5 * 4096, user=True, irq=False)
    assert decision.kind is Fault.SYNC and decision.item is None and decision.reason == "irq_disabled"
    assert "kvm_try_async_get_page" not in log.names() and not vcpu.gfn_hash


def test_kvm_can_do_async_pf_does_not_need_apf_enabled():
    """With APF off (a guest that never enabled it), a fault with interrupts on still becomes async work: traced,
    hashed, counted in `queued`, and the vCPU halts (kvm_arch_async_page_not_present's else branch)."""
    vcpu, log = make_vcpu()
    decision = vcpu.on_fault(5, 5 * 4096, user=True, irq=True)
    assert decision.kind is Fault.HALT and decision.item is not None and decision.reason == "apf_disabled"
    assert vcpu.queued == 1 and vcpu.gfn_hash == {5} and APF_HALT in vcpu.requests
    assert events(log, "kvm_try_async_get_page") == [{"gva": 5 * 4096, "gfn": 5}]
    assert events(log, "kvm_async_pf_not_present") == [
        {"token": decision.item.token, "gva": 5 * 4096, "gfn": 5, "injected": False}]


@pytest.mark.parametrize("user,send_always,kind", [(True, False, Fault.INJECT), (False, False, Fault.HALT),
                                                   (False, True, Fault.INJECT), (True, True, Fault.INJECT)])
def test_kvm_can_deliver_async_pf(user, send_always, kind):
    """kvm_can_deliver_async_pf: APF on, and CPL other than 0 unless SEND_ALWAYS; otherwise
    kvm_arch_async_page_not_present requests KVM_REQ_APF_HALT and reports the not-present as not injected."""
    vcpu, log = make_vcpu()
    boot(vcpu, ON | (KVM_ASYNC_PF_SEND_ALWAYS if send_always else 0))
    decision = vcpu.on_fault(5, 5 * 4096, user=user, irq=True)
    assert decision.kind is kind and decision.item is not None
    assert decision.item.notpresent_injected is (kind is Fault.INJECT)
    assert events(log, "kvm_async_pf_not_present")[-1]["injected"] is (kind is Fault.INJECT)
    assert (APF_HALT in vcpu.requests) is (kind is Fault.HALT)
    assert vcpu.area is not None and vcpu.area.flags == (1 if kind is Fault.INJECT else 0)
    assert decision.exception == ((14, decision.item.token) if kind is Fault.INJECT else None)  # #PF, CR2 = token


def test_kvm_find_async_pf_gfn_makes_a_repeated_fault_halt():
    """__kvm_mmu_faultin_pfn: a gfn already in the hash is traced as kvm_async_pf_repeated_fault and halts, with no
    new work and no token."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    first = vcpu.on_fault(5, 5 * 4096, user=True, irq=True)
    apf_id = vcpu.apf_id
    again = vcpu.on_fault(5, 5 * 4096 + 8, user=True, irq=True)
    assert again.kind is Fault.HALT and again.item is None and again.reason == "repeated_fault"
    assert vcpu.apf_id == apf_id and vcpu.queued == 1 and first.item is not None
    assert events(log, "kvm_async_pf_repeated_fault") == [{"gva": 5 * 4096 + 8, "gfn": 5}]


def test_apf_put_user_notpresent_writes_flags_without_reading_them():
    """kvm_arch_async_page_not_present stores KVM_PV_REASON_PAGE_NOT_PRESENT and injects; a `flags` the guest has
    not reset refuses nothing."""
    vcpu, _ = make_vcpu()
    boot(vcpu)
    assert vcpu.on_fault(5, 5 * 4096, user=True, irq=True).kind is Fault.INJECT
    assert vcpu.area is not None and vcpu.area.flags == 1
    vcpu.area.flags = 0xDEAD  # left over, or garbage: not read
    assert vcpu.on_fault(6, 6 * 4096, user=True, irq=True).kind is Fault.INJECT
    assert vcpu.area.flags == 1


def test_kvm_setup_async_pf_refuses_past_64_after_alloc_apf_token():
    """kvm_setup_async_pf: `queued >= ASYNC_PF_PER_VCPU` makes the fault synchronous; kvm_arch_setup_async_pf had
    already called alloc_apf_token, so the refused fault used up an id."""
    vcpu, _ = make_vcpu()
    boot(vcpu)
    for gfn in range(ASYNC_PF_PER_VCPU):
        assert vcpu.on_fault(1000 + gfn, 0, user=True, irq=True).kind is Fault.INJECT
    apf_id = vcpu.apf_id
    decision = vcpu.on_fault(2000, 0, user=True, irq=True)
    assert decision.kind is Fault.SYNC and decision.reason == "queue_full"
    assert vcpu.apf_id == apf_id + 1


def test_alloc_apf_token_sequence_on_the_vcpu():
    """Tokens are alloc_apf_token's: (id << 12) | vcpu_id, id starting at 1 (0 is skipped)."""
    vcpu, _ = make_vcpu(3)
    tokens = [vcpu.on_fault(gfn, 0, user=True, irq=True).item.token for gfn in (5, 6, 7)]  # type: ignore[union-attr]
    assert tokens == [make_token(1, 3), make_token(2, 3), make_token(3, 3)]


def test_alloc_apf_token_id_is_saved_before_the_token_is_logged():
    """The VMM's copy of vcpu->arch.apf.id (the backing store, read by a host restarted with --recover) is written
    with each id alloc_apf_token hands out before its kvm_async_pf_not_present is logged: a host killed between the
    two never hands that token out again."""
    vcpu, log = make_vcpu(3)
    order: list[object] = []
    vcpu.save_apf_id = lambda apf_id: order.append(("saved", apf_id, len(events(log, "kvm_async_pf_not_present"))))
    boot(vcpu)
    item = vcpu.on_fault(5, 0, user=True, irq=True).item
    assert item is not None and order == [("saved", vcpu.apf_id, 0)] and item.token >> 12 == vcpu.apf_id - 1
    assert events(log, "kvm_async_pf_not_present")[0]["token"] == item.token
    vcpu.on_fault(5, 0, user=True, irq=True)  # a repeated fault allocates nothing
    assert len(order) == 1


# --- completion and delivery ----------------------------------------------------------------------------------------
def test_kvm_arch_async_page_present_queued_kicks_only_without_pageready_pending():
    """The first completion on an empty done list raises KVM_REQ_APF_READY and kicks unless a page-ready is
    pending; later ones only join the list (async_pf_execute)."""
    vcpu, _ = make_vcpu()
    boot(vcpu)
    a, b, c = (vcpu.on_fault(g, 0, user=True, irq=True).item for g in (5, 6, 7))
    assert a is not None and b is not None and c is not None
    assert vcpu.complete(a) and APF_READY in vcpu.requests
    assert not vcpu.complete(b)  # the list was not empty
    assert vcpu.entry() == [VECTOR]  # a is delivered; b waits for the slot
    assert vcpu.pageready_pending and len(vcpu.done) == 1
    assert release_and_ack(vcpu) == [VECTOR]  # b, by the ACK's own kvm_check_async_pf_completion
    assert vcpu.area is not None and vcpu.area.token == b.token
    vcpu.area.token = 0  # released, not yet ACKed
    assert not vcpu.complete(c)  # the list was empty, but a page-ready is pending: no kick
    assert APF_READY in vcpu.requests  # delivered at the next entry, or by the ACK
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 1).vectors == (VECTOR,)
    assert vcpu.area.token == c.token


def test_vcpu_enter_guest_handles_apf_halt_before_apf_ready():
    vcpu, _ = make_vcpu()
    boot(vcpu)
    injected = vcpu.on_fault(5, 0, user=True, irq=True).item
    assert injected is not None and vcpu.complete(injected)
    vcpu.on_fault(6, 0, user=False, irq=True)  # kernel mode: halt
    assert {APF_HALT, APF_READY} <= vcpu.requests
    assert vcpu.entry() == [] and vcpu.halted  # the halt wins; the ready waits
    assert vcpu.has_events()  # kvm_vcpu_has_events: the done list is not empty, vcpu_block returns
    vcpu.unhalt()
    assert vcpu.entry() == [VECTOR]


def test_kvm_arch_async_page_present_traces_a_halted_fault_without_injecting():
    """A not-present that was not injected gets no page-ready: kvm_async_pf_ready is traced, the gfn leaves the
    hash, the halt ends, the slot is untouched."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    item = vcpu.on_fault(5, 5 * 4096, user=False, irq=True).item
    assert item is not None and vcpu.entry() == [] and vcpu.halted
    assert vcpu.complete(item)
    vcpu.unhalt()
    assert vcpu.entry() == []
    ready = events(log, "kvm_async_pf_ready")[-1]
    assert ready["token"] == item.token and ready["injected"] is False and ready["vector"] is None
    assert vcpu.area is not None and vcpu.area.token == 0 and not vcpu.gfn_hash and not vcpu.halted
    assert not vcpu.pageready_pending and vcpu.queued == 0


def test_kvm_arch_can_dequeue_async_page_present_needs_the_lapic_enabled():
    """With APF on, page-ready waits for a free slot and a software-enabled LAPIC (kvm_lapic_enabled); enabling it
    raises KVM_REQ_APF_READY (apic_set_spiv) and the next entry delivers."""
    vcpu, _ = make_vcpu()
    boot(vcpu, lapic=False)
    assert vcpu.entry() == []  # the wake-all waits
    item = vcpu.on_fault(5, 0, user=True, irq=True).item
    assert item is not None
    vcpu.complete(item)
    assert vcpu.entry() == [] and len(vcpu.done) == 2
    vcpu.write_msr(MSR_X2APIC_SPIV, SPIV_ON)
    assert vcpu.entry() == [VECTOR]
    assert vcpu.area is not None and vcpu.area.token == KVM_APF_WAKE_ALL_TOKEN
    assert release_and_ack(vcpu) == [VECTOR] and vcpu.area.token == item.token


def test_kvm_arch_can_dequeue_async_page_present_consumes_everything_with_apf_off():
    """APF off: `if (!kvm_pv_async_pf_enabled(vcpu)) return true`: items are dequeued, traced, never injected."""
    vcpu, log = make_vcpu()
    a = vcpu.on_fault(5, 0, user=True, irq=True).item
    b = vcpu.on_fault(6, 0, user=True, irq=True).item
    assert a is not None and b is not None
    vcpu.complete(a)
    vcpu.complete(b)
    assert vcpu.check_completion() == [] and vcpu.queued == 0
    assert [kw["injected"] for kw in events(log, "kvm_async_pf_ready")] == [False, False]


def test_kvm_async_pf_wakeup_all_only_if_done_is_empty():
    """An enabling write queues a wake-all only when the done list is empty (apf-emu logs the skip)."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    a, b = (vcpu.on_fault(g, 0, user=True, irq=True).item for g in (5, 6))
    assert a is not None and b is not None
    vcpu.complete(a)
    assert vcpu.entry() == [VECTOR]  # a is in the slot, not yet released
    vcpu.complete(b)  # b waits in the done list
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON).ok  # enabled again, without a disable in between
    assert events(log, "apf_wakeup_all_skipped") == [{"done": 1}]
    assert release_and_ack(vcpu) == [VECTOR]
    assert vcpu.area is not None and vcpu.area.token == b.token and vcpu.queued == 0
    vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON)  # the done list is empty now
    vcpu.area.token = 0
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, 1).vectors == (VECTOR,)
    assert vcpu.area.token == KVM_APF_WAKE_ALL_TOKEN


def test_kvm_clear_async_pf_completion_queue_waits_for_the_page_ins_in_flight():
    """Disabling runs kvm_clear_async_pf_completion_queue: cancel_work_sync waits for each page-in that is running
    (it completes as usual, kvm_async_pf_completed), then everything is eaten without telling the guest, and the gfn
    hash is reset. A page-in already done is not waited for."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    running, done = (vcpu.on_fault(g, 0, user=True, irq=True).item for g in (5, 6))
    assert running is not None and done is not None
    vcpu.complete(done)
    result = vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, 0)
    assert result.ok and result.flush == (running,)
    vcpu.complete(running)  # the page-in ends while the vCPU waits in the exit (the kick it asks for is moot)
    assert [kw["token"] for kw in events(log, "kvm_async_pf_completed")] == [done.token, running.token]
    vcpu.clear_async_pf_completion_queue("apf_disabled")
    assert vcpu.check_completion() == [] and not vcpu.gfn_hash and vcpu.queued == 0
    assert sorted(kw["token"] for kw in events(log, "apf_ready_dropped")) == sorted([running.token, done.token])
    assert not [kw for kw in events(log, "kvm_async_pf_ready") if kw["token"] != KVM_APF_WAKE_ALL_TOKEN]
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, 0).flush == ()  # already off: nothing in flight


def test_kvm_arch_async_page_ready_prefaults_an_evicted_page_before_the_page_ready():
    """kvm_check_async_pf_completion calls kvm_arch_async_page_ready (a prefetch fault, always synchronous) before
    kvm_arch_async_page_present: a page evicted since its page-in is faulted in again before its page-ready."""
    vcpu, log = make_vcpu()
    boot(vcpu)
    out: set[int] = set()
    vcpu.present = lambda gfn: gfn not in out
    item = vcpu.on_fault(5, 0, user=True, irq=True).item
    assert item is not None
    vcpu.complete(item)
    out.add(5)  # evicted again before the entry
    assert vcpu.entry() == [] and vcpu.prefault is item
    assert not [kw for kw in events(log, "kvm_async_pf_ready") if kw["token"] == item.token]
    assert vcpu.check_completion() == []  # the vCPU is still in the loop
    out.discard(5)  # the synchronous fault brought it in
    assert vcpu.page_ready() == [VECTOR] and vcpu.prefault is None
    assert events(log, "apf_sync_fault")[-1] == {"gfn": 5, "reason": "prefault", "token": item.token}
    assert vcpu.area is not None and vcpu.area.token == item.token and vcpu.queued == 0


@pytest.mark.parametrize("acked", [False, True])
def test_kvm_vcpu_reset_keeps_pageready_pending(acked):
    """kvm_vcpu_reset clears the MSRs, the queue and the hash, not apf.pageready_pending: a vCPU reset while its last
    page-ready was not ACKed kicks no completion of its next boot until that boot's first ACK. (The connection of
    the next boot is a new VcpuApf made with the flag the reset left: host_daemon/vcpu_conn.py.)"""
    vcpu, _ = make_vcpu()
    boot(vcpu)
    item = vcpu.on_fault(5, 0, user=True, irq=True).item
    assert item is not None
    vcpu.complete(item)
    assert vcpu.entry() == [VECTOR] and vcpu.pageready_pending
    if acked:
        release_and_ack(vcpu)
    vcpu.reset("vcpu_reset")
    assert vcpu.pageready_pending is not acked
    # The next boot, before it enables APF: a fault halts the vCPU, and its completion kicks only without the flag.
    nxt = VcpuApf(3, vcpu.ram_u32, PAGES, EventLog(), pageready_pending=vcpu.pageready_pending)
    fault = nxt.on_fault(6, 0, user=True, irq=True).item
    assert fault is not None
    assert nxt.complete(fault) is acked


def test_kvm_vcpu_reset():
    """kvm_vcpu_reset: MSRs 0, queue eaten, hash reset, halt ended; kvm_lapic_reset: SPIV 0xff (disabled)."""
    vcpu, _ = make_vcpu()
    boot(vcpu)
    vcpu.on_fault(5, 0, user=False, irq=True)
    vcpu.entry()
    assert vcpu.halted
    vcpu.reset("vcpu_reset")
    assert (vcpu.msr_en, vcpu.msr_int, vcpu.queued, vcpu.halted, vcpu.gfn_hash) == (0, 0, 0, False, set())
    assert not vcpu.lapic_enabled and not vcpu.requests


def test_restore_reraises_a_published_page_ready_and_queues_a_wake_all():
    """A VMM restoring the registers (KVM_SET_MSRS) goes through kvm_pv_enable_async_pf: a wake-all, and the
    interrupt of a page-ready still in the slot is raised again (the restored IRR)."""
    vcpu, log = make_vcpu()
    area_token = make_token(7, 3)
    vcpu.ram_u32[AREA // 4 + 1] = area_token  # the slot as the old host left it (token at offset 4)
    vcpu.restore(ON, VECTOR, 8, SPIV_ON)
    assert vcpu.reraise and vcpu.slot_token == area_token and vcpu.apf_id == 8
    assert vcpu.entry() == []  # the wake-all waits for the guest to release the slot
    assert release_and_ack(vcpu) == [VECTOR]
    assert vcpu.area is not None and vcpu.area.token == KVM_APF_WAKE_ALL_TOKEN
    assert events(log, "kvm_async_pf_ready")[-1]["released"] == area_token


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


# --- any interleaving -----------------------------------------------------------------------------------------------
class KvmApfMachine(RuleBasedStateMachine):
    """KVM's side against a Linux-like guest: faults in any mode, page-ins completing in any order, evictions (a page
    out again before its page-ready: the prefault), entries (the end of any exit, or a kick), the halt and its
    wake-up, the guest's page-ready handler split at the slot release and the ACK, LAPIC and APF toggles.

    Safety: the slot is never written while it holds a token; only injected not-presents (and wake-alls) get a
    page-ready, each once, and only once its page is in; a halt never outlives its events. Liveness (teardown):
    once every page-in is done, the LAPIC and APF are on and the guest handles what it gets, every injected token
    that no disable ate has had exactly one page-ready."""

    def __init__(self) -> None:
        super().__init__()
        self.vcpu, self.log = make_vcpu(5)
        self.out: set[int] = set()  # gfns evicted since their page-in
        self.vcpu.present = lambda gfn: gfn not in self.out
        self.gfn_of: dict[int, int] = {}
        boot(self.vcpu)
        self.in_flight: list[AsyncPf] = []
        self.slot_holder: int | None = None  # delivered, not yet released
        self.injected: set[int] = set()
        self.delivered: list[int] = []

    # the host side
    def _got(self, vectors: list[int] | tuple[int, ...]) -> None:
        assert len(vectors) <= 1
        if not vectors:
            return
        assert vectors == [VECTOR] or vectors == (VECTOR,)
        assert self.slot_holder is None, "page-ready written over a token the guest has not released"
        area = self.vcpu.area
        assert area is not None and self.vcpu.pageready_pending
        token = area.token
        if token != KVM_APF_WAKE_ALL_TOKEN:
            assert token in self.injected and token not in self.delivered
            assert self.gfn_of[token] not in self.out, "page-ready for a page that is out"
            self.delivered.append(token)
        self.slot_holder = token

    def _deliver(self, vectors: list[int] | tuple[int, ...]) -> None:
        """What the I/O layer does with kvm_check_async_pf_completion's result: raise it, and where it stopped at
        an evicted page, fault that page in (kvm_arch_async_page_ready) and let it go on."""
        self._got(vectors)
        while (item := self.vcpu.prefault) is not None:
            assert item.gfn in self.out
            self.out.discard(item.gfn)
            self._got(self.vcpu.page_ready())

    def _enter(self) -> None:
        self._deliver(self.vcpu.entry())

    @precondition(lambda self: not self.vcpu.halted)
    @rule(gfn=st.integers(1, 12), user=st.booleans(), irq=st.booleans())
    def fault(self, gfn: int, user: bool, irq: bool) -> None:
        decision = self.vcpu.on_fault(gfn, gfn * 4096, user=user, irq=irq)
        item = decision.item
        if item is not None:
            assert token_is_well_formed(item.token, 5) and item.token not in self.injected
            self.gfn_of[item.token] = gfn
            self.in_flight.append(item)
            if decision.kind is Fault.INJECT:
                assert user or _send_always(self.vcpu)
                self.injected.add(item.token)
                assert self.vcpu.area is not None
                self.vcpu.area.flags = 0  # the guest's #PF handler: read and reset
        self._enter()  # the exit ends

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def page_in_done(self, data: st.DataObject) -> None:
        item = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        self.out.discard(item.gfn)
        if self.vcpu.complete(item) and not self.vcpu.halted:
            self._enter()  # the kick

    @precondition(lambda self: any(not item.wakeup_all for item in self.vcpu.done))
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        """The host evicts the page of a completed event that is still waiting for its page-ready."""
        self.out.add(data.draw(st.sampled_from(sorted(item.gfn for item in self.vcpu.done if not item.wakeup_all))))

    @precondition(lambda self: self.vcpu.halted and self.vcpu.has_events())
    @rule()
    def halt_wakes(self) -> None:
        self.vcpu.unhalt()
        self._enter()

    @precondition(lambda self: not self.vcpu.halted)
    @rule()
    def other_exit(self) -> None:
        self._enter()

    # the guest's page-ready handler
    @precondition(lambda self: self.slot_holder is not None and not self.vcpu.halted)
    @rule()
    def release_slot(self) -> None:
        assert self.vcpu.area is not None
        self.vcpu.area.token = 0
        self.slot_holder = None

    @precondition(lambda self: not self.vcpu.halted)
    @rule(value=st.sampled_from([1, 3]))
    def ack(self, value: int) -> None:
        result = self.vcpu.write_msr(MSR_KVM_ASYNC_PF_ACK, value)
        self._deliver(result.vectors)
        self._enter()

    @precondition(lambda self: not self.vcpu.halted)
    @rule(enabled=st.booleans())
    def lapic(self, enabled: bool) -> None:
        self.vcpu.write_msr(MSR_X2APIC_SPIV, SPIV_ON if enabled else 0xFF)
        self._enter()

    @precondition(lambda self: not self.vcpu.halted)
    @rule(send_always=st.booleans())
    def reinit(self, send_always: bool) -> None:
        """kvm_guest_cpu_offline + kvm_guest_cpu_init: disable (the page-ins in flight complete first), then
        enable; the slot is left as it is."""
        result = self.vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, 0)
        assert result.flush is not None and set(map(id, result.flush)) == set(map(id, self.in_flight))
        for item in self.in_flight:
            self.out.discard(item.gfn)
            self.vcpu.complete(item)
        self.in_flight.clear()
        self.vcpu.clear_async_pf_completion_queue("apf_disabled")
        assert self.vcpu.queued == 0 and not self.vcpu.gfn_hash
        self.vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON | (KVM_ASYNC_PF_SEND_ALWAYS if send_always else 0))
        self._enter()

    @invariant()
    def bounded(self) -> None:
        assert self.vcpu.queued <= ASYNC_PF_PER_VCPU + 1  # 64 faults, plus a wake-all
        assert len(self.vcpu.gfn_hash) <= ASYNC_PF_PER_VCPU
        assert not (self.vcpu.halted and APF_HALT in self.vcpu.requests)

    def teardown(self) -> None:
        vcpu = self.vcpu
        if vcpu.halted:
            while self.in_flight:
                self.page_in_done_now(self.in_flight.pop())
            self.halt_wakes()
        vcpu.write_msr(MSR_X2APIC_SPIV, SPIV_ON)
        if not vcpu.pv_enabled:
            return
        while self.in_flight:
            self.page_in_done_now(self.in_flight.pop())
        self._enter()
        for _ in range(2 * ASYNC_PF_PER_VCPU + 2):
            if self.slot_holder is not None:
                self.release_slot()
            self.ack(1)
        assert not vcpu.done and self.slot_holder is None
        dropped = {kw["token"] for e, kw in self.log.events if e == "apf_ready_dropped"}
        assert sorted(self.delivered) == sorted(self.injected - dropped)
        halted = [kw for kw in events(self.log, "kvm_async_pf_ready") if kw["injected"] is False]
        assert all(kw["token"] not in self.injected for kw in halted)

    def page_in_done_now(self, item: AsyncPf) -> None:
        self.out.discard(item.gfn)
        if self.vcpu.complete(item) and not self.vcpu.halted:
            self._enter()


def _send_always(vcpu: VcpuApf) -> bool:
    return bool(vcpu.msr_en & KVM_ASYNC_PF_SEND_ALWAYS)


TestKvmApfMachine = KvmApfMachine.TestCase


# --- the `ve` ABI (shared/abis.py): apf-emu's design of not-present as #VE ----------------------------------------
VE_AREA = AREA + 16


def make_ve_vcpu() -> tuple[VcpuApf, EventLog]:
    vcpu, log = make_vcpu()
    vcpu.abi = "ve"
    boot(vcpu)
    assert vcpu.write_msr(MSR_APF_EMU_VE_INFO, VE_AREA | APF_EMU_VE_INFO_ENABLED).ok
    return vcpu, log


def test_msr_apf_emu_ve_info_exists_only_on_the_ve_abi_and_is_checked_before_it_is_stored():
    plain, _ = make_vcpu()
    assert not plain.write_msr(MSR_APF_EMU_VE_INFO, VE_AREA | 1).ok and plain.ve_area is None
    assert not plain.read_msr(MSR_APF_EMU_VE_INFO).ok
    vcpu, _ = make_vcpu()
    vcpu.abi = "ve"
    assert not vcpu.write_msr(MSR_APF_EMU_VE_INFO, VE_AREA | 0x2 | 1).ok  # bits 2:1 reserved
    assert not vcpu.write_msr(MSR_APF_EMU_VE_INFO, (PAGES * 4096 - 32) | 1).ok  # the area would leave guest RAM
    assert vcpu.msr_ve == 0
    assert vcpu.area_gfn_enabled_by(MSR_APF_EMU_VE_INFO, (5 * 4096 + 8) | 1) == 5
    assert vcpu.write_msr(MSR_APF_EMU_VE_INFO, (5 * 4096 + 8) | 1).ok
    assert vcpu.read_msr(MSR_APF_EMU_VE_INFO).value == (5 * 4096 + 8) | 1
    boot(vcpu)
    assert vcpu.area_gfns() == {AREA // 4096, 5}
    vcpu.reset("vcpu_reset")
    assert vcpu.msr_ve == 0 and vcpu.ve_area is None


def test_ve_delivers_a_not_present_as_ve_through_the_area():
    """`_async_page_not_present` on `ve`: the area is filled (token as the guest linear address, the gpa), its busy
    word set, and #VE (vector 20, no CR2) injected; `flags` is not touched."""
    vcpu, log = make_ve_vcpu()
    decision = vcpu.on_fault(5, 5 * 4096, user=True, irq=True)
    assert decision.kind is Fault.INJECT and decision.item is not None
    assert decision.exception == (20, 0)
    ve = vcpu.ve_area
    assert ve is not None and ve.busy == 0xFFFFFFFF and ve.guest_linear_address == decision.item.token
    assert ve.guest_physical_address == 5 * 4096 and ve.exit_reason == 48
    assert vcpu.area is not None and vcpu.area.flags == 0
    assert events(log, "kvm_async_pf_not_present")[-1]["vector"] == 20


def test_ve_halts_the_vcpu_while_the_guest_has_not_released_the_last_ve():
    """While the busy word is still set, another #VE cannot be delivered: the fault halts the vCPU instead (as a
    convertible EPT violation is then an ordinary VM exit), and its ready is traced without injection."""
    vcpu, log = make_ve_vcpu()
    first = vcpu.on_fault(5, 5 * 4096, user=True, irq=True)
    second = vcpu.on_fault(6, 6 * 4096, user=True, irq=True)
    assert first.kind is Fault.INJECT and second.kind is Fault.HALT and second.reason == "ve_busy"
    assert second.item is not None and not second.item.notpresent_injected
    assert events(log, "kvm_async_pf_not_present")[-1]["injected"] is False
    ve = vcpu.ve_area
    assert ve is not None
    ve.busy = 0  # the guest's handler took the first
    third = vcpu.on_fault(7, 7 * 4096, user=True, irq=True)
    assert third.kind is Fault.INJECT and third.exception == (20, 0)


def test_ve_without_its_area_placed_delivers_as_int_does():
    """A `ve` host with a guest that never placed a #VE area (an `int` guest): not-present stays a #PF."""
    vcpu, _ = make_vcpu()
    vcpu.abi = "ve"
    boot(vcpu)
    decision = vcpu.on_fault(5, 5 * 4096, user=True, irq=True)
    assert decision.item is not None and decision.exception == (14, decision.item.token)


# --- the `int-error` ABI (Vivek Goyal's RFC "kvm,x86: Report async page fault error", June 2020) -------------------
def make_error_vcpu(*, send_error: bool = True) -> tuple[VcpuApf, EventLog]:
    vcpu, log = make_vcpu()
    vcpu.abi = "int-error"
    boot(vcpu, ON | (KVM_ASYNC_PF_SEND_ERROR if send_error else 0))
    return vcpu, log


def test_send_error_is_a_reserved_bit_except_where_the_host_offers_error_delivery():
    plain, _ = make_vcpu()
    assert not plain.write_msr(MSR_KVM_ASYNC_PF_EN, ON | KVM_ASYNC_PF_SEND_ERROR).ok  # bits 5:4 reserved
    vcpu, _ = make_error_vcpu()
    assert vcpu.send_error and vcpu.pv_enabled
    assert not vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, ON | 0x20).ok  # bit 5 still reserved


def test_a_failed_page_in_is_reported_with_its_page_ready_when_the_guest_asked():
    """The RFC's kvm_arch_async_page_present: apf_put_user_ready writes the token, then ready_flags = PAGE_ERROR
    (and 0 with every token that had no error); the gfn is not made synchronous, the guest was told."""
    vcpu, log = make_error_vcpu()
    bad = vcpu.on_fault(5, 5 * 4096, user=True, irq=True).item
    assert bad is not None
    vcpu.complete(bad, error=True)
    assert vcpu.entry() == [VECTOR]
    area = vcpu.area
    assert area is not None and area.token == bad.token and area.ready_flags == KVM_PV_REASON_PAGE_ERROR
    assert events(log, "kvm_async_pf_ready")[-1]["error_reported"] is True and vcpu.error_gfn is None
    release_and_ack(vcpu)
    good = vcpu.on_fault(6, 6 * 4096, user=True, irq=True).item
    assert good is not None
    vcpu.complete(good)
    assert vcpu.entry() == [VECTOR] and area.ready_flags == 0


def test_an_unreported_failure_makes_the_next_fault_on_its_gfn_synchronous():
    """Without SEND_ERROR (or for a fault that was not injected) the RFC records `error_gfn`; the next fault on it
    is refused async by kvm_can_do_async_pf(vcpu, gfn), so it is synchronous and its failure exits to the VMM."""
    vcpu, _ = make_error_vcpu(send_error=False)
    bad = vcpu.on_fault(5, 5 * 4096, user=True, irq=True).item
    assert bad is not None
    vcpu.complete(bad, error=True)
    assert vcpu.entry() == [VECTOR]
    assert vcpu.area is not None and vcpu.area.ready_flags == 0 and vcpu.error_gfn == 5
    release_and_ack(vcpu)
    again = vcpu.on_fault(5, 5 * 4096, user=True, irq=True)
    assert again.kind is Fault.SYNC and again.reason == "error_gfn"
    vcpu.reset("vcpu_reset")
    assert vcpu.error_gfn is None


def test_on_int_a_failed_page_in_is_delivered_as_if_it_had_worked():
    """The `int` ABI has no error path: the page-ready goes out, the page is still out, the guest faults again on
    it (the endless retry Vivek Goyal reported, which the checker's retry_loop flags)."""
    vcpu, _ = make_vcpu()
    boot(vcpu)
    bad = vcpu.on_fault(5, 5 * 4096, user=True, irq=True).item
    assert bad is not None
    vcpu.complete(bad, error=True)
    assert vcpu.entry() == [VECTOR] and vcpu.error_gfn is None
    release_and_ack(vcpu)
    assert vcpu.on_fault(5, 5 * 4096, user=True, irq=True).kind is Fault.INJECT


# --- the `pf` ABI: KVM 5.7 (arch/x86/kvm/x86.c of that release) ---------------------------------------------------
PF_ON = AREA | KVM_ASYNC_PF_ENABLED


def make_pf_vcpu(*, no_pending_check: bool = False, no_cancel_pending: bool = False) -> tuple[VcpuApf, EventLog]:
    """A 5.7 host after 5.7's kvm_guest_cpu_init (MSR_KVM_ASYNC_PF_EN only), whose wake-all the guest has taken."""
    vcpu, log = make_vcpu()
    vcpu.abi = "pf"
    vcpu.no_pending_check, vcpu.no_cancel_pending = no_pending_check, no_cancel_pending
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, PF_ON).ok and vcpu.pv_enabled
    vcpu.entry(irq=True)
    assert vcpu.take_exception() == (14, KVM_APF_WAKE_ALL_TOKEN)  # the wake-all is a #PF with CR2 = ~0
    assert vcpu.area is not None and vcpu.area.flags == 2
    vcpu.area.flags = 0  # the guest's kvm_read_and_reset_pf_reason
    return vcpu, log


def completed_then_pending(vcpu: VcpuApf) -> tuple[AsyncPf, AsyncPf]:
    """A not-present taken by the guest and its page-in done, then a second not-present still pending: the entry
    that ends this exit meets both."""
    first = vcpu.on_fault(5, 5 * 4096, user=True, irq=True).item
    assert first is not None and vcpu.area is not None
    vcpu.take_exception()
    vcpu.area.flags = 0
    vcpu.complete(first)
    second = vcpu.on_fault(6, 6 * 4096, user=True, irq=True).item
    assert second is not None
    return first, second


def test_pf_kvm_pv_enable_async_pf_of_5_7():
    """5.7's kvm_pv_enable_async_pf: bits 5:3 reserved (DELIVERY_AS_INT is bit 3), no INT or ACK MSR (unknown:
    #GP), the value stored before the area's address is looked at (kvm_gfn_to_hva_cache_init's #GP leaves it)."""
    vcpu, _ = make_vcpu()
    vcpu.abi = "pf"
    assert not vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, PF_ON | KVM_ASYNC_PF_DELIVERY_AS_INT).ok and vcpu.msr_en == 0
    for msr in (MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_ACK):
        assert vcpu.write_msr(msr, 1).error == "unknown MSR" and not vcpu.read_msr(msr).ok
    outside = (PAGES * 4096) | KVM_ASYNC_PF_ENABLED
    assert not vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, outside).ok
    assert vcpu.read_msr(MSR_KVM_ASYNC_PF_EN).value == outside and not vcpu.pv_enabled
    assert vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, PF_ON).ok and vcpu.pv_enabled and vcpu.area_gfns() == {0}


def test_pf_kvm_arch_async_page_not_present_queues_a_pending_pf_with_reason_1():
    vcpu, _ = make_pf_vcpu()
    decision = vcpu.on_fault(5, 5 * 4096, user=True, irq=True)
    assert decision.kind is Fault.INJECT and decision.item is not None
    token = decision.item.token
    assert vcpu.exception == (14, token) and vcpu.area is not None and vcpu.area.flags == 1
    kernel = vcpu.on_fault(6, 6 * 4096, user=False, irq=True)  # send_user_only: the halt
    assert kernel.kind is Fault.HALT and kernel.reason == "kernel_mode"


def test_pf_kvm_check_async_pf_completion_runs_after_every_exit_and_needs_kvm_can_do_async_pf():
    """No KVM_REQ_APF_READY and no kick in 5.7: a completion waits for an entry; kvm_arch_can_inject_async_page_present
    is kvm_can_do_async_pf: interrupts allowed and no exception pending, so one page-ready per entry."""
    vcpu, _ = make_pf_vcpu()
    items = [vcpu.on_fault(g, g * 4096, user=True, irq=True).item for g in (5, 6)]
    for item in items:
        assert item is not None
        vcpu.take_exception()
        assert vcpu.area is not None
        vcpu.area.flags = 0
    assert [vcpu.complete(item) for item in items if item is not None] == [False, False]  # async_pf_execute: no kick
    assert vcpu.entry(irq=False) == [] and vcpu.take_exception() is None  # interrupts off: it waits
    vcpu.entry(irq=True)
    assert items[0] is not None and vcpu.take_exception() == (14, items[0].token)
    assert vcpu.area is not None and vcpu.area.flags == 2 and len(vcpu.done) == 1  # the second waits for the next
    vcpu.area.flags = 0
    vcpu.entry(irq=True)
    assert items[1] is not None and vcpu.take_exception() == (14, items[1].token)


def test_pf_a_pending_not_present_keeps_page_ready_out_so_the_cancel_is_dead_code():
    """2a266f23550b's exception.pending in kvm_can_do_async_pf: with a not-present pending, no page-ready is
    injected at that entry, so kvm_arch_async_page_present's cancel (9a6e7c39810e) never runs: what Vitaly
    Kuznetsov's 2020 revert says."""
    vcpu, log = make_pf_vcpu()
    _first, second = completed_then_pending(vcpu)
    vcpu.entry(irq=True)
    assert vcpu.take_exception() == (14, second.token) and vcpu.area.flags == 1 and len(vcpu.done) == 1
    assert not events(log, "apf_cancel") and not events(log, "kvm_multiple_exception")


def test_pf_without_the_pending_check_the_cancel_drops_both_events_whatever_their_tokens():
    """9a6e7c39810e: reason still PAGE_NOT_PRESENT and that #PF pending: reason = 0 and the pending exception
    dropped; the page-ready (of another token) is lost with it, as Vitaly Kuznetsov's revert points out."""
    vcpu, log = make_pf_vcpu(no_pending_check=True)
    first, second = completed_then_pending(vcpu)
    vcpu.entry(irq=True)
    assert vcpu.take_exception() is None and vcpu.area.flags == 0
    assert events(log, "apf_cancel") == [{"token": first.token, "cancelled": second.token,
                                          "message": events(log, "apf_cancel")[0]["message"]}]


def test_pf_without_either_fix_two_pfs_at_one_entry_are_a_double_fault():
    """kvm_multiple_exception: a #PF queued while a #PF is pending is #DF (vector 8, error code 0)."""
    vcpu, log = make_pf_vcpu(no_cancel_pending=True)
    _first, _second = completed_then_pending(vcpu)
    vcpu.entry(irq=True)
    assert vcpu.take_exception() == (8, 0)
    assert events(log, "reason_overwritten")[0]["old"] == 1
    assert events(log, "kvm_multiple_exception")[0]["result"] == "double_fault"


def test_pf_apf_off_consumes_completions_even_with_interrupts_off():
    """kvm_arch_can_inject_async_page_present: APF disabled, true: the event is eaten, nothing injected."""
    vcpu, log = make_pf_vcpu()
    item = vcpu.on_fault(5, 5 * 4096, user=True, irq=True).item
    assert item is not None
    vcpu.take_exception()
    vcpu.complete(item)
    vcpu.msr_en = 0  # as if the disable's clear had not run yet
    vcpu.entry(irq=False)
    assert not vcpu.done and vcpu.take_exception() is None
    assert events(log, "kvm_async_pf_ready")[-1]["injected"] is False


class PfMachine(RuleBasedStateMachine):
    """KVM 5.7 (`pf`) against a 5.7 guest that reads and resets `reason` when it takes each #PF: faults in any mode,
    page-ins completing in any order, entries with interrupts on or off, halts. Safety: every #PF the host injects
    carries the reason that belongs to its CR2 (1 for a not-present token, 2 for a page-ready), nothing is ever
    cancelled, overwritten or doubled (the pending check keeps page-ready out while a #PF is pending). Liveness
    (teardown): every injected not-present gets exactly one page-ready."""

    def __init__(self) -> None:
        super().__init__()
        self.vcpu, self.log = make_pf_vcpu()
        self.in_flight: list[AsyncPf] = []
        self.injected: set[int] = set()
        self.readied: list[int] = []

    def _take(self) -> None:
        """The entry's injection, and the guest's #PF handler: kvm_read_and_reset_pf_reason."""
        exception = self.vcpu.take_exception()
        area = self.vcpu.area
        assert area is not None
        if exception is None:
            return
        vector, cr2 = exception
        assert vector == 14
        if cr2 in self.injected and cr2 not in self.readied and area.flags == 1:
            pass  # the not-present itself
        else:
            assert area.flags == 2 and (cr2 == KVM_APF_WAKE_ALL_TOKEN or cr2 in self.injected)
            if cr2 != KVM_APF_WAKE_ALL_TOKEN:
                assert cr2 not in self.readied
                self.readied.append(cr2)
        area.flags = 0

    def _enter(self, irq: bool) -> None:
        self.vcpu.entry(irq=irq)
        self._take()

    @precondition(lambda self: not self.vcpu.halted)
    @rule(gfn=st.integers(1, 12), user=st.booleans(), irq=st.booleans())
    def fault(self, gfn: int, user: bool, irq: bool) -> None:
        decision = self.vcpu.on_fault(gfn, gfn * 4096, user=user, irq=irq)
        if decision.item is not None:
            self.in_flight.append(decision.item)
            if decision.kind is Fault.INJECT:
                self.injected.add(decision.item.token)
        self._enter(irq)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def page_in_done(self, data: st.DataObject) -> None:
        item = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        assert self.vcpu.complete(item) is False  # 5.7 kicks nobody

    @precondition(lambda self: self.vcpu.halted and self.vcpu.has_events())
    @rule()
    def halt_wakes(self) -> None:
        self.vcpu.unhalt()
        self._enter(True)

    @precondition(lambda self: not self.vcpu.halted)
    @rule(irq=st.booleans())
    def other_exit(self, irq: bool) -> None:
        self._enter(irq)

    @invariant()
    def nothing_cancelled_overwritten_or_doubled(self) -> None:
        names = {e for e, _ in self.log.events}
        assert not names & {"apf_cancel", "reason_overwritten", "kvm_multiple_exception"}

    def teardown(self) -> None:
        while self.in_flight:
            self.vcpu.complete(self.in_flight.pop())
        self.vcpu.unhalt()
        for _ in range(2 * ASYNC_PF_PER_VCPU + 2):
            self._enter(True)
        assert not self.vcpu.done
        halted = {kw["token"] for kw in events(self.log, "kvm_async_pf_ready") if kw["injected"] is False}
        assert sorted(self.readied) == sorted(self.injected) and not halted & self.injected


TestPfMachine = PfMachine.TestCase


# --- historical bugs (shared/bugs.py), each against the rule its fix made -----------------------------------------
def make_buggy(bug: str, vcpu_id: int = 3) -> tuple[VcpuApf, EventLog]:
    vcpu, log = make_vcpu(vcpu_id)
    vcpu.bugs = frozenset({bug})
    return vcpu, log


def test_bz208081_kvm_arch_async_page_present_injects_for_a_halted_fault_before_2a18b7e7cd88():
    """The bug: page-ready for a not-present that was not injected (a kernel-mode fault halted the vCPU). The same
    steps as test_kvm_arch_async_page_present_traces_a_halted_fault_without_injecting, which is the fix."""
    vcpu, log = make_buggy("bz208081")
    boot(vcpu)
    item = vcpu.on_fault(5, 5 * 4096, user=False, irq=True).item
    assert item is not None and not item.notpresent_injected and vcpu.entry() == [] and vcpu.halted
    vcpu.complete(item)
    vcpu.unhalt()
    assert vcpu.entry() == [VECTOR]
    ready = events(log, "kvm_async_pf_ready")[-1]
    assert ready["token"] == item.token and ready["injected"] is True
    assert vcpu.area is not None and vcpu.area.token == item.token and vcpu.pageready_pending


def test_token_zero_alloc_apf_token_before_6f3c1fc53d86_gives_vcpu_0_the_token_0():
    """The bug: (id++ << 12) | vcpu_id from id 0. With 0 in the slot apf_pageready_slot_free sees a free slot, so
    one entry delivers the next page-ready over it: token 0's wake is lost."""
    vcpu, _ = make_buggy("token-zero", vcpu_id=0)
    boot(vcpu)
    first = vcpu.on_fault(5, 0, user=True, irq=True).item
    second = vcpu.on_fault(6, 0, user=True, irq=True).item
    assert first is not None and second is not None and (first.token, second.token) == (0, make_token(1, 0))
    vcpu.complete(first)
    vcpu.complete(second)
    assert vcpu.entry() == [VECTOR, VECTOR]  # both dequeued at one entry: the slot read 0 after the first
    assert vcpu.area is not None and vcpu.area.token == second.token
    fixed, _ = make_vcpu(0)
    assert fixed.on_fault(5, 0, user=True, irq=True).item.token == make_token(1, 0)  # type: ignore[union-attr]


def test_lapic_disabled_before_2f15d027c05f_dequeues_and_drops_the_interrupt():
    """The bug: kvm_arch_can_dequeue_async_page_present without kvm_lapic_enabled. The wake-all of an enabling
    write made while the LAPIC is software-disabled goes into the slot and its interrupt is dropped
    (__apic_accept_irq); enabling the LAPIC raises nothing (apic_set_spiv had no KVM_REQ_APF_READY); the slot
    stays taken, so a later page-ready is never dequeued. test_kvm_arch_can_dequeue_async_page_present_needs_the_
    lapic_enabled is the fix."""
    vcpu, log = make_buggy("lapic-disabled")
    boot(vcpu, lapic=False)
    assert vcpu.entry() == []  # dequeued all the same, and the interrupt lost
    assert vcpu.area is not None and vcpu.area.token == KVM_APF_WAKE_ALL_TOKEN and vcpu.pageready_pending
    assert events(log, "apf_irq_dropped")[-1]["token"] == KVM_APF_WAKE_ALL_TOKEN
    vcpu.write_msr(MSR_X2APIC_SPIV, SPIV_ON)
    assert APF_READY not in vcpu.requests
    item = vcpu.on_fault(5, 0, user=True, irq=True).item
    assert item is not None and item.notpresent_injected
    vcpu.complete(item)
    assert vcpu.entry() == [] and vcpu.has_events()  # stuck behind the slot: every HLT returns at once


def test_hlt_returned_logs_a_spin_at_1000_in_a_row_and_each_power_of_ten():
    """kvm_vcpu_has_events true with nothing deliverable: each HLT returns at once; 1,000 and 10,000 in a row are
    logged (kvm_hlt_spin), a HLT that waited or injected starts the count again."""
    vcpu, log = make_vcpu()
    for _ in range(999):
        vcpu.hlt_returned(at_once=True, injected=False)
    vcpu.hlt_returned(at_once=True, injected=True)
    vcpu.hlt_returned(at_once=False, injected=False)
    assert events(log, "kvm_hlt_spin") == []
    for _ in range(10_000):
        vcpu.hlt_returned(at_once=True, injected=False)
    assert [e["count"] for e in events(log, "kvm_hlt_spin")] == [1000, 10_000]


def test_no_disable_eat_keeps_the_completions_kvm_pv_enable_async_pf_eats():
    """KVM's kvm_pv_enable_async_pf clears the queue on disable (test_kvm_clear_async_pf_completion_queue_...); the
    hypothetical host of `no-disable-eat` keeps it, dequeues nothing while APF is off, and whoever enables APF next
    (a kdump kernel on the same vCPU, `adopt`) gets those page-readies."""
    vcpu, _ = make_buggy("no-disable-eat")
    boot(vcpu)
    item = vcpu.on_fault(5, 0, user=True, irq=True).item
    assert item is not None
    vcpu.complete(item)
    result = vcpu.write_msr(MSR_KVM_ASYNC_PF_EN, 0)
    assert result.ok and result.flush is None and vcpu.entry() == [] and vcpu.outstanding() == [item]
    kdump, log = make_buggy("no-disable-eat")
    kdump.adopt(vcpu.outstanding())
    assert events(log, "apf_carried")[-1]["token"] == item.token
    assert kdump.write_msr(MSR_X2APIC_SPIV, SPIV_ON).ok and kdump.write_msr(MSR_KVM_ASYNC_PF_INT, VECTOR).ok
    assert kdump.write_msr(MSR_KVM_ASYNC_PF_EN, ON).ok
    assert kdump.entry() == [VECTOR] and kdump.area is not None and kdump.area.token == item.token
