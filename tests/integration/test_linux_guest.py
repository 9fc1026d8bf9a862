# apf-emu's guest agent behaves as Linux 5.8+ does (arch/x86/kernel/kvm.c), shown on real processes against the
# real host: __kvm_handle_async_pf panics on a not-present in kernel mode, kvm_guest_cpu_offline(false) wakes every
# sleeper itself (apf_task_wake_all) before the host's wake-all of the re-enable can come, and
# sysvec_kvm_asyncpf_interrupt wakes whatever the slot holds, 0 too (a dummy for token 0, which the checker flags).
from __future__ import annotations

import signal

from apf_emu.checker import check_events
from apf_emu.logs import read_merged
from shared.apf_data import KVM_VCPU_PV_APF_DATA_SIZE, KvmVcpuPvApfData
from shared.guest_ram import GuestRam, RamLayout

from .helpers import GuestProcess, HostProcess, read_events, wait_for_events, wait_until


def test_a_not_present_in_kernel_mode_panics_the_guest(tmp_path, vm_id):
    """A guest that sets SEND_ALWAYS (as guests before 5.8 did) lets KVM inject not-presents at CPL 0
    (kvm_can_deliver_async_pf); Linux 5.8+ panics on the first one: "Host injected async #PF in kernel mode"."""
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", "256", "--resident", "64",
                       "--page-in-latency", "fixed:5ms")
    try:
        guest = GuestProcess(host, 0, "--send-always", "--kernel-ratio", "1", "--irq-off-ratio", "0")
        assert guest.wait() == 70  # the crash status: a panic
    finally:
        assert host.stop() == 0
    events = list(read_merged([str(tmp_path)]))
    (panic,) = [e for e in read_events(guest.log) if e["event"] == "guest_panic"]
    assert panic["reason"] == "Host injected async #PF in kernel mode"
    injected = [e for e in events if e["event"] == "kvm_async_pf_not_present" and e["injected"]]
    assert injected and not [e for e in events if e["event"] == "guest_apf_wait"]  # it never slept on one
    assert {v.invariant for v in check_events(events)} == {"guest_panic"}


def test_cpu_offline_wakes_every_sleeper_before_the_hosts_wake_all(tmp_path, vm_id):
    """kvm_guest_cpu_offline(false): MSR_KVM_ASYNC_PF_EN = 0, then apf_task_wake_all, with no page-ready from the
    host; the wake-all that enabling queues (kvm_async_pf_wakeup_all) comes only after the online re-enables APF."""
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", "512", "--resident", "128",
                       "--page-in-latency", "fixed:60ms")
    try:
        guest = GuestProcess(host, 0, "--tasks", "8", "--kernel-ratio", "0", "--irq-off-ratio", "0",
                             "--apf-reinit-every", "0.3", "--online-clears-token")
        wait_for_events(guest.log, "guest_apf_wake_all", 3, reason="offline")
        assert guest.stop() == 0
    finally:
        assert host.stop() == 0
    events = list(read_merged([str(tmp_path)]))
    assert check_events(events) == []
    offline = [i for i, e in enumerate(events) if e["event"] == "guest_apf_wake_all" and e["reason"] == "offline"]
    assert any(events[i]["count"] > 0 for i in offline), "no re-init found a task asleep"
    for i in offline:
        before = [e for e in events[:i] if e["event"] == "msr_write" and e["msr"] == "MSR_KVM_ASYNC_PF_EN"]
        assert before and before[-1]["value"] == 0  # APF already off when the guest woke its sleepers
        after = next(e for e in events[i + 1:] if (e["event"] == "kvm_async_pf_ready" and e["injected"])
                     or (e["event"] == "msr_write" and e["msr"] == "MSR_KVM_ASYNC_PF_EN"))
        assert after["event"] == "msr_write" and after["value"] != 0  # then the re-enable; its wake-all after it


def test_a_page_ready_interrupt_with_an_empty_slot_makes_a_dummy_for_token_0(tmp_path, vm_id):
    """sysvec_kvm_asyncpf_interrupt reads the slot and calls kvm_async_pf_task_wake(token) whatever it holds: with 0
    there is no sleeper, so a dummy for token 0 is inserted (no not-present will ever consume it), then the slot is
    written 0 and ACKed. In a real VM this follows a page-ready interrupt raised again after its slot was released
    (apf-emu's own re-raise after a host restart can do it, at a moment no test can force); here the guest is
    stopped with a page-ready delivered but not yet taken, and its slot is cleared through guest RAM, as any vCPU
    can write it. The task that slept on the token sleeps on, and the checker names all three consequences."""
    pages = 256
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", str(pages), "--resident", "32",
                       "--page-in-latency", "fixed:1s")
    ram = GuestRam.open(vm_id, RamLayout(pages))
    area = KvmVcpuPvApfData(ram.u32, 0 * KVM_VCPU_PV_APF_DATA_SIZE)
    try:
        guest = GuestProcess(host, 0, "--tasks", "1", "--kernel-ratio", "0", "--irq-off-ratio", "0",
                             "--shared-ratio", "0", "--drain-timeout", "0.5")
        wait_for_events(guest.log, "guest_apf_wait")
        guest.signal(signal.SIGSTOP)  # its one task sleeps; the vCPU idles
        (wait,) = [e for e in read_events(guest.log) if e["event"] == "guest_apf_wait"]
        wait_for_events(host.log_dir / "host.jsonl", "kvm_async_pf_ready", token=wait["token"], injected=True)
        # delivered (logged just before the host's store of the token): the interrupt is pending in the stopped guest
        wait_until(lambda: area.token == wait["token"], 10, "the token in the slot")
        area.token = 0
        guest.signal(signal.SIGCONT)
        wait_for_events(guest.log, "guest_apf_dummy", token=0, action="created")
        assert guest.stop() == 0
    finally:
        area.release()
        ram.close()
        assert host.stop() == 0
    events = list(read_merged([str(tmp_path)]))
    (ack,) = [e for e in events if e["event"] == "guest_apf_ack" and e["token"] == 0]
    assert [e for e in events if e["event"] == "apf_ack" and e["mono_ns"] > ack["mono_ns"]]  # ACKed all the same
    (shutdown,) = [e for e in events if e["event"] == "guest_shutdown"]
    assert shutdown["dummy_tokens"] == [0] and shutdown["sleepers"] == 1
    found = {(v.invariant, v.message.split(" ")[0]) for v in check_events(events)}
    assert found == {("wake_matches_ready", "the"), ("dummy_leak", "dummy"), ("wait_woken", "task")}, found


def test_the_boot_cpu_enables_apf_before_its_lapic_and_a_secondary_after(tmp_path, vm_id):
    """start_kernel runs smp_prepare_boot_cpu (kvm_smp_prepare_boot_cpu -> kvm_guest_cpu_init) long before
    x86_late_time_init reaches setup_local_APIC; a secondary CPU sets its LAPIC up in start_secondary and enables
    APF from cpuhp (kvm_cpu_online). On the boot CPU the enabling write's wake-all therefore waits for the LAPIC
    (kvm_arch_can_dequeue_async_page_present) and is delivered by the SPIV write's entry (apic_set_spiv)."""
    host = HostProcess(tmp_path, vm_id, "--vcpus", "2", "--pages", "256", "--resident", "64")
    try:
        guests = [GuestProcess(host, v) for v in (0, 1)]
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait")
        for g in guests:
            assert g.stop() == 0
    finally:
        assert host.stop() == 0
    events = list(read_merged([str(tmp_path)]))
    assert check_events(events) == []
    for vcpu, order in ((0, ["MSR_KVM_ASYNC_PF_INT", "MSR_KVM_ASYNC_PF_EN", "APIC_SPIV"]),
                        (1, ["APIC_SPIV", "MSR_KVM_ASYNC_PF_INT", "MSR_KVM_ASYNC_PF_EN"])):
        mine = [e for e in events if e.get("vcpu") == vcpu and e["role"] == "host"]
        writes = [e for e in mine if e["event"] == "msr_write"]
        assert [e["msr"] for e in writes[:3]] == order
        (boot,) = [e for e in events if e["event"] == "guest_boot" and e["vcpu"] == vcpu]
        assert boot["bsp"] is (vcpu == 0)
        wake_all = next(e for e in mine if e["event"] == "kvm_async_pf_ready")
        assert wake_all["token"] == 0xFFFFFFFF and wake_all["mono_ns"] > writes[2 if vcpu == 0 else 1]["mono_ns"]
