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

from .helpers import ROOT, read_events, wait_until


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


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
