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


@pytest.mark.parametrize("host_abi,guest_abi", [("ve", "int"), ("int", "ve")])
def test_a_guest_of_another_design_falls_back_to_what_the_host_offers(tmp_path, vm_id, host_abi, guest_abi):
    """An `int` guest on a `ve` host never places a #VE area; a `ve` guest on an `int` host does not see the
    feature bit: both take not-presents as #PF."""
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS, "--abi", host_abi)
    try:
        guest = GuestProcess(host, 0, "--abi", guest_abi)
        wait_for_events(guest.log, "guest_apf_wait", 50)
        assert guest.stop() == 0
    finally:
        assert host.stop() == 0
    events = list(read_merged([str(tmp_path)]))
    assert check_events(events) == []
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


def test_int_error_reports_a_failed_page_in_to_the_sleeping_task_as_sigbus(tmp_path):
    """Vivek Goyal's RFC end to end: the page-ready of a failed page-in carries PAGE_ERROR in ready_flags; the
    woken task gets SIGBUS and dies; nothing loops and nothing exits to the VMM."""
    rc, summary, events = run_json(tmp_path, "--abi", "int-error", *ERROR_ARGS)
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
