"""apf_emu/shards.py: a check split by vCPU gives what one checker gives (violations and their order, counts, the
reader's notes), on a real run's logs damaged in many ways; lines whose vCPU the bytes cannot tell stop the split;
a file that goes back in time is read again, sorted."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from apf_emu import shards
from apf_emu.checker import Checker
from apf_emu.logs import ReadReport, plan, read_merged

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def four_vcpu_logs(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("four")
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "run", "--vcpus", "4", "--duration", "2", "--log-dir",
                           str(log_dir)], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    return log_dir


def damaged(src: Path, dst: Path, seed: int) -> Path:
    """A copy of `src` with lines dropped, repeated and garbled, and each file's last line cut: every kind of
    violation and note a reader can meet, spread over the vCPUs."""
    rng = random.Random(seed)
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.jsonl")):
        out: list[bytes] = []
        for line in f.read_bytes().splitlines(keepends=True):
            r = rng.random()
            if r < 0.01:
                continue  # lost: ready_after_not_present, wait_woken, wake_matches_ready ...
            out.append(line)
            if r > 0.99:
                out.append(line)  # twice: token_unique, ready_once ...
            elif 0.985 < r <= 0.99:
                out.append(b"not a log line\n")
        if len(out) > 1 and f.name != "harness.jsonl":
            out[-1] = out[-1][: len(out[-1]) // 2]  # cut by a kill
        f.write_bytes(b"".join(out))
    return dst


def reference(paths: list[str]) -> tuple[list[dict], int, int, ReadReport]:
    """One Checker over read_merged: the check as it was before it was split."""
    report = ReadReport()
    checker = Checker()
    violations = checker.check(read_merged(paths, report))
    return [v.as_dict() for v in violations], checker.events, checker.protocol_events, report


def outcome(paths: list[str], jobs: int) -> tuple[list[dict], int, int, ReadReport]:
    violations, report, checker = shards.check(paths, jobs=jobs)
    return [v.as_dict() for v in violations], checker.events, checker.protocol_events, report


@pytest.mark.parametrize("seed", [1, 2])
def test_split_check_is_the_checker(four_vcpu_logs, tmp_path, seed):
    logs = [str(damaged(four_vcpu_logs, tmp_path / "logs", seed))]
    want, events, protocol, report = reference(logs)
    assert len({v["invariant"] for v in want}) >= 3, "the damage must break several invariants to compare"
    assert report.truncated and report.unreadable
    for jobs in (1, 2, 3):
        got, got_events, got_protocol, got_report = outcome(logs, jobs)
        assert got == want, f"jobs={jobs}"
        assert (got_events, got_protocol, got_report.lines, got_report.files) == \
            (events, protocol, report.lines, report.files)
        assert sorted(got_report.truncated) == sorted(report.truncated)
        assert sorted(got_report.unreadable) == sorted(report.unreadable)
        # the notes come in the order of the files and their lines, however the read was split
        assert (got_report.truncated, got_report.unreadable) == (outcome(logs, 1)[3].truncated,
                                                                 outcome(logs, 1)[3].unreadable)


def test_a_line_the_bytes_cannot_route_stops_the_split(four_vcpu_logs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(four_vcpu_logs, logs)
    host = logs / "host.jsonl"
    lines = host.read_bytes().splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if b'"event":"kvm_async_pf_ready"' in line)
    lines[i] = lines[i].replace(b'"vcpu":', b'"vcpu": ', 1)  # valid JSON, not as apf-emu's logger writes it
    host.write_bytes(b"".join(lines))
    report = ReadReport()
    inputs = plan([str(logs)], report, scan=False)
    assert shards._run(inputs, 2, {}) is None  # the split is off ...
    assert outcome([str(logs)], 2)[:3] == reference([str(logs)])[:3]  # ... and the check the same


def test_a_file_out_of_order_is_read_sorted(four_vcpu_logs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(four_vcpu_logs, logs)
    guest = sorted(logs.glob("guest-*.jsonl"))[0]
    lines = guest.read_bytes().splitlines(keepends=True)
    lines[10], lines[30] = lines[30], lines[10]  # a log concatenated or edited by hand
    guest.write_bytes(b"".join(lines))
    want = reference([str(logs)])
    for jobs in (1, 2):
        assert outcome([str(logs)], jobs)[:3] == want[:3]


def test_jobs_follow_the_size_of_the_logs(four_vcpu_logs):
    inputs = plan([str(four_vcpu_logs)], ReadReport(), scan=False)
    assert shards.jobs_for(inputs, None) == 1  # a few MB: forking would cost more than it saves
    assert shards.jobs_for(inputs, 3) == 3


def test_check_jobs_on_the_command_line(four_vcpu_logs):
    ok = subprocess.run([sys.executable, "-m", "apf_emu", "check", "--jobs", "2", str(four_vcpu_logs)], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and " 0 violations" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "apf_emu", "check", "--jobs", "0", str(four_vcpu_logs)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "jobs" in bad.stderr


def _lines(path: Path, *events: dict, tail: bytes = b"") -> list[str]:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events) + tail)
    return [str(path)]


def _guest(t: int, vm: object, vcpu: object, event: str, **fields: object) -> dict:
    return {"mono_ns": t, "role": "guest", "vm": vm, "vcpu": vcpu, "boot": 1, "event": event, **fields}


def test_odd_keys_split_as_one_checker_judges_them(tmp_path):
    """A boot of no vCPU (judged once, not once per shard), a dummy left at the end of the log (its own vCPU's
    context), two VMs whose names print alike (1 and "1"), and a line cut by a kill right after its vcpu."""
    logs = _lines(
        tmp_path / "odd.jsonl",
        _guest(1, "v", None, "guest_apf_wait", task=1, token=4096),
        _guest(2, "v", 0, "guest_boot"),
        _guest(3, "v", 0, "guest_apf_dummy", token=0, action="created"),
        _guest(4, "v", 1, "guest_boot"),
        _guest(9, 1, 0, "guest_panic", reason="async #PF with interrupts off"),
        _guest(9, "1", 0, "guest_panic", reason="async #PF with interrupts off"),
        tail=b'{"mono_ns":10,"role":"guest","vm":"v","vcpu":1',
    )
    want = reference(logs)
    assert {v["invariant"] for v in want[0]} >= {"wait_woken", "dummy_leak", "guest_panic"}
    assert want[3].truncated
    assert shards._run(plan(logs, ReadReport(), scan=False), 2, {}) is not None  # the split stays on
    got = outcome(logs, 2)
    assert got[:3] == want[:3] and got[3].truncated == want[3].truncated


def test_what_a_whole_vm_is_judged_by_on_a_vcpu_stops_the_split(tmp_path):
    """ftrace_start (what is judged), harness_settings (the latency limit) or host_ready (the ABI) written with a
    vCPU would reach one shard only: the check is done in one process."""
    for vm_wide in ({"role": "host", "event": "ftrace_start", "export": True},
                    {"role": "harness", "event": "harness_settings", "ready_latency_limit_ms": 5},
                    {"role": "host", "event": "host_ready", "abi": "pf"}):
        logs = _lines(tmp_path / f"{vm_wide['event']}.jsonl", {"mono_ns": 1, "vm": "v", "vcpu": 1, **vm_wide},
                      _guest(2, "v", 0, "guest_panic", reason="async #PF in kernel mode"))
        assert shards._run(plan(logs, ReadReport(), scan=False), 2, {}) is None
        assert outcome(logs, 2)[:3] == reference(logs)[:3]


def test_a_vcpu_of_thousands_of_digits_is_an_unreadable_line(tmp_path):
    """Past int()'s 4,300 digits a route would raise ValueError: such a line stops the split and is reported as
    unreadable, as one checker reports it."""
    logs = _lines(tmp_path / "long.jsonl", _guest(1, "v", 0, "guest_panic", reason="async #PF in kernel mode"),
                  tail=b'{"mono_ns":2,"role":"guest","vm":"v","vcpu":' + b"7" * 5000 + b',"event":"guest_boot"}\n')
    assert shards._run(plan(logs, ReadReport(), scan=False), 2, {}) is None
    got, want = outcome(logs, 2), reference(logs)
    assert got[:3] == want[:3] and got[3].unreadable == want[3].unreadable == [f"{logs[0]}:2"]
