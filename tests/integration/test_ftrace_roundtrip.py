# The round trip: a real run's logs exported as ftrace text (`apf-emu trace --format ftrace`) and read back by
# `apf-emu check` and `stats` give the host-side verdict and latency tables of the JSON logs themselves. The VMs are
# started with the Python API (apf_emu/api.py); one runs a historical bug so that the verdicts have something in them.
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from apf_emu.api import VM
from apf_emu.checker import JUDGED
from apf_emu.verdict import analyse

from .helpers import ROOT

HOST_LATENCIES = ("not_present_to_completed", "completed_to_ready", "ready_to_ack")
TRACEPOINT_EVENTS = ("kvm_async_pf_not_present", "kvm_async_pf_ready", "kvm_async_pf_completed",
                     "kvm_try_async_get_page", "kvm_async_pf_repeated_fault", "apf_ack")


def apf_emu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apf_emu", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("bugs,transport", [("", "socket"), ("token-zero", "signal")], ids=["clean", "token-zero"])
def test_export_reads_back_to_the_same_host_verdict_and_tables(tmp_path: Path, bugs: str, transport: str) -> None:
    logs = tmp_path / "logs"
    options = {"bugs": bugs} if bugs else {}
    with VM(vcpus=2, pages=128, resident=32, kernel_ratio=0.3, transport=transport, log_dir=logs, **options) as vm:
        vm.wait_for("kvm_async_pf_ready", n=400)
        vm.wait_for("kvm_async_pf_repeated_fault")  # kernel-mode halts fault again on their gfn
    trace = tmp_path / "run.txt"
    proc = apf_emu("trace", str(logs), "--format", "ftrace", "-o", str(trace))
    assert proc.returncode == 0, proc.stderr

    json_violations, json_stats, _r, _c = analyse([str(logs)])
    ft_violations, ft_stats, report, checker = analyse([str(trace)])
    assert checker.input == "export" and report.unreadable == []

    def verdict(violations: list) -> Counter[tuple[str, str]]:
        return Counter((v.invariant, v.message) for v in violations if v.invariant in JUDGED["export"])

    assert verdict(ft_violations) == verdict(json_violations)
    assert {v.invariant for v in ft_violations} <= JUDGED["export"]
    if bugs == "token-zero":  # alloc_apf_token before its fix: token 0 on vCPU 0
        assert verdict(ft_violations)["token_format", "not-present token 0x0 is not (id << 12) | 0"] > 0
    else:
        assert ft_violations == [] and json_violations == []
    for lat in HOST_LATENCIES:
        assert ft_stats.percentiles(lat) == json_stats.percentiles(lat), lat
        assert ft_stats.percentiles(lat)["count"] > 100, lat
    for name in TRACEPOINT_EVENTS:
        assert ft_stats.events[name] == json_stats.events[name], name

    # the commands say the same
    for cmd in ("check", "stats"):
        a, b = apf_emu(cmd, "--json", str(logs)), apf_emu(cmd, "--json", str(trace))
        if cmd == "stats":
            ja, jb = orjson.loads(a.stdout), orjson.loads(b.stdout)
            assert {k: ja["latency_us"][k] for k in HOST_LATENCIES} == {k: jb["latency_us"][k] for k in HOST_LATENCIES}
        else:
            assert (a.returncode == 1) == (b.returncode == 1) == bool(bugs), (a.stderr, b.stderr)


def test_the_round_trip_holds_across_guest_kills_and_a_host_restart(tmp_path: Path) -> None:
    """A killed guest's tokens die with its boot (kvm_clear_async_pf_completion_queue on the vCPU's reset) and a
    restarted host takes its vCPUs back: the export carries those resets, so that the read-back does not keep a dead
    boot's APFs outstanding (outstanding_limit) or judge a new boot's MSR writes against the old one's."""
    logs = tmp_path / "logs"
    # no irq-off tasks, room for the pages in: no synchronous page-in (as long as a page-in) holds a page-ready up
    with VM(vcpus=2, pages=96, resident=48, tasks=16, irq_off_ratio=0, page_in_latency="fixed:200ms",
            log_dir=logs) as vm:
        boot = 1
        while len(vm.events("apf_ready_dropped", vcpu=1)) <= 2 * 64 and boot < 20:
            # tasks asleep on APFs whose page-ins (200 ms) are not done: the kill leaves them all outstanding
            vm.wait_for("guest_apf_wait", n=12, vcpu=1, boot=boot)
            vm.vcpus[1].kill()
            vm.vcpus[1].restart()
            boot += 1
        vm.wait_for("kvm_async_pf_ready", n=20, vcpu=1, boot=boot)
        vm.host.kill()
        vm.host.restart()
        vm.wait_for("vcpu_connect", n=2, restored=True)
        vm.wait_for("kvm_async_pf_ready", n=20, vcpu=1, boot=boot, injected=True)
    trace = tmp_path / "run.txt"
    proc = apf_emu("trace", str(logs), "--format", "ftrace", "--no-markers", "-o", str(trace))
    assert proc.returncode == 0, proc.stderr
    json_violations, json_stats, _r, _c = analyse([str(logs)])
    ft_violations, ft_stats, report, checker = analyse([str(trace)])
    assert checker.input == "export" and report.unreadable == []
    assert json_violations == [], [(v.invariant, v.message) for v in json_violations][:5]
    assert ft_violations == [], [(v.invariant, v.message) for v in ft_violations][:5]
    # the kills left more APFs outstanding than a vCPU may have: without the resets the export would break the limit
    assert json_stats.events["apf_ready_dropped"] > 2 * 64
    for name in (*TRACEPOINT_EVENTS, "vcpu_connect", "vcpu_disconnect", "apf_ready_dropped"):
        assert ft_stats.events[name] == json_stats.events[name], name
    for lat in HOST_LATENCIES:
        assert ft_stats.percentiles(lat) == json_stats.percentiles(lat), lat
