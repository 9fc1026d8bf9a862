# `apf-emu run` leaves nothing behind: no shm segment, no socket, no process, after --duration and after SIGINT.
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shared.guest_ram import shm_name
from tests.conftest import processes_mentioning

from .helpers import ROOT, read_events, wait_until


def start_run(tmp_path: Path, vm: str, *args: str) -> subprocess.Popen[bytes]:
    run_tmp = tmp_path / "tmp"
    run_tmp.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "apf_emu", "run", "--vm", vm, "--log-dir", str(tmp_path / "logs"), "--json", *args],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "TMPDIR": str(run_tmp)},
    )


def assert_nothing_left(tmp_path: Path, vm: str) -> None:
    assert not os.path.exists(f"/dev/shm{shm_name(vm)}")
    assert list((tmp_path / "tmp").iterdir()) == [], "the run's socket directory is left"
    assert processes_mentioning(vm) == []


def test_a_full_run_leaves_nothing_behind(tmp_path, vm_id):
    proc = start_run(tmp_path, vm_id, "--vcpus", "4", "--duration", "10")
    out, _ = proc.communicate(timeout=120)
    summary = orjson.loads(out)
    assert proc.returncode == 0, summary["violations"][:3]
    assert summary["stopped_by"] == "duration"
    assert summary["leftovers"] == [] and summary["unexpected_exits"] == []
    assert len(summary["exit_codes"]) == 5
    assert summary["stats"]["apfs"] > 1000
    assert_nothing_left(tmp_path, vm_id)


@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_sigint_stops_a_run_cleanly(tmp_path, vm_id, transport):
    proc = start_run(tmp_path, vm_id, "--vcpus", "4", "--duration", "120", "--transport", transport)
    host_log = tmp_path / "logs" / "host.jsonl"
    wait_until(lambda: any(e["event"] == "kvm_async_pf_ready" for e in read_events(host_log)), 30,
               "APF traffic")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    summary = orjson.loads(out)
    assert summary["stopped_by"] == "SIGINT"
    assert proc.returncode == 0, (summary["violations"][:3], summary["unexpected_exits"], summary["exit_codes"])
    assert summary["leftovers"] == []
    assert set(summary["exit_codes"].values()) == {0}
    assert_nothing_left(tmp_path, vm_id)


PHASES = {
    "importing": lambda logs: True,  # at once: Python is still importing the tools
    "starting": lambda logs: (logs / "harness.jsonl").exists(),  # the run has begun; its processes start
    "working": lambda logs: any(e["event"] == "kvm_async_pf_ready" for e in read_events(logs / "host.jsonl")),
}


@pytest.mark.parametrize("phase,again", [("importing", False), ("starting", False), ("working", False),
                                         ("working", True)])
def test_sigint_at_any_moment_of_a_run_is_a_clean_stop(tmp_path, vm_id, phase, again):
    """Ctrl-C while Python still imports, while the processes start, or while they work, and a second Ctrl-C right
    after the first: no traceback, nothing left behind, and the documented status (130 when nothing could be judged
    yet, else the verdict: 0)."""
    run_tmp = tmp_path / "tmp"
    run_tmp.mkdir()
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "apf_emu", "run", "--vm", vm_id, "--log-dir", str(logs),
                             "--duration", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(run_tmp)})
    wait_until(lambda: PHASES[phase](logs), 30, f"the run {phase}")
    proc.send_signal(signal.SIGINT)
    if again:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err + out, err.decode()
    # 130, or death by the SIGINT itself, which a shell shows as 130 too: the interpreter is not yet (or no longer)
    # there to handle it, at its very start or its very end
    assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, err)
    if phase == "working" and not again:
        assert proc.returncode == 0 and b"stopped by SIGINT" in out and b"invariants: all" in out
    assert_nothing_left(tmp_path, vm_id)


@pytest.mark.parametrize("victim", ["guest_agent", "host_daemon"])
def test_a_process_killed_under_run_fails_the_run_and_says_so(tmp_path, vm_id, victim):
    """`run` restarts nothing (chaos does): a guest or the host killed under it ends the run with status 3 and the
    cause in words; the sleepers of the killed boot (or of guests that lost their host) are not judged as lost
    wakeups, and the checker finds nothing else wrong."""
    proc = start_run(tmp_path, vm_id, "--vcpus", "2", "--duration", "60")
    host_log = tmp_path / "logs" / "host.jsonl"
    wait_until(lambda: any(e["event"] == "kvm_async_pf_ready" for e in read_events(host_log)), 30, "APF traffic")
    (pid,) = [p for p in processes_mentioning(vm_id) if victim.encode() in Path(f"/proc/{p}/cmdline").read_bytes()
              and (victim == "host_daemon" or b"--vcpu\x001" in Path(f"/proc/{p}/cmdline").read_bytes())]
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=90)
    summary = orjson.loads(out)
    assert proc.returncode == 3
    name = "host" if victim == "host_daemon" else "guest-1"
    assert f"{name} ended before the run did: killed by SIGKILL" in summary["unexpected_exits"]
    assert summary["violations"] == []
    assert not [x for x in summary["leftovers"] if x.startswith("process")]
    assert processes_mentioning(vm_id) == []
