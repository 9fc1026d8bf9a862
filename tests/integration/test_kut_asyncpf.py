# kvm-unit-tests x86/asyncpf.c, step by step (anchors.md 1a), as a scripted guest against the real host daemon:
# vector 0xf3 programmed before enable; each touch of a swapped-out page gives #PF with flags=1 and CR2=token; the
# page-ready comes on 0xf3 with the same token; the guest clears the token and ACKs; the retried access does not
# fault again. Also the "Wakeup all" that enabling delivers.
from __future__ import annotations

from apf_emu.checker import check_events
from guest_agent.memory import Access, GuestMemoryAccess
from shared.abi import (
    APIC_SPIV_APIC_ENABLED,
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_X2APIC_SPIV,
    SPURIOUS_APIC_VECTOR,
    async_pf_en_value,
    token_is_well_formed,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import GuestRam, RamLayout
from shared.wire import PF_VECTOR, InjectException, Interrupt, MsrResult, MsrWrite, Welcome

from .helpers import HostProcess, WireClient

PAGES, RESIDENT = 64, 32


def test_kvm_unit_tests_asyncpf_scenario(tmp_path, vm_id):
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", str(RESIDENT),
                       "--page-in-latency", "fixed:5ms")
    guest = WireClient(host.socket)
    try:
        welcome = guest.hello(vm_id, vcpu=0)
        assert isinstance(welcome, Welcome) and welcome.vcpu == 0
        ram = GuestRam.open(vm_id, RamLayout(welcome.pages))
        area = KvmVcpuPvApfData(ram.u32, 0)
        assert guest.views is not None
        mem = GuestMemoryAccess(ram, guest.views)

        # boot: the LAPIC software-enabled (kvm-unit-tests' startup does it; KVM delivers nothing to a disabled one)
        assert guest.wrmsr(MSR_X2APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR).ok
        # setup: zero the area, wrmsr(ASYNC_PF_INT, 0xf3) FIRST, then ASYNC_PF_EN
        area.flags = area.token = 0
        assert guest.request(MsrWrite(MSR_KVM_ASYNC_PF_INT, HYPERVISOR_CALLBACK_VECTOR)) == MsrResult(
            MSR_KVM_ASYNC_PF_INT, True, None)
        guest.send(MsrWrite(MSR_KVM_ASYNC_PF_EN, async_pf_en_value(0, send_always=True)))
        # The enable's wake-all is pending on re-entry: the interrupt comes before the wrmsr completes.
        assert guest.receive() == Interrupt(HYPERVISOR_CALLBACK_VECTOR)
        assert guest.receive() == MsrResult(MSR_KVM_ASYNC_PF_EN, True, None)
        assert area.token == KVM_APF_WAKE_ALL_TOKEN  # report_pass("Wakeup all")
        area.token = 0
        assert guest.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1).ok

        serviced = 0
        for gfn in range(RESIDENT + 1, RESIDENT + 9):  # pages above the resident limit start swapped out
            status, _, _, _ = mem.update_page(gfn, None, 1)
            assert status is Access.EXIT
            pf = guest.exit_mem(gfn)
            assert isinstance(pf, InjectException) and pf.vector == PF_VECTOR
            saved_token = pf.cr2
            assert token_is_well_formed(saved_token, 0)
            assert area.read_and_reset_flags() == KVM_PV_REASON_PAGE_NOT_PRESENT
            # the guest halts until the page-ready interrupt
            assert guest.receive() == Interrupt(HYPERVISOR_CALLBACK_VECTOR)
            assert area.token == saved_token, "unexpected async pf int token"
            area.token = 0
            assert guest.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1).ok
            serviced += 1
            # the retried access succeeds with no further #PF
            status, _, ok, _ = mem.update_page(gfn, None, 1)
            assert status is Access.DONE and ok
            assert area.flags == 0
        assert serviced == 8

        del mem
        area.release()
        ram.close()
    finally:
        guest.close()
        assert host.stop() == 0
    assert not host.shm_exists()
    events = host.events()
    tokens = [e["token"] for e in events if e["event"] == "kvm_async_pf_not_present"]
    assert len(tokens) == 8 and len(set(tokens)) == 8
    for token in tokens:
        seq = [e["event"] for e in events if e.get("token") == token]
        assert seq == ["kvm_async_pf_not_present", "kvm_async_pf_completed", "kvm_async_pf_ready"]
    assert [e["event"] for e in events].count("apf_ack") == 9  # eight page-ready + the wake-all
    assert check_events(sorted(events, key=lambda e: e["mono_ns"])) == []
