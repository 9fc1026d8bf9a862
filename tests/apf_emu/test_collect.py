# apf_emu/collect.py: pods' output read back into a campaign DIR. The source here is a stand-in for kubectl or
# podman (the podman test, tests/compose/test_podman.py, reads real pods): the record is the host container's last
# `apf_emu_case` line, a runtime's stderr lines are left out of the logs, a pod with no record is an error with the
# runtime's reason, a case already recorded is not read again, a pod still running is left for later.
from __future__ import annotations

from pathlib import Path

import orjson

from apf_emu.cases import Case, Settings, read_results, record
from apf_emu.collect import PodState, collect, split_host_output

SETTINGS = Settings(vcpus=1)
CASES = [Case(1, "int"), Case(2, "int"), Case(3, "int"), Case(4, "int")]
EVENT = b'{"event":"host_ready","role":"host","vm":"case","vcpu":null,"mono_ns":1}'


def host_output(case: Case, violations: list[str]) -> bytes:
    summary = {"schedule": [], "apfs": 10, "problems": [], "leftovers": [], "faults_applied": {},
               "violations": [{"invariant": v, "message": "m"} for v in violations], "stats": {"seconds": 1.0}}
    res = record(case, SETTINGS, exit_status=1 if violations else 0, summary=summary, wall_s=1.0, log_dir=None)
    return EVENT + b"\nTraceback? no: a line on stderr\n" + orjson.dumps({"apf_emu_case": res.as_dict()}) + b"\n"


class Source:
    def __init__(self) -> None:
        self.states = [PodState("p0", 0, True, "Succeeded"), PodState("p1", 1, True, "Failed"),
                       PodState("p2", 2, True, "DeadlineExceeded"), PodState("p3", 3, False, "Running"),
                       PodState("p9", 9, True, "Succeeded")]
        self.out = {"p0": host_output(CASES[0], []), "p1": host_output(CASES[1], ["wait_woken"]),
                    "p2": EVENT + b"\n"}
        self.read: list[str] = []

    def pods(self) -> list[PodState]:
        return self.states

    def logs(self, pod: str, container: str) -> bytes:
        self.read.append(f"{pod}/{container}")
        return self.out[pod] if container == "host" else EVENT.replace(b'"host"', b'"guest"') + b"\nwarning\n"


def test_collect_records_finished_pods_once(tmp_path: Path) -> None:
    source = Source()
    new, notes = collect(tmp_path, source, CASES, SETTINGS)
    assert [(r.case, r.verdict, r.where) for r in new] == [("s1-int", "pass", "p0"), ("s2-int", "violations", "p1"),
                                                            ("s3-int", "error", "p2")]
    assert "printed no record (DeadlineExceeded)" in str(new[2].error)
    assert any("index 9 is not a case" in n for n in notes) and any("1 pods still running" in n for n in notes)
    # Logs of the failing cases only (keep_logs failed), without the runtime's stderr lines.
    assert new[0].log_dir is None and new[1].log_dir == "cases/s2-int"
    assert (tmp_path / "cases" / "s2-int" / "host.jsonl").read_bytes() == EVENT + b"\n"
    assert (tmp_path / "cases" / "s2-int" / "guest-0.jsonl").read_bytes().count(b"\n") == 1
    assert not (tmp_path / "cases" / "s1-int").exists()
    source.read.clear()
    again, _ = collect(tmp_path, source, CASES, SETTINGS)
    assert again == [] and source.read == []
    assert [r.case for r in read_results(tmp_path)[0]] == ["s1-int", "s2-int", "s3-int"]


def test_a_record_of_another_case_is_not_taken(tmp_path: Path) -> None:
    source = Source()
    source.out["p0"] = host_output(CASES[3], [])
    new, notes = collect(tmp_path, source, CASES, SETTINGS)
    assert (new[0].case, new[0].verdict) == ("s1-int", "error")
    assert any("its record is of case s4-int, not s1-int" in n for n in notes)


def test_the_record_is_the_last_record_line() -> None:
    lines, res, why = split_host_output(host_output(CASES[0], []) + b"a stderr line after it\n")
    assert res is not None and res.case == "s1-int" and why is None and lines == [EVENT]
    assert split_host_output(b'{"apf_emu_case": {"case": 1}}\n')[2] is not None
