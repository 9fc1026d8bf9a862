# Enabling and disabling APF against the real host daemon: disabling eats outstanding completions, enabling sends
# wake-all, and ENABLED without DELIVERY_AS_INT is accepted but never delivers anything (5.9+ hosts).
from __future__ import annotations

from shared.abi import (
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_ENABLED,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout

from .helpers import HostProcess, WireClient, wait_until

PAGES, RESIDENT = 32, 8


def test_disable_eats_completions_and_enable_wakes_all(tmp_path, vm_id):
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", str(RESIDENT),
                       "--page-in-latency", "fixed:300ms")
    c = WireClient(host.socket)
    try:
        c.hello(vm_id, vcpu=0)
        ram = GuestRam.open(vm_id, RamLayout(PAGES))
        area = KvmVcpuPvApfData(ram.u32, 0)
        assert c.request("msr_write", msr=MSR_KVM_ASYNC_PF_INT, value=0xF3)["ok"]
        c.send("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=async_pf_en_value(0))
        assert [c.receive()["t"], c.receive()["t"]] == ["interrupt", "msr_result"]
        area.token = 0
        assert c.request("msr_write", msr=0x4B564D07, value=1)["ok"]
        tokens = []
        for gfn in (20, 21, 22):
            pf = c.request("exit_mem", gpa=gfn * PAGE_SIZE, write=True, user=True, irq=True)
            assert pf["t"] == "inject_pf"
            area.flags = 0
            tokens.append(pf["cr2"])
        # the crash path: disable without waiting for the three outstanding page-ins
        assert c.request("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=0)["ok"]
        wait_until(lambda: sum(e["event"] == "apf_ready_dropped" for e in host.events()) == 3, 5, "3 drops")
        # the page-ins complete meanwhile (300 ms) and must not be delivered: a synchronous fault proves time
        # passed, since it waits for its own 300 ms page-in
        assert c.request("exit_mem", gpa=23 * PAGE_SIZE, write=True, user=True, irq=True)["t"] == "resume"
        # re-enable: the first thing delivered is a wake-all, never a stale token
        c.send("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=async_pf_en_value(0))
        first = c.receive()
        assert first == {"t": "interrupt", "vector": 0xF3}
        assert area.token == KVM_APF_WAKE_ALL_TOKEN
        assert c.receive()["t"] == "msr_result"
        area.release()
        ram.close()
    finally:
        c.close()
        assert host.stop() == 0
    events = host.events()
    dropped = {e["token"] for e in events if e["event"] == "apf_ready_dropped"}
    assert dropped == set(tokens)
    assert all(e["reason"] == "apf_disabled" for e in events if e["event"] == "apf_ready_dropped")
    readied = {e["token"] for e in events if e["event"] == "kvm_async_pf_ready"}
    assert readied == {KVM_APF_WAKE_ALL_TOKEN}
    assert [e["reason"] for e in events if e["event"] == "apf_sync_fault"] == ["apf_disabled"]


def test_enabled_without_int_delivery_gets_no_apf(tmp_path, vm_id):
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(PAGES), "--resident", str(RESIDENT),
                       "--page-in-latency", "fixed:1ms")
    c = WireClient(host.socket)
    try:
        c.hello(vm_id, vcpu=0)
        assert c.request("msr_write", msr=MSR_KVM_ASYNC_PF_INT, value=0xF3)["ok"]
        # a pre-5.8 guest: ENABLED | SEND_ALWAYS without DELIVERY_AS_INT, accepted...
        reply = c.request("msr_write", msr=MSR_KVM_ASYNC_PF_EN, value=0x40 | KVM_ASYNC_PF_ENABLED | 2)
        assert reply == {"t": "msr_result", "msr": MSR_KVM_ASYNC_PF_EN, "ok": True, "error": None}
        # ...but every fault is synchronous and no interrupt ever comes
        for gfn in range(20, 26):
            assert c.request("exit_mem", gpa=gfn * PAGE_SIZE, write=True, user=True, irq=True)["t"] == "resume"
    finally:
        c.close()
        assert host.stop() == 0
    names = [e["event"] for e in host.events()]
    assert "kvm_async_pf_not_present" not in names and "kvm_async_pf_ready" not in names
    assert names.count("apf_sync_fault") == 6
