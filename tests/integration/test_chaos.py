# The chaos harness in the suite: a fixed seed, about a minute, at least 10 guest kills, 2 host kills and 5 pauses
# (plus panics into kdump kernels). It must end with zero violations and nothing left behind.
from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest

from apf_emu.chaos import ChaosOptions, make_schedule
from apf_emu.logs import read_merged
from shared.config import HostOptions

from .helpers import ROOT, read_events, wait_until
from .test_cleanup import processes_mentioning


def test_same_seed_same_schedule():
    opts = ChaosOptions(host=HostOptions(vcpus=3), duration=45)
    a, b = make_schedule(1, 45, 3, opts), make_schedule(1, 45, 3, opts)
    assert a == b and a != make_schedule(2, 45, 3, opts)
    kinds = [f.kind for f in a]
    assert kinds.count("guest_kill") == 10 and kinds.count("host_kill") == 2
    assert kinds.count("guest_pause") + kinds.count("host_pause") == 5


def test_chaos_run_ends_clean(tmp_path, vm_id):
    proc = subprocess.run(
        [sys.executable, "-m", "apf_emu", "chaos", "--json", "--seed", "1", "--duration", "45", "--vcpus", "3",
         "--vm", vm_id, "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, timeout=300,
    )
    summary = orjson.loads(proc.stdout)
    print({k: summary[k] for k in ("faults_applied", "faults_skipped", "boots", "completions_eaten",
                                   "tasks_retried_after_wake_all", "reconnects", "torn_pages")})
    assert summary["violations"] == [], summary["violations"][:2]
    assert summary["problems"] == [] and summary["leftovers"] == []
    assert proc.returncode == 0
    applied = summary["faults_applied"]
    assert applied.get("guest_kill", 0) >= 10 and applied.get("host_kill", 0) >= 2
    assert applied.get("guest_pause", 0) + applied.get("host_pause", 0) >= 5
    assert summary["host_starts"] == 1 + applied["host_kill"]
    assert "kdump" in {k for kinds in summary["boots"].values() for k in kinds}
    assert summary["data_check_failures"] == 0 and summary["data_checks"] > 10_000
    assert summary["reconnects"] > 0
    assert not os.path.exists(f"/dev/shm/apf-emu-{vm_id}-ram") and not os.path.exists(f"/dev/shm/apf-emu-{vm_id}-swap")
    assert processes_mentioning(vm_id) == []
    # The same logs through `apf-emu check`: the same verdict, with the latency limit the run recorded (its longest
    # pause plus slack, above the default 1 s), which the check says it used.
    limit = summary["ready_latency_limit_ms"]
    assert limit > 1000
    check = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-2000:]
    assert f"ready-latency limit {limit:g} ms, recorded by apf-emu chaos" in check.stdout


@pytest.mark.parametrize("phase", ["starting", "working"])
def test_sigint_stops_chaos_early_and_judges_what_ran(tmp_path, vm_id, phase):
    """Ctrl-C while chaos starts its processes or in the middle of its schedule: the schedule stops, everything is
    stopped and checked, the summary lists only the faults that were injected, and the status is the verdict's (0),
    as for `run`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apf_emu", "chaos", "--json", "--seed", "3", "--duration", "120", "--vcpus", "2",
         "--vm", vm_id, "--log-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if phase == "starting":
        wait_until(lambda: (tmp_path / "harness.jsonl").exists(), 60, "chaos started")
    else:
        wait_until(lambda: sum(e["event"] == "guest_apf_wait" for e in read_events(tmp_path / "guest-0.jsonl"))
                   > 200, 60, "guest 0 at work")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    summary = orjson.loads(out)
    assert b"Traceback" not in err
    # 130 if the stop came before any guest had logged a protocol event, else the verdict
    assert proc.returncode in ((0,) if phase == "working" else (0, 130)), (summary["violations"][:2],
                                                                          summary["problems"])
    assert summary["stopped_by"] == "SIGINT" and summary["problems"] == []
    assert phase == "starting" or summary["leftovers"] == []  # a host stopped while starting cannot clean up
    assert len(summary["injected"]) < len(summary["schedule"])
    assert processes_mentioning(vm_id) == []


@pytest.mark.parametrize("abi", ["pf", "ve", "int-error"])
@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_chaos_on_every_abi(tmp_path, vm_id, abi, transport):
    """A short chaos run per ABI (shared/abis.py) on both transports: kills, a panic into kdump, a host kill with
    --recover, pauses; every invariant the ABI promises holds (`pf` without its nested #PFs, whose race the checker
    flags by design: tests/integration/test_abis.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "apf_emu", "chaos", "--json", "--seed", "2", "--duration", "10", "--vcpus", "2",
         "--abi", abi, "--transport", transport, "--entry-fault-ratio", "0", "--guest-kills", "3",
         "--guest-panics", "1", "--host-kills", "1", "--pauses", "2", "--vm", vm_id, "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, timeout=300,
    )
    summary = orjson.loads(proc.stdout)
    assert summary["violations"] == [], summary["violations"][:2]
    assert summary["problems"] == [] and summary["leftovers"] == [] and proc.returncode == 0
    applied = summary["faults_applied"]
    assert applied.get("guest_kill", 0) >= 3 and applied.get("host_kill", 0) >= 1
    assert summary["data_check_failures"] == 0 and summary["data_checks"] > 1000
    events = list(read_merged([str(tmp_path)]))
    assert {e["abi"] for e in events if e["event"] in ("host_ready", "guest_boot")} == {abi}
    assert sum(e["event"] == "guest_apf_wake" for e in events) > 100
