# apf-emu's guest agent behaves as Linux 5.8+ does (arch/x86/kernel/kvm.c), shown on real processes against the
# real host: __kvm_handle_async_pf panics on a not-present in kernel mode, and kvm_guest_cpu_offline(false) wakes
# every sleeper itself (apf_task_wake_all) before the host's wake-all of the re-enable can come.
from __future__ import annotations

from apf_emu.checker import check_events
from apf_emu.logs import read_merged

from .helpers import GuestProcess, HostProcess, read_events, wait_for_events


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
