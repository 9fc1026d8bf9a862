# The ABIs of shared/abis.py on real processes: each runs end to end with every invariant holding, and a guest of
# one design on a host of another falls back as a real guest would (it sees the host's CPUID).
from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from apf_emu.checker import check_events
from apf_emu.logs import read_merged

from .helpers import ROOT, GuestProcess, HostProcess, wait_for_events

HOST_ARGS = ("--vcpus", "1", "--pages", "256", "--resident", "64", "--page-in-latency", "exp:2ms")


@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_ve_runs_with_every_invariant(tmp_path, transport):
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "run", "--abi", "ve", "--vcpus", "2", "--duration", "3",
                           "--transport", transport, "--json", "--log-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, timeout=120)
    summary = orjson.loads(proc.stdout)
    assert proc.returncode == 0, summary["violations"][:3]
    events = list(read_merged([str(tmp_path)]))
    injected = [e for e in events if e["event"] == "kvm_async_pf_not_present" and e["injected"]]
    assert len(injected) > 100 and all(e.get("vector") == 20 for e in injected)  # every not-present a #VE
    assert sum(e["event"] == "guest_apf_wait" for e in events) > 100
    assert {e["abi"] for e in events if e["event"] in ("host_ready", "guest_boot")} == {"ve"}


def run_pair(tmp_path, vm_id: str, host_abi: str, guest_abi: str, event: str) -> list[dict]:
    """A host of one ABI and a guest of another, until the guest logged `event` 50 times; the logs, checked clean."""
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS, "--abi", host_abi)
    try:
        guest = GuestProcess(host, 0, "--abi", guest_abi)
        wait_for_events(guest.log, event, 50)
        assert guest.stop() == 0
    finally:
        assert host.stop() == 0
    events = list(read_merged([str(tmp_path)]))
    assert check_events(events) == []
    return events


@pytest.mark.parametrize("host_abi,guest_abi", [("ve", "int"), ("int", "ve")])
def test_a_guest_of_another_design_falls_back_to_what_the_host_offers(tmp_path, vm_id, host_abi, guest_abi):
    """An `int` guest on a `ve` host never places a #VE area; a `ve` guest on an `int` host does not see the
    feature bit: both take not-presents as #PF."""
    events = run_pair(tmp_path, vm_id, host_abi, guest_abi, "guest_apf_wait")
    injected = [e for e in events if e["event"] == "kvm_async_pf_not_present" and e["injected"]]
    assert injected and not [e for e in injected if "vector" in e]  # #PF, the `int` way
    assert not [e for e in events if e["event"] == "msr_write" and e["msr"] == "MSR_APF_EMU_VE_INFO" and e["ok"]]


HOST_ERROR_ARGS = ["--vcpus", "1", "--pages", "256", "--resident", "64", "--page-in-errors", "gfns:100-107"]
GUEST_ERROR_ARGS = ["--tasks", "4", "--kernel-ratio", "0", "--irq-off-ratio", "0", "--shared-ratio", "0"]
ERROR_ARGS = HOST_ERROR_ARGS + GUEST_ERROR_ARGS


def run_json(tmp_path, *args: str) -> tuple[int, dict, list[dict]]:
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "run", "--duration", "4", "--json", "--log-dir",
                           str(tmp_path), *args], cwd=ROOT, capture_output=True, timeout=120)
    return proc.returncode, orjson.loads(proc.stdout), list(read_merged([str(tmp_path)]))


@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_int_error_reports_a_failed_page_in_to_the_sleeping_task_as_sigbus(tmp_path, transport):
    """Vivek Goyal's RFC end to end: the page-ready of a failed page-in carries PAGE_ERROR in ready_flags; the
    woken task gets SIGBUS and dies; nothing loops and nothing exits to the VMM."""
    rc, summary, events = run_json(tmp_path, "--abi", "int-error", "--transport", transport, *ERROR_ARGS)
    assert rc == 0, summary["violations"][:3]
    reported = {e["token"] for e in events if e["event"] == "kvm_async_pf_ready" and e.get("error_reported")}
    sigbus = [e for e in events if e["event"] == "guest_sigbus"]
    assert reported and sigbus and {e["token"] for e in sigbus} <= reported
    assert all(100 <= e["gfn"] <= 107 for e in sigbus)
    assert not [e for e in events if e["event"] == "apf_error_exit"]


def test_int_error_without_send_error_exits_to_the_vmm_instead_of_looping(tmp_path, vm_id):
    """A guest that did not ask for errors (an `int` guest on an `int-error` host): the failed gfn becomes
    `error_gfn`, its next fault is synchronous, fails, and exits to the VMM (`apf_error_exit`), which reports a
    memory failure: the task gets SIGBUS. No retry loop."""
    host = HostProcess(tmp_path, vm_id, "--abi", "int-error", *HOST_ERROR_ARGS)
    try:
        guest = GuestProcess(host, 0, "--abi", "int", *GUEST_ERROR_ARGS)
        wait_for_events(guest.log, "guest_sigbus")
        assert guest.stop() == 0
    finally:
        assert host.stop() == 0
    events = list(read_merged([str(tmp_path)]))
    assert check_events(events) == []
    exits = [e for e in events if e["event"] == "apf_error_exit"]
    assert exits and all(e["reason"] == "error_gfn" for e in exits)
    assert [e for e in events if e["event"] == "guest_sigbus" and "memory failure" in e["reason"]]


def test_on_int_a_page_in_that_keeps_failing_is_retried_for_ever_and_the_checker_says_so(tmp_path):
    """The behaviour Vivek Goyal reported: with no error path, the page-ready goes out, the guest retries, the
    page-in fails again, and so on; `retry_loop` flags it."""
    rc, summary, _events = run_json(tmp_path, "--abi", "int", *ERROR_ARGS)
    assert rc == 1 and {v["invariant"] for v in summary["violations"]} == {"retry_loop"}


# --- `pf`: the pre-5.8 ABI and the race of the seed thread ---------------------------------------------------------
RACE_ARGS = ("--vcpus", "2", "--seed", "7", "--entry-fault-ratio", "0.2")


def races_and_violations(events: list[dict], summary: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    races = [e for e in events if e["event"] == "guest_pf_race"]
    by_invariant: dict[str, list[dict]] = {}
    for v in summary["violations"]:
        by_invariant.setdefault(v["invariant"], []).append(v)
    return races, by_invariant


@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_pf_the_reason_race_happens_and_every_one_is_flagged(tmp_path, transport):
    """5.7's do_async_page_fault reads `reason` after the entry's work: a nested genuine #PF there (the entry
    touching vmalloc memory this CPU does not map) reads the APF's reason. Read 1: the nested fault sleeps on its own
    address, a token no not-present carried (wait_matches_not_present); read 2: it wakes that address, a dummy for
    a token no page-ready carried (wake_matches_ready); either way the APF #PF then reads 0 and is taken for an
    ordinary fault at CR2 = token (apf_as_genuine, unless the vCPU never gets that far)."""
    rc, summary, events = run_json(tmp_path, "--abi", "pf", "--transport", transport, *RACE_ARGS)
    races, flagged = races_and_violations(events, summary)
    assert rc == 1 and races, summary["violations"][:3]
    for race in races:
        invariant = {"genuine_as_not_present": "wait_matches_not_present",
                     "genuine_as_page_ready": "wake_matches_ready"}[race["kind"]]
        assert any(v["event"].get("token") == race["token"] and v["event"]["vcpu"] == race["vcpu"]
                   for v in flagged.get(invariant, [])), (race, flagged.keys())
    if any(race["kind"] == "genuine_as_page_ready" for race in races):  # (after a 1 the CPU halts for good)
        assert flagged.get("apf_as_genuine") or flagged.get("guest_panic")
    assert {e["abi"] for e in events if e["event"] in ("host_ready", "guest_boot")} == {"pf"}


@pytest.mark.parametrize("abi", ["int", "ve"])
@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_the_same_seeded_run_on_int_and_ve_is_clean(tmp_path, abi, transport):
    """The same workload and the same nested #PFs: 5.8+ reads CR2 and the flags before the entry's work, and #VE
    has its own information area: the nested #PF reads 0, nothing is misdirected."""
    rc, summary, events = run_json(tmp_path, "--abi", abi, "--transport", transport, *RACE_ARGS)
    assert rc == 0, summary["violations"][:3]
    nested = [e for e in events if e["event"] == "guest_pf_nested"]
    assert len(nested) > 20 and all(e["reason"] == 0 for e in nested)
    assert not [e for e in events if e["event"] == "guest_pf_race"]


def test_pf_without_nested_faults_is_clean_and_delivers_page_ready_as_pf(tmp_path):
    rc, summary, events = run_json(tmp_path, "--abi", "pf", "--entry-fault-ratio", "0", "--vcpus", "2")
    assert rc == 0, summary["violations"][:3]
    readies = [e for e in events if e["event"] == "kvm_async_pf_ready" and e["injected"]]
    assert len(readies) > 50 and {e["vector"] for e in readies} == {14}
    assert not [e for e in events if e["event"] in ("apf_cancel", "reason_overwritten", "kvm_multiple_exception")]
    assert sum(e["event"] == "guest_apf_wake" for e in events) > 50


def test_pf_without_the_historical_fixes_double_faults(tmp_path):
    """--no-cancel-pending (a host before 9a6e7c39810e, with no pending check either): a not-present and a
    page-ready #PF queued at one entry; kvm_multiple_exception makes it #DF and the guest panics."""
    rc, summary, events = run_json(tmp_path, "--abi", "pf", "--no-cancel-pending", "--entry-fault-ratio", "0",
                                   "--vcpus", "2", "--tasks", "8")
    _races, flagged = races_and_violations(events, summary)
    assert rc == 1 and flagged.get("double_fault"), summary["violations"][:3]
    panics = [e for e in events if e["event"] == "guest_panic"]
    assert panics and all(e["reason"] == "double fault" for e in panics)


@pytest.mark.parametrize("host_abi,guest_abi", [("pf", "int"), ("int", "pf")])
def test_pf_and_int_guests_fall_back_on_each_others_hosts(tmp_path, vm_id, host_abi, guest_abi):
    """A 5.8+ guest on a 5.7 host sees no KVM_FEATURE_ASYNC_PF_INT and leaves APF off; a 5.7 guest on a 5.8+ host
    enables without DELIVERY_AS_INT, which that host stores and ignores: every fault halts, nothing is lost."""
    events = run_pair(tmp_path, vm_id, host_abi, guest_abi, "guest_data_check")
    assert not [e for e in events if e["event"] == "kvm_async_pf_not_present" and e["injected"]]
    assert [e for e in events if e["event"] == "apf_halt"]
