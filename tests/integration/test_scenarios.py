# Every scenario of apf_emu/scenarios.py on real processes, as `apf-emu scenario run --all` runs them (on the signal
# transport too where the scenario is about timing): the buggy variant is flagged by its named check, the fixed one
# is clean. And the command itself, end to end, for one of them.
from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from apf_emu.scenarios import SCENARIOS, run_scenario

from .helpers import ROOT

CASES = [(sc, t) for sc in SCENARIOS for t in (("socket", "signal") if sc.timing else ("socket",))]
# The check that must fire every time; the others of `flags` may join it.
PRIMARY = {"bz208081": "ready_for_injected_only", "token-zero": "token_format", "lapic-disabled-spin": "halt_spin",
           "offline-stale-slot": "wait_woken", "double-fault": "double_fault",
           "firecracker-snapshot-msrs": "wait_woken", "stale-after-kdump": "stale_token",
           "legacy-no-ack": "completed_to_ready p50"}


def test_every_scenario_has_its_primary_check():
    assert PRIMARY.keys() == {sc.name for sc in SCENARIOS}


@pytest.mark.parametrize("sc,transport", CASES, ids=[f"{sc.name}-{t}" for sc, t in CASES])
def test_scenario_buggy_is_flagged_and_fixed_is_clean(tmp_path, sc, transport):
    verdict = run_scenario(sc, transport=transport, seed=1, root=tmp_path, say=lambda _line: None)
    assert verdict.passed, verdict.problems
    assert any(flag.startswith(PRIMARY[sc.name]) for flag in verdict.flagged_by), verdict.flagged_by
    buggy, fixed = verdict.runs
    assert buggy.variant == "buggy" and fixed.variant == "fixed" and fixed.violations == []


def test_scenario_command_runs_one_and_reports_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "scenario", "run", "double-fault", "--json",
                           "--log-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    line = orjson.loads(proc.stdout)
    assert line["scenario"] == "double-fault" and line["passed"] is True and line["flagged_by"] == ["double_fault"]
    assert [r["variant"] for r in line["runs"]] == ["buggy", "fixed"]
    assert (tmp_path / "double-fault" / "buggy-socket" / "host.jsonl").is_file()


def test_scenario_fixed_only_runs_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "scenario", "run", "bz208081", "--fixed",
                           "--log-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "PASS bz208081" in proc.stdout and "fixed KVM since 5.8: clean" in proc.stdout
    assert not (tmp_path / "bz208081" / "buggy-socket").exists()
