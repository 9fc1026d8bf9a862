# `apf-emu trace` writes Chrome Trace Event JSON that follows the format's rules. No trace viewer can be installed
# from the package registries on our CI machines (PyPI's `perfetto` fetches its trace_processor binary from the
# network at run time), so these tests check the rules the viewers rely on.
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from apf_emu.logs import read_merged
from apf_emu.trace import FLOW_CAT, FLOW_NAME, build_trace

from .conftest import ROOT


@pytest.fixture(scope="module")
def trace(clean_logs, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "run.json"
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "trace", str(clean_logs), "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_top_level_shape(trace):
    assert set(trace) == {"traceEvents", "displayTimeUnit"}
    assert trace["displayTimeUnit"] in ("ms", "ns")
    for ev in trace["traceEvents"]:
        assert {"name", "ph", "pid", "tid"} <= ev.keys()
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        assert ev["ph"] in {"X", "i", "s", "f", "M"}
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0


def test_timestamps_are_microseconds(trace, clean_logs):
    events = list(read_merged([str(clean_logs)]))
    t0 = events[0]["mono_ns"]
    expected = sorted((e["mono_ns"] - t0) / 1000 for e in events if e["event"] in ("guest_boot", "guest_shutdown"))
    got = sorted(e["ts"] for e in trace["traceEvents"] if e["ph"] == "i" and e["name"] in ("boot", "shutdown"))
    assert got == pytest.approx(expected)
    assert got[-1] > 1_000_000  # a two-second run spans more than a million microseconds


def test_slices_nest_properly_on_every_track(trace):
    tracks = defaultdict(list)
    for ev in trace["traceEvents"]:
        if ev["ph"] == "X":
            assert ev["dur"] >= 0
            tracks[(ev["pid"], ev["tid"])].append((ev["ts"], ev["ts"] + ev["dur"]))
    assert tracks
    for slices in tracks.values():
        stack: list[float] = []
        for start, end in sorted(slices, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= start + 1e-9:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-9, "slices overlap without nesting"
            stack.append(end)


def test_flows_pair_up(trace):
    starts = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "s"}
    ends = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "f"}
    assert starts and starts.keys() == ends.keys()
    assert len(starts) == sum(1 for e in trace["traceEvents"] if e["ph"] == "s")  # ids are unique
    for fid, s in starts.items():
        f = ends[fid]
        assert (s["cat"], s["name"]) == (f["cat"], f["name"]) == (FLOW_CAT, FLOW_NAME)
        assert s["ts"] <= f["ts"]
        assert f.get("bp") == "e"
    # each flow end sits inside a slice of its thread (what "bp": "e" binds to)
    slices = defaultdict(list)
    for ev in trace["traceEvents"]:
        if ev["ph"] == "X":
            slices[(ev["pid"], ev["tid"])].append((ev["ts"], ev["ts"] + ev["dur"]))
    for f in ends.values():
        assert any(a <= f["ts"] <= b for a, b in slices[(f["pid"], f["tid"])])


def test_tracks_are_named_and_cover_host_vcpus_and_guest_tasks(trace):
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert sum(n.startswith("vcpu ") for n in names) == 2
    assert sum(n.startswith("task ") for n in names) >= 4
    processes = [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert any(p.startswith("host ") for p in processes) and any(p.startswith("guest ") for p in processes)


def test_every_apf_is_a_slice_from_not_present_to_wake(trace, clean_logs):
    events = list(read_merged([str(clean_logs)]))
    wakes = Counter(e["event"] for e in events)["guest_apf_wake"]
    apf_slices = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"].startswith("APF ")]
    assert len(apf_slices) == wakes
    instants = Counter(e["name"] for e in trace["traceEvents"] if e["ph"] == "i")
    assert instants["ACK"] > 0 and instants["boot"] == 2 and instants["sync fault"] > 0


def test_a_killed_guest_leaves_no_dangling_flow():
    events = [
        {"event": "kvm_async_pf_not_present", "role": "host", "vm": "v", "vcpu": 0, "token": 4096, "mono_ns": 10},
        {"event": "kvm_async_pf_ready", "role": "host", "vm": "v", "vcpu": 0, "token": 4096, "mono_ns": 20},
    ]
    trace = build_trace(events)
    assert not [e for e in trace["traceEvents"] if e["ph"] in ("s", "f")]
