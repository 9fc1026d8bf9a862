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
