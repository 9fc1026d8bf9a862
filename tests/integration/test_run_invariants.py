# Every invariant the checker knows, checked over the logs of real multi-process `apf-emu run`s, in three
# configurations, each on both transports (socket frames and real-time signals). Each test also asserts that its
# invariant was actually exercised (the events it reads are there),
# so a run that did nothing cannot pass.
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from apf_emu.checker import INVARIANTS

from .helpers import ROOT

CONFIGS = {
    "default": ["--vcpus", "3", "--duration", "4"],
    # many kernel-mode accesses: KVM's artificial halt (kvm_can_deliver_async_pf says no at CPL 0)
    "halt_uniform": ["--vcpus", "2", "--duration", "3", "--tasks", "3", "--kernel-ratio", "0.4",
                     "--page-in-latency", "uniform:0.1ms:3ms", "--pages", "256", "--resident", "96"],
    "deep_queue": ["--vcpus", "1", "--duration", "3", "--tasks", "90", "--pages", "1024", "--resident", "128",
                   "--page-in-latency", "fixed:100ms", "--kernel-ratio", "0", "--irq-off-ratio", "0"],
}

# invariant -> events that must occur for the invariant to have been exercised
EVIDENCE = {
    "token_format": ["kvm_async_pf_not_present"],
    "token_unique": ["kvm_async_pf_not_present"],
    "ready_after_not_present": ["kvm_async_pf_ready"],
    "ready_once": ["kvm_async_pf_ready"],
    "one_unacked_ready": ["kvm_async_pf_ready", "guest_apf_ack"],
    "delivered_while_disabled": ["msr_write", "kvm_async_pf_not_present"],
    "outstanding_limit": ["kvm_async_pf_not_present"],
    "wake_matches_ready": ["guest_apf_wake", "guest_apf_wake_all"],
    "wait_woken": ["guest_apf_wait", "guest_shutdown"],
    "dummy_leak": ["guest_shutdown"],
    "data_check": ["guest_data_check"],
    "guest_panic": ["guest_boot"],
    "ready_latency": ["kvm_async_pf_completed", "kvm_async_pf_ready"],
    "stale_token": ["guest_boot", "kvm_async_pf_ready"],
    "ready_for_injected_only": ["kvm_async_pf_ready"],  # and halts, in every config but deep_queue (below)
    "retry_loop": ["kvm_async_pf_not_present", "guest_data_check"],
    "wait_matches_not_present": ["guest_apf_wait", "kvm_async_pf_not_present"],
    "apf_as_genuine": ["guest_pf_nested"],  # the nested genuine #PFs of the entry, harmless on `int`
    "double_fault": ["kvm_async_pf_ready"],
    "halt_spin": ["guest_shutdown"],  # and HLT exits, counted in it (below)
    "repeated_fault_outstanding": ["kvm_async_pf_not_present"],  # and repeated faults where a vCPU halts (below)
    "completed_before_ready": ["kvm_async_pf_completed", "kvm_async_pf_ready"],
    "msr_order": ["msr_write"],
}


@pytest.fixture(scope="module", params=[(c, t) for c in sorted(CONFIGS) for t in ("socket", "signal")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, tmp_path_factory):
    config, transport = request.param
    log_dir: Path = tmp_path_factory.mktemp(f"{config}-{transport}")
    proc = subprocess.run(
        [sys.executable, "-m", "apf_emu", "run", "--json", "--log-dir", str(log_dir), "--transport", transport,
         *CONFIGS[config]],
        cwd=ROOT, capture_output=True, timeout=120,
    )
    assert proc.stdout, proc.stderr.decode()
    summary = orjson.loads(proc.stdout)
    return config, proc.returncode, summary


def test_every_invariant_has_evidence_listed():
    assert EVIDENCE.keys() == INVARIANTS.keys()


def test_run_exits_cleanly(run):
    _name, rc, summary = run
    assert rc == 0, summary["violations"][:3] or summary["unexpected_exits"]
    assert summary["exit_codes"] and set(summary["exit_codes"].values()) == {0}
    assert summary["leftovers"] == []


@pytest.mark.parametrize("invariant", sorted(INVARIANTS))
def test_invariant_holds_in_a_real_run(run, invariant):
    name_, _rc, summary = run
    events = Counter(summary["stats"]["events"])
    for name in EVIDENCE[invariant]:
        assert events[name] > 0, f"{invariant} was not exercised: no {name}"
    if invariant == "halt_spin" and name_ != "deep_queue":  # 90 tasks on one vCPU: always one to run, never idle
        shutdowns = [e for f in Path(summary["log_dir"]).glob("guest-*.jsonl")
                     for e in map(orjson.loads, f.read_bytes().splitlines()) if e["event"] == "guest_shutdown"]
        assert sum(e.get("hlt_exits", 0) for e in shutdowns) > 0, "halt_spin was not exercised: no HLT exit"
    if invariant == "repeated_fault_outstanding" and name_ == "halt_uniform":  # kernel-mode halts fault again
        assert events["kvm_async_pf_repeated_fault"] > 0, "repeated_fault_outstanding was not exercised"
    broken = [v for v in summary["violations"] if v["invariant"] == invariant]
    assert broken == [], broken[:3]


def test_runs_do_real_work(run):
    name, _rc, summary = run
    stats = summary["stats"]
    assert stats["apfs"] > 100
    halts = stats["halt_reasons"]
    assert stats["data_checks"] > 300 and stats["data_check_failures"] == 0
    assert stats["events"]["guest_apf_wait"] == stats["events"]["guest_apf_wake"]  # wake-all logs each task too
    # every vCPU kept going for the whole run (a lost wakeup leaves one halted with runnable tasks)
    waits = {k: v.get("guest_apf_wait", 0) for k, v in stats["per_vcpu"].items() if "guest_boot" in v}
    assert waits and min(waits.values()) > 100, waits
    if name == "deep_queue":
        # 90 tasks on one vCPU with 100 ms page-ins: their first faults alone fill the 64-deep queue
        assert stats["sync_reasons"].get("queue_full", 0) > 0
        assert "irq_disabled" not in stats["sync_reasons"]
    else:
        # kvm_can_do_async_pf: interrupts off is the only synchronous fault; kernel mode halts (interruptibly)
        assert set(stats["sync_reasons"]) <= {"irq_disabled", "queue_full"}
        assert stats["sync_reasons"].get("irq_disabled", 0) > 0
        assert halts.get("kernel_mode", 0) > 0
