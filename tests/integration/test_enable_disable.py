# Enabling and disabling APF against the real host daemon: disabling eats outstanding completions, enabling sends
# wake-all, and with APF off (or ENABLED without DELIVERY_AS_INT, which 5.9+ hosts treat as off) a fault with
# interrupts on is KVM's artificial halt: traced, never injected, the exit ends once the page is in.
from __future__ import annotations

from shared.abi import (
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_ENABLED,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.wire import InjectException, Interrupt, MsrResult, MsrWrite, Resume

from .helpers import HostProcess, WireClient, wait_until

PAGES, RESIDENT = 32, 8


def test_disable_eats_completions_and_enable_wakes_all(tmp_path, vm_id):
    """kvm_pv_enable_async_pf: disabling runs kvm_clear_async_pf_completion_queue (nothing outstanding is ever
    delivered), enabling runs kvm_async_pf_wakeup_all."""
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", str(RESIDENT),
                       "--page-in-latency", "fixed:300ms")
    c = WireClient(host.socket)
    try:
        c.hello(vm_id, vcpu=0)
        ram = GuestRam.open(vm_id, RamLayout(PAGES))
        area = KvmVcpuPvApfData(ram.u32, 0)
        c.enable_apf(area)
        tokens = []
        for gfn in (20, 21, 22):
            pf = c.exit_mem(gfn)
            assert isinstance(pf, InjectException)
            area.flags = 0
            tokens.append(pf.cr2)
        # the crash path: disable without waiting for the three outstanding page-ins
        assert c.wrmsr(MSR_KVM_ASYNC_PF_EN, 0).ok
        wait_until(lambda: sum(e["event"] == "apf_ready_dropped" for e in host.events()) == 3, 5, "3 drops")
        # APF off, interrupts on: the artificial halt (kvm_can_do_async_pf), which ends only once its own 300 ms
        # page-in is done: the three dropped page-ins completed meanwhile and must not be delivered
        assert c.exit_mem(23) == Resume(23 * PAGE_SIZE)
        # re-enable: the first thing delivered is a wake-all, never a stale token
        c.send(MsrWrite(MSR_KVM_ASYNC_PF_EN, async_pf_en_value(0)))
        assert c.receive() == Interrupt(HYPERVISOR_CALLBACK_VECTOR)
        assert area.token == KVM_APF_WAKE_ALL_TOKEN
        assert isinstance(c.receive(), MsrResult)
        area.release()
        ram.close()
    finally:
        c.close()
        assert host.stop() == 0
    events = host.events()
    dropped = {e["token"] for e in events if e["event"] == "apf_ready_dropped"}
    assert dropped == set(tokens)
    assert all(e["reason"] == "apf_disabled" for e in events if e["event"] == "apf_ready_dropped")
    injected = {e["token"] for e in events if e["event"] == "kvm_async_pf_ready" and e["injected"]}
    assert injected == {KVM_APF_WAKE_ALL_TOKEN}
    halted = [e for e in events if e["event"] == "kvm_async_pf_not_present" and e["gfn"] == 23]
    assert len(halted) == 1 and halted[0]["injected"] is False
    ready = [e for e in events if e["event"] == "kvm_async_pf_ready" and e["token"] == halted[0]["token"]]
    assert len(ready) == 1 and ready[0]["injected"] is False
    assert [e["event"] for e in events if e["event"] in ("apf_halt", "apf_halt_end")] == ["apf_halt", "apf_halt_end"]
    assert not [e for e in events if e["event"] == "apf_sync_fault"]


def test_enabled_without_int_delivery_gets_no_apf(tmp_path, vm_id):
    """A pre-5.8 guest's ENABLED without DELIVERY_AS_INT: accepted, but kvm_pv_async_pf_enabled is false, so no
    #PF and no interrupt is ever injected (kvm_can_deliver_async_pf); faults halt the vCPU instead."""
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", str(RESIDENT),
                       "--page-in-latency", "fixed:1ms")
    c = WireClient(host.socket)
    try:
        c.hello(vm_id, vcpu=0)
        assert c.wrmsr(MSR_KVM_ASYNC_PF_INT, HYPERVISOR_CALLBACK_VECTOR).ok
        # a pre-5.8 guest: ENABLED | SEND_ALWAYS without DELIVERY_AS_INT, accepted...
        value = 0x40 | KVM_ASYNC_PF_ENABLED | 2
        assert c.wrmsr(MSR_KVM_ASYNC_PF_EN, value) == MsrResult(MSR_KVM_ASYNC_PF_EN, True, None)
        assert c.rdmsr(MSR_KVM_ASYNC_PF_EN).value == value  # kvm_get_msr_common reads back what was stored
        # ...but no fault is injected and no interrupt ever comes
        for gfn in range(20, 26):
            assert c.exit_mem(gfn) == Resume(gfn * PAGE_SIZE)
        assert c.interrupts == 0
    finally:
        c.close()
        assert host.stop() == 0
    events = host.events()
    not_present = [e for e in events if e["event"] == "kvm_async_pf_not_present"]
    ready = [e for e in events if e["event"] == "kvm_async_pf_ready"]
    assert len(not_present) == 6 and not any(e["injected"] for e in not_present)
    assert {e["token"] for e in ready} == {e["token"] for e in not_present}
    assert not any(e["injected"] for e in ready)
    assert sum(e["event"] == "apf_halt" for e in events) == 6
