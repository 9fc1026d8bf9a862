# apf_emu/report.py: the campaign report, from records alone. The table counts cases and violations by invariant
# with the seeds compacted by ABI and scenario; every failing case is listed with its repro command, no passing one
# is; the picture is a PNG.
from __future__ import annotations

from pathlib import Path

from apf_emu.cases import Case, CaseResult, Settings, record
from apf_emu.report import picture, text


def result(seed: int, scenario: str | None, violations: dict[str, int], rate: float) -> CaseResult:
    summary = {"schedule": [], "apfs": int(rate * 2), "problems": [], "leftovers": [], "faults_applied": {},
               "violations": [{"invariant": k, "message": "m"} for k, n in violations.items() for _ in range(n)],
               "stats": {"seconds": 2.0, "latency_us": {"not_present_to_wake": {"count": 9, "p50_us": 1000 + seed,
                                                                                "p99_us": 9000}}}}
    return record(Case(seed, "int", scenario), Settings(), exit_status=1 if violations else 0, summary=summary,
                  wall_s=2.5, log_dir="cases/x" if violations else None)


def test_the_report_names_each_failing_seed_by_invariant(tmp_path: Path) -> None:
    results = [result(s, None, {}, 100.0 * s) for s in range(1, 6)]
    results += [result(s, "bz208081", {"ready_for_injected_only": 3, **({"dummy_leak": 1} if s > 2 else {})}, 50.0)
                for s in (1, 2, 3, 4, 9)]
    lines = text(tmp_path, results)
    assert lines[0].endswith("10 cases in " + str(tmp_path) + ": 5 pass, 5 violations.")
    rows = {line.split()[0]: line for line in lines if line.startswith(("ready_", "dummy_"))}
    assert rows["ready_for_injected_only"].split()[1:3] == ["5", "15"]
    assert rows["ready_for_injected_only"].endswith("int bz208081: 1-4, 9")
    assert rows["dummy_leak"].endswith("int bz208081: 3-4, 9")
    listed = "\n".join(lines[lines.index("failing cases (5), each with the command that runs it again:"):])
    for s in (1, 2, 3, 4, 9):
        assert f"s{s}-int-bz208081" in listed
        assert f"apf-emu chaos --seed {s} --abi int" in listed
    assert "s5-int " not in listed
    assert "APF rate per case: min 50/s, median 75/s, max 500/s" in lines


def test_a_campaign_with_no_failure_says_so(tmp_path: Path) -> None:
    lines = text(tmp_path, [result(1, None, {}, 10.0)])
    assert "no case failed" in lines and not any(line.startswith("invariant") for line in lines)


def test_the_picture_is_a_png(tmp_path: Path) -> None:
    results = [result(s, None, {}, 10.0 * s) for s in range(1, 4)] + [result(4, "bz208081", {"x": 1}, 5.0)]
    assert picture(results, tmp_path / "r.png") is None
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture(results, tmp_path / "no" / "such" / "dir.png") is not None  # a reason, not a traceback
