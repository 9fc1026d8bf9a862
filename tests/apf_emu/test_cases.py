# apf_emu/cases.py: the campaign's case model and records. The options of a case are the same whether the local
# campaign runs it (`apf-emu chaos <args>`) or a pod does (pod.chaos_options); records are built from chaos
# summaries and read back from results.jsonl, which tolerates what a killed campaign leaves.
from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from apf_emu import cli
from apf_emu.cases import (
    CampaignError,
    Case,
    CaseResult,
    Settings,
    append_result,
    bind_settings,
    compact,
    make_cases,
    parse_scenarios,
    parse_seeds,
    read_results,
    record,
    summary_line,
)
from apf_emu.pod import chaos_options
from apf_emu.scenarios import CHAOS_SCENARIOS, chaos_scenario, with_scenario
from shared.config import with_


def test_seeds_are_ranges_and_single_seeds_in_order() -> None:
    assert parse_seeds("1-3,7,10-11") == [1, 2, 3, 7, 10, 11]
    assert parse_seeds("5") == [5]
    for bad in ("", "a", "3-1", "1-3,2", "-1", "1-"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_scenarios_take_none_names_and_variants() -> None:
    assert parse_scenarios("none,bz208081:buggy,token-zero:fixed") == [None, "bz208081", "token-zero:fixed"]
    with pytest.raises(ValueError, match="apf-emu scenario run firecracker-snapshot-msrs"):
        parse_scenarios("firecracker-snapshot-msrs")  # a snapshot: not a chaos run's switch
    with pytest.raises(ValueError, match="buggy or fixed"):
        parse_scenarios("bz208081:broken")
    with pytest.raises(ValueError):
        parse_scenarios("bz208081,bz208081:buggy")  # the same case twice
    assert "legacy-no-ack" not in CHAOS_SCENARIOS  # judged by a statistic against its fixed run


def test_a_scenario_that_fixes_its_abi_runs_once_per_seed_on_it() -> None:
    cases = make_cases([1, 2], ["int", "int-error"], [None, "double-fault"])
    assert [c.id for c in cases] == ["s1-int", "s1-int-error", "s1-pf-double-fault",
                                     "s2-int", "s2-int-error", "s2-pf-double-fault"]
    assert len({c.id for c in make_cases([1], ["int"], ["bz208081", "bz208081:fixed"])}) == 2


@pytest.mark.parametrize("scenario", [None, "bz208081", "offline-stale-slot:fixed", "double-fault"])
def test_the_repro_command_runs_what_a_pod_runs(scenario: str | None, tmp_path: Path) -> None:
    settings = Settings(duration=4.0, vcpus=2, transport="signal", guest_kills=5, pauses=0)
    case = make_cases([9], ["int"], [scenario])[0]
    words = case.repro(settings).split()
    assert words[:2] == ["apf-emu", "chaos"]
    args = cli.build_parser().parse_args([*words[1:], "--log-dir", str(tmp_path)])
    host, guest = cli.run_options(args)
    if args.scenario:
        host, guest = with_scenario(*chaos_scenario(args.scenario), host, guest)
    pod = chaos_options(case, settings)
    place = {"vm": "vm0", "log_dir": None}  # a run's own, which chaos fills in
    assert (with_(host, **place), with_(guest, **place)) == (with_(pod.host, **place), with_(pod.guest, **place))
    assert (args.duration, args.guest_kills, args.guest_panics, args.host_kills, args.pauses) == \
        (pod.duration, pod.guest_kills, pod.guest_panics, pod.host_kills, pod.pauses)


def _summary(violations: list[str], **over: object) -> dict[str, object]:
    return {"schedule": [], "stopped_by": "duration", "apfs": 300, "faults_applied": {"guest_kill": 2},
            "problems": [], "leftovers": [],
            "violations": [{"invariant": v, "message": f"{v} broke"} for v in violations],
            "stats": {"seconds": 3.0, "latency_us": {"not_present_to_wake": {"count": 3, "p50_us": 900},
                                                    "ready_to_wake": {}}}, **over}


def test_a_record_says_what_the_summary_and_the_status_say() -> None:
    case, s = Case(3, "int", "bz208081"), Settings()
    ok = record(case, s, exit_status=0, summary=_summary([]), wall_s=3.3, log_dir=None)
    assert (ok.verdict, ok.apf_rate, ok.faults, list(ok.latency_us)) == ("pass", 100.0, {"guest_kill": 2},
                                                                          ["not_present_to_wake"])
    bad = record(case, s, exit_status=1, summary=_summary(["dummy_leak", "dummy_leak", "wait_woken"]), wall_s=1,
                 log_dir="cases/x")
    assert (bad.verdict, bad.violations) == ("violations", {"dummy_leak": 2, "wait_woken": 1})
    assert bad.first_violations[0] == "dummy_leak: dummy_leak broke"
    failed = record(case, s, exit_status=3, summary=_summary([], problems=["host exited"]), wall_s=1, log_dir=None)
    assert (failed.verdict, failed.problems) == ("failed", ["host exited"])
    gone = record(case, s, exit_status=1, summary=None, wall_s=1, log_dir=None, error="Traceback ...")
    assert (gone.verdict, gone.error) == ("error", "Traceback ...")
    odd = record(case, s, exit_status=0, summary={"schedule": [], "violations": []}, wall_s=1, log_dir=None)
    assert odd.verdict == "error" and "not one of apf-emu chaos" in str(odd.error)


def test_the_summary_is_the_last_chaos_summary_line() -> None:
    out = b"noise\n" + orjson.dumps(_summary([])) + b"\n{\"other\": 1}\n"
    assert summary_line(out) == _summary([])
    assert summary_line(b"Traceback\n") is None


def test_results_survive_a_cut_last_line_and_the_last_record_wins(tmp_path: Path) -> None:
    s = Settings()
    first = record(Case(1, "int"), s, exit_status=0, summary=_summary([]), wall_s=1, log_dir=None)
    append_result(tmp_path, first)
    again = record(Case(1, "int"), s, exit_status=1, summary=_summary(["wait_woken"]), wall_s=1, log_dir=None)
    append_result(tmp_path, again)
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"case": "s2-int", "seed": 2, "abi": "int", "verdict": "nope"}\n{"case": "s3-in')
    results, notes = read_results(tmp_path)
    assert [(r.case, r.verdict) for r in results] == [("s1-int", "violations")]
    assert len(notes) == 2 and "cut last line" in notes[1] and "not a case record" in notes[0]
    assert CaseResult.from_dict(orjson.loads(orjson.dumps(again.as_dict()))) == again


def test_a_directory_keeps_the_settings_it_was_started_with(tmp_path: Path) -> None:
    bind_settings(tmp_path, Settings(duration=5.0))
    bind_settings(tmp_path, Settings(duration=5.0))
    with pytest.raises(CampaignError, match=r"duration 5.0 \(asked: 6.0\)"):
        bind_settings(tmp_path, Settings(duration=6.0))
    (tmp_path / "campaign.json").write_text('{"duration": "x"}')
    with pytest.raises(CampaignError, match="not a campaign's settings"):
        bind_settings(tmp_path, Settings())


def test_compact_writes_runs_as_ranges() -> None:
    assert compact([9, 1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-9"
    assert compact([]) == ""
