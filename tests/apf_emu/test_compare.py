# `apf-emu compare` (apf_emu/compare.py): the table and its JSON from real runs of two ABIs with the same seed, and
# what counts as lost and misdirected.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from apf_emu.checker import Violation
from apf_emu.compare import LOST, MISDIRECTED, AbiRun, table
from apf_emu.stats import Stats

ROOT = Path(__file__).resolve().parents[2]


def violation(invariant: str) -> Violation:
    return Violation(invariant, "m", {"event": "x"}, [])


def test_lost_and_misdirected_count_the_invariants_that_name_such_events():
    stats = Stats()
    stats.races["genuine_as_page_ready"] = 2
    run = AbiRun("pf", stats, [violation(n) for n in (*LOST, *MISDIRECTED, "guest_panic")])
    assert run.lost == len(LOST) and run.misdirected == len(MISDIRECTED)
    clean = AbiRun("int", Stats(), [])
    lines = table([clean, run])
    assert lines[0].split() == ["int", "pf"]
    rows = {line[:40].strip(): line[40:].split() for line in lines[1:]}
    assert rows["race: genuine as page ready"] == ["0", "2"]
    assert rows["violation: guest_panic"] == ["0", "1"]
    assert rows["events misdirected"] == ["0", str(len(MISDIRECTED))]
    assert rows["APF cycle p50 / p99 (us)"] == ["-", "-"]


def test_compare_runs_each_abi_with_the_same_seed_and_says_what_each_did(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "compare", "--abis", "pf,int", "--duration", "2",
                           "--entry-fault-ratio", "0.3", "--seed", "3", "--json", "--log-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = orjson.loads(proc.stdout)
    assert [r["abi"] for r in out["abis"]] == ["pf", "int"] and out["seed"] == 3
    pf, plain = out["abis"]
    assert sum(pf["races"].values()) > 0 and pf["misdirected"] > 0
    assert plain["races"] == {} and plain["violations"] == {} and plain["apfs"] > 100
    assert {Path(r["log_dir"]).name for r in out["abis"]} == {"pf", "int"}
    text = subprocess.run([sys.executable, "-m", "apf_emu", "compare", "--abis", "int", "--duration", "1",
                           "--log-dir", str(tmp_path / "text")], cwd=ROOT, capture_output=True, timeout=120)
    assert text.returncode == 0 and b"APFs delivered (not-present)" in text.stdout
