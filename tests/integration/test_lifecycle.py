# Every lifecycle path on real processes: guest panic into a kdump kernel, guest SIGKILL, clean reboot, host SIGKILL
# with --recover, and pauses. Each is judged from the logs by the checker: no not-present or page-ready of an
# earlier boot reaches a later one (stale_token), every task alive at the end was woken (wait_woken), every data
# check passed, and every other invariant.
from __future__ import annotations

import signal

import pytest

from apf_emu.api import VM
from apf_emu.checker import check_events
from apf_emu.logs import read_merged
from shared.abi import KVM_APF_WAKE_ALL_TOKEN
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import GuestRam, RamLayout
from shared.wire import Welcome

from .helpers import (
    GuestProcess,
    HostProcess,
    WireClient,
    count_events,
    end_run,
    read_events,
    reconnect_and_go_on,
    wait_for_events,
    wait_until,
)

HOST_ARGS = ("--vcpus", "2", "--pages", "256", "--resident", "64", "--page-in-latency", "exp:2ms")  # a working set > R


def checked(host: HostProcess, **options) -> list[dict]:
    return checked_logs(host.log_dir, **options)


def checked_logs(log_dir, **options) -> list[dict]:
    events = list(read_merged([str(log_dir)]))
    violations = check_events(events, **options)
    assert violations == [], [(v.invariant, v.message) for v in violations[:5]]
    shutdowns = [e for e in events if e["event"] == "guest_shutdown"]
    assert shutdowns and all(e["data_check_failures"] == 0 and e["sleepers"] == 0 for e in shutdowns)
    return events


def end(host: HostProcess, guests: list[GuestProcess]) -> None:
    """Whatever a test left running or stopped: guests killed, the host continued and stopped cleanly."""
    for g in guests:
        if g.proc.poll() is None:
            g.proc.send_signal(signal.SIGCONT)
            g.proc.kill()
    host.proc.send_signal(signal.SIGCONT)
    assert host.stop() == 0


def outstanding(events: list[dict], vcpu: int = 0) -> set[int]:
    """Tokens of not-present events whose page-ready has not been delivered (yet)."""
    injected = {e["token"] for e in events if e["event"] == "kvm_async_pf_not_present" and e["vcpu"] == vcpu}
    return injected - {e["token"] for e in events if e["event"] == "kvm_async_pf_ready" and e["vcpu"] == vcpu}


def tokens_of(events: list[dict], boot: int, vcpu: int = 0) -> set[int]:
    """The tokens of the not-present #PFs injected into a boot (a guest without APF still halts on its faults:
    those are traced with injected=false)."""
    return {e["token"] for e in events if e["event"] == "kvm_async_pf_not_present" and e["boot"] == boot
            and e["vcpu"] == vcpu and e["injected"]}


@pytest.mark.parametrize("kdump_apf", [False, True])
def test_panic_disables_apf_and_comes_back_as_kdump(tmp_path, vm_id, kdump_apf):
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS)
    try:
        g1 = GuestProcess(host, 0)
        wait_for_events(g1.log, "guest_apf_wait", 50)
        g1.signal(signal.SIGUSR1)
        assert g1.wait() == 70
        wait_for_events(host.log_dir / "host.jsonl", "vcpu_disconnect")
        g2 = GuestProcess(host, 0, *([] if kdump_apf else ["--kdump-no-kvmapf"]), boot=2, kind="kdump")
        wait_for_events(g2.log, "guest_boot", kind="kdump", boot=2)
        if kdump_apf:
            wait_for_events(g2.log, "guest_apf_wait", 20, boot=2)
        else:
            wait_for_events(g2.log, "guest_data_check", 20, boot=2)
        assert g2.stop() == 0
    finally:
        assert host.stop() == 0
    events = checked(host)
    crash = next(e for e in events if e["event"] == "guest_crash")
    # the crash path disabled APF itself, right away, without waiting
    disable = next(e for e in events if e["event"] == "msr_write" and e["value"] == 0 and e["boot"] == 1)
    assert crash["mono_ns"] < disable["mono_ns"]
    assert not [e for e in events if e["event"] == "guest_shutdown" and e["boot"] == 1]
    assert bool(tokens_of(events, 2)) == kdump_apf
    assert not tokens_of(events, 1) & tokens_of(events, 2)


def test_sigkill_is_a_vcpu_reset_and_the_restart_a_new_boot(tmp_path):
    # Page-ins of random length (a fixed one would finish the tasks' faults together, leaving moments with none in
    # flight) and several in flight at the kill: it is then all but certain that some are still queued at the reset.
    with VM(vcpus=2, pages=256, resident=64, page_in_latency="exp:100ms", tasks=16, log_dir=tmp_path) as vm:
        vm.wait_for("guest_apf_wait", 20, vcpu=0)
        wait_until(lambda: len(outstanding([e.as_dict() for e in vm.events()])) >= 4, 10, "APFs in flight")
        vm.vcpus[0].kill()
        vm.wait_for("vcpu_disconnect", vcpu=0)
        vm.vcpus[0].restart()
        vm.wait_for("guest_apf_wait", 50, vcpu=0, boot=2)
    assert vm.problems == [] and vm.leftovers == []
    events = checked_logs(vm.log_dir)
    dropped = [e for e in events if e["event"] == "apf_ready_dropped" and e["vcpu"] == 0 and e["boot"] == 1]
    assert dropped and {e["reason"] for e in dropped} == {"vcpu_reset"}  # (boot 2 ends with a clean disable)
    assert not tokens_of(events, 1) & tokens_of(events, 2)
    woken_in_2 = {e["token"] for e in events if e["event"] == "guest_apf_wake" and e["boot"] == 2 and not e["all"]
                  and e["vcpu"] == 0}
    assert woken_in_2 and not woken_in_2 & tokens_of(events, 1)


def test_clean_reboot_disables_apf_and_boots_a_normal_kernel(tmp_path):
    with VM(vcpus=2, pages=256, resident=64, page_in_latency="exp:2ms", transport="signal", log_dir=tmp_path) as vm:
        vm.wait_for("guest_apf_wait", 50, vcpu=1)
        vm.vcpus[1].reboot()  # SIGUSR2: exit 71, or ApiError
        vm.vcpus[1].restart()
        vm.wait_for("guest_apf_wait", 50, vcpu=1, boot=2)
    assert vm.problems == [] and vm.leftovers == []
    events = checked_logs(vm.log_dir)
    assert [e["kind"] for e in events if e["event"] == "guest_boot" and e["vcpu"] == 1] == ["normal", "normal"]
    assert len(vm.events("guest_reboot", vcpu=1)) == 1
    assert not tokens_of(events, 1, vcpu=1) & tokens_of(events, 2, vcpu=1)


@pytest.mark.parametrize("transport,restart", [("socket", "--recover"), ("signal", "--recover"),
                                               ("socket", "--recover-if-present")])
def test_host_sigkill_and_recover_loses_nothing(tmp_path, vm_id, transport, restart):
    """`--recover-if-present` is how a supervisor restarts the host (compose's restart policy): the same command
    each time, a new VM the first time, the recovery after the kill."""
    first = ("--recover-if-present",) if restart == "--recover-if-present" else ()
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS, *first)
    guests = [GuestProcess(host, v, "--transport", transport) for v in (0, 1)]
    try:
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait", 100)
        host.proc.kill()
        host.proc.wait()
        assert host.shm_exists()  # guest RAM outlives the host
        host = HostProcess(tmp_path, vm_id, *HOST_ARGS, restart)
        reconnect_and_go_on(guests, 100)
        for g in guests:
            assert g.stop() == 0
    finally:
        end_run(guests, host)
    assert not host.shm_exists()
    events = checked(host)
    host_events = read_events(host.log_dir / "host.jsonl")
    ready = [e for e in host_events if e["event"] == "host_ready"]
    assert [e["recovered"] for e in ready] == [False, True]
    assert ready[1]["awaiting"] == [0, 1]  # both guests were attached when the host died
    window = [e["awaiting"] for e in host_events if e["event"] == "memory_recovery_window"]
    assert window == [[0, 1], []]  # and both came back
    assert count_events(host.log_dir / "host.jsonl", "vcpu_restore") == 2
    assert [e["restored"] for e in events if e["event"] == "vcpu_connect"].count(True) == 2
    # the pages that were swapped out before the kill came back with the contents the guests had written: every
    # verification after the restart passed (checked() above), and there were many
    restart = ready[1]["mono_ns"]
    assert sum(1 for e in events if e["event"] == "guest_data_check" and e["mono_ns"] > restart) > 50


def test_a_guest_stopped_across_a_host_restart_loses_nothing(tmp_path, vm_id):
    """vCPU 0's guest is SIGSTOPped (perhaps inside an access) while the host is killed and restarted. Until it is
    back it still reads the dead host's EPT, so the new host must evict nothing meanwhile; vCPU 1 goes on (its
    page-ins go above the resident limit), and when vCPU 0 continues it reconnects and finds its data intact."""
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS)
    guests = [GuestProcess(host, v, "--shared-ratio", "0.3") for v in (0, 1)]
    try:
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait", 50)
        guests[0].signal(signal.SIGSTOP)
        host.proc.kill()
        host.proc.wait()
        host = HostProcess(tmp_path, vm_id, *HOST_ARGS, "--recover")
        wait_for_events(guests[1].log, "guest_reconnect")
        # vCPU 1 works while vCPU 0 is away; nothing is evicted, so it soon has all its pages and stops faulting
        new_pid = host.proc.pid  # host.jsonl holds the killed host's lines too
        wait_until(lambda: any(e["event"] == "kvm_async_pf_ready" and e["vcpu"] == 1 and e["token"] != 0xFFFFFFFF
                               and e["pid"] == new_pid for e in host.events()), 10,
                   "a page-in for vCPU 1 by the new host")
        window = [e["awaiting"] for e in host.events() if e["event"] == "memory_recovery_window"]
        assert window == [[0, 1]], window  # still open: vCPU 0 is not back
        guests[0].signal(signal.SIGCONT)
        wait_for_events(guests[0].log, "guest_reconnect")
        n = [count_events(g.log, "guest_apf_wait") for g in guests]
        for g, k in zip(guests, n, strict=False):  # evictions again: both fault again
            wait_for_events(g.log, "guest_apf_wait", k + 100)
        for g in guests:
            assert g.stop() == 0
    finally:
        end(host, guests)
    checked(host)
    host_events = read_events(host.log_dir / "host.jsonl")
    assert [e["awaiting"] for e in host_events if e["event"] == "memory_recovery_window"] == [[0, 1], []]
    stop = [e for e in host_events if e["event"] == "host_stop"][-1]
    assert stop["overcommits"] > 0 and stop["evictions"] > 0  # above the limit while waiting; evicting after


def test_pauses_hold_queues_deliver_nothing_twice_lose_nothing(tmp_path, vm_id):
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS)
    guests = [GuestProcess(host, v) for v in (0, 1)]
    try:
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait", 50)
        guests[0].signal(signal.SIGSTOP)
        n = count_events(guests[1].log, "guest_apf_wait")
        wait_for_events(guests[1].log, "guest_apf_wait", n + 200)  # the other vCPU goes on meanwhile
        guests[0].signal(signal.SIGCONT)
        host.proc.send_signal(signal.SIGSTOP)
        n = [count_events(g.log, "guest_apf_wait") for g in guests]
        host.proc.send_signal(signal.SIGCONT)
        for g, k in zip(guests, n, strict=False):
            wait_for_events(g.log, "guest_apf_wait", k + 100)
        for g in guests:
            assert g.stop() == 0
    finally:
        end(host, guests)
    checked(host, ready_latency_limit_ms=60_000)


def test_a_restored_vcpus_first_entry_comes_before_welcome(tmp_path, vm_id):
    """A returning boot after a host restart: the new host restores the registers (the enabling write queues a
    wake-all, kvm_pv_enable_async_pf) and makes the vCPU's first entry before it sends `welcome`, so the wake-all is
    in the slot and its interrupt frame comes first, pending before the guest runs anything (docs/PROTOCOL.md,
    section 8). Sent after welcome, it could reach the guest after its retried access had been injected a new
    not-present, which the wake-all would then wake too early."""
    host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", "64", "--resident", "16")
    c = WireClient(host.socket)
    try:
        assert isinstance(c.hello(vm_id, vcpu=0, boot=1), Welcome)
        ram = GuestRam.open(vm_id, RamLayout(64))
        area = KvmVcpuPvApfData(ram.u32, 0)
        c.enable_apf(area)  # the first wake-all is taken: the slot is free again
        host.proc.kill()
        host.proc.wait()
        c.close()
        host = HostProcess(tmp_path, vm_id, "--vcpus", "1", "--pages", "64", "--resident", "16", "--recover")
        c = WireClient(host.socket)
        assert isinstance(c.hello(vm_id, vcpu=0, boot=1), Welcome)
        assert c.interrupts == 1 and area.token == KVM_APF_WAKE_ALL_TOKEN  # before welcome
        area.release()
        ram.close()
    finally:
        c.close()
        assert host.stop() == 0
    connect = [e for e in host.events() if e["event"] == "vcpu_connect"][-1]
    ready = [e for e in host.events() if e["event"] == "kvm_async_pf_ready"][-1]
    assert connect["restored"] and ready["token"] == KVM_APF_WAKE_ALL_TOKEN and ready["injected"]
