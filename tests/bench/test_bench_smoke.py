# The benchmarks are not timed here (bench/RESULTS.md has the numbers): this only checks that the quick variant of
# every benchmark runs end to end on real processes and writes results of the documented shape.
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_bench_writes_well_formed_results(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "bench", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["variant"] == "quick"
    assert isinstance(r["machine"]["cores"], int) and r["machine"]["python"] and r["machine"]["date"]
    for transport in ("socket", "signal"):
        assert positive(r["floor_us"][transport])
        assert set(r["ratio"][transport]) == {"not_present", "ready", "ack", "cycle"}
        assert all(positive(v) for v in r["ratio"][transport].values())
        assert all(r["costs_us"][transport][step]["n"] > 0 for step in ("not_present", "ready", "ack", "cycle"))
        floor_cycle = r["protocol_floor_us"][transport]["cycle"]
        assert positive(floor_cycle["p50_us"]) and floor_cycle["n"] > 0
        assert r["ratio"][transport]["cycle"] == round(r["costs_us"][transport]["cycle"]["p50_us"]
                                                       / floor_cycle["p50_us"], 2)
    assert [row["vcpus"] for row in r["scale"]] == sorted(row["vcpus"] for row in r["scale"])
    for row in r["scale"]:
        assert positive(row["cycles_per_s"]) and positive(row["host_rss_mb"]) and positive(row["guest_rss_mb"])
        assert row["clean"] is True
    assert [row["shared_ratio"] for row in r["shared_pages"]] == [0.0, 0.2, 0.5]
    for row in r["shared_pages"]:
        assert positive(row["cycles_per_s"]) and positive(row["vs_private"]) and row["clean"] is True
    assert r["shared_pages"][0]["vs_private"] == 1.0
    n = r["natapov"]
    assert n["work_apf"] > 0 and n["work_sync"] > 0 and n["apfs"] > 0 and n["faults_sync"] > 0
    assert n["speedup"] == round(n["work_apf"] / n["work_sync"], 3)
    assert n["efficiency"] == round(n["speedup"] / n["ideal_speedup"], 3) and n["ideal_speedup"] >= 1
    assert [row["abi"] for row in r["abis"]] == ["int", "pf", "ve", "int-error"]
    for row in r["abis"]:
        assert positive(row["cycles_per_s"]) and row["apfs"] > 0 and row["clean"] is True, row
        assert row["vs_int"] == round(row["cycles_per_s"] / r["abis"][0]["cycles_per_s"], 3)
        assert row["cycle_p50_us"] <= row["cycle_p99_us"] and row["ready_p50_us"] <= row["cycle_p50_us"], row
    assert positive(r["check_lines_per_s"])
    summary, scale = r["scale_summary"], r["scale"]
    assert summary["peak_cycles_per_s"] == max(row["cycles_per_s"] for row in scale)
    assert summary["share_of_peak_at_most_vcpus"] == round(scale[-1]["cycles_per_s"] / summary["peak_cycles_per_s"], 3)
    assert summary["host_rss_mb_per_extra_vcpu"] == round((scale[-1]["host_rss_mb"] - scale[0]["host_rss_mb"])
                                                          / (scale[-1]["vcpus"] - scale[0]["vcpus"]), 3)
    g = r["goals"]
    assert g["ratio.socket.cycle"]["value"] == r["ratio"]["socket"]["cycle"]
    assert g["ratio.socket.cycle"]["met"] is (r["ratio"]["socket"]["cycle"] <= 1.3)
    assert g["check_lines_per_s"]["met"] is (r["check_lines_per_s"] >= 500_000)
    assert g["natapov_efficiency"]["value"] == (r["natapov_at_cores"] or r["natapov"])["efficiency"]
    assert all(isinstance(goal["met"], bool) for goal in g.values()), "every goal is measured, quick or full"
    assert "goal    ratio.socket.cycle" in proc.stdout
    for key in ("not_present", "ready", "ack"):
        assert f"{key} " in proc.stdout, "the ratios are printed"


def test_bench_help_lists_its_options():
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "--json" in proc.stdout and "--plots" in proc.stdout


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    """SIGINT once the first benchmark has printed its result: the running one is cut, its processes stopped, the
    partial results written with "interrupted": true, status 130, no traceback."""
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "apf_emu", "bench", "--quick", "--json", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while not (line := proc.stdout.readline()).startswith("scale"):  # the cycle costs are done, scale runs
        assert line, "bench ended before its scale benchmark"
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    r = json.loads(out.read_text())
    assert r["interrupted"] is True and positive(r["floor_us"]["socket"])
    assert "bench: wrote" in rest and "(partial)" in rest
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and b"apf-topo-" in _cmdline(p)]
    assert leftover == []


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""
