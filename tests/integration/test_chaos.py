# The chaos harness in the suite: a fixed seed, about a minute, at least 10 guest kills, 2 host kills and 5 pauses
# (plus panics into kdump kernels). It must end with zero violations and nothing left behind.
from __future__ import annotations

import os
import subprocess
import sys

import orjson

from apf_emu.chaos import ChaosOptions, make_schedule
from shared.config import HostOptions

from .helpers import ROOT
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
