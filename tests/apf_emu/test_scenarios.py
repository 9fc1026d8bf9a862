# The scenario catalogue and its verdict (apf_emu/scenarios.py), without running anything: every scenario is
# well-formed, its variants become the options they say, and `judge` passes exactly a flagged buggy run and a clean
# fixed one. tests/integration/test_scenarios.py runs them for real.
from __future__ import annotations

from pathlib import Path

import pytest

from apf_emu.checker import INVARIANTS, Violation
from apf_emu.runner import RunResult
from apf_emu.scenarios import SCENARIOS, VariantRun, judge, variant_options
from apf_emu.stats import Stats
from shared import bugs


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s.name)
def test_every_scenario_is_well_formed(sc):
    assert set(sc.flags) <= INVARIANTS.keys(), "a named check that the checker does not have"
    assert sc.flags or sc.statistic is not None, "nothing could flag it"
    assert sc.buggy != sc.fixed and sc.story and sc.source and sc.title
    for which in ("buggy", "fixed"):
        opts = variant_options(sc, which, transport="socket", seed=1, log_dir=Path("logs"), vm="v")
        opts.host.validate()
        assert opts.host.abi == opts.guest.abi, "a scenario runs one ABI on both sides"
        assert set(opts.host.bugs) <= set(bugs.NAMES)


def test_the_buggy_variant_puts_the_bug_on_the_host_command_line():
    sc = next(s for s in SCENARIOS if s.name == "bz208081")
    buggy = variant_options(sc, "buggy", transport="socket", seed=1, log_dir=Path("l"), vm="v")
    fixed = variant_options(sc, "fixed", transport="socket", seed=1, log_dir=Path("l"), vm="v")
    assert "--bugs" in buggy.host.argv() and "bz208081" in buggy.host.argv()
    assert "--bugs" not in fixed.host.argv()


def fake_run(variant: str, invariants: list[str], *, checked: bool = True, exits: list[str] | None = None,
             stats: Stats | None = None) -> VariantRun:
    result = RunResult("v", Path("logs"), unexpected_exits=exits or [])
    violations = [Violation(name, "m", {"event": "x"}, []) for name in invariants]
    return VariantRun(variant, "socket", result, violations, stats or Stats(), checked)


def test_judge_passes_a_flagged_buggy_run_and_a_clean_fixed_one():
    sc = next(s for s in SCENARIOS if s.name == "lapic-disabled-spin")
    ok = judge(sc, "socket", [fake_run("buggy", ["halt_spin", "wait_woken"]), fake_run("fixed", [])])
    assert ok.passed and ok.flagged_by == ["halt_spin", "wait_woken"]
    unflagged = judge(sc, "socket", [fake_run("buggy", ["data_check"]), fake_run("fixed", [])])
    assert not unflagged.passed and "not flagged by halt_spin or wait_woken (found data_check 1)" in \
        unflagged.problems[0]
    dirty = judge(sc, "socket", [fake_run("buggy", ["halt_spin"]), fake_run("fixed", ["wait_woken"])])
    assert not dirty.passed and "fixed variant is not clean: wait_woken 1" in dirty.problems[0]
    died = judge(sc, "socket", [fake_run("fixed", [], exits=["guest-0: killed by SIGKILL"])])
    assert not died.passed and "lost a process" in died.problems[0]
    nothing = judge(sc, "socket", [fake_run("fixed", [], checked=False)])
    assert not nothing.passed and "checked nothing" in nothing.problems[0]


def test_a_statistic_scenario_compares_the_buggy_run_with_the_fixed_one():
    sc = next(s for s in SCENARIOS if s.statistic is not None)
    assert sc.statistic is not None

    def with_latency(us: int) -> Stats:
        """A page-in completed, and its task woken `us` later."""
        stats = Stats()
        base = {"vm": "v", "vcpu": 0, "boot": 1, "token": 0x1000}
        stats.feed({**base, "role": "host", "event": "kvm_async_pf_completed", "mono_ns": 0})
        stats.feed({**base, "role": "guest", "event": "guest_apf_wake", "mono_ns": us * 1000})
        return stats

    slow, fast = with_latency(9000), with_latency(1000)
    assert sc.statistic.measure(slow) == pytest.approx(9000, rel=0.01)
    ok = judge(sc, "socket", [fake_run("buggy", [], stats=slow), fake_run("fixed", [], stats=fast)])
    assert ok.passed and ok.flagged_by[0].startswith(sc.statistic.name)
    close = judge(sc, "socket", [fake_run("buggy", [], stats=with_latency(2000)), fake_run("fixed", [], stats=fast)])
    assert not close.passed and "not 3x" in close.problems[0]
