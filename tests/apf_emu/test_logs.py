# Reading logs: files stream in order, a file that is not in order is sorted, compose's prefixes and a cut last
# line are tolerated, and the merge of several inputs is ordered by mono_ns.
from __future__ import annotations

import io
import sys

import orjson
import pytest

from apf_emu.logs import LogInputError, ReadReport, read_merged


def line(mono: int, event: str = "e", **fields: object) -> bytes:
    return orjson.dumps({"event": event, "mono_ns": mono, **fields}) + b"\n"


def test_merge_of_files_is_ordered_and_an_unordered_file_is_sorted(tmp_path):
    (tmp_path / "host.jsonl").write_bytes(b"".join(line(t, src="h") for t in (1, 4, 9)))
    (tmp_path / "guest-0.jsonl").write_bytes(b"".join(line(t, src="g") for t in (7, 2, 5)))  # not in order
    report = ReadReport()
    evs = list(read_merged([str(tmp_path)], report))
    assert [e["mono_ns"] for e in evs] == [1, 2, 4, 5, 7, 9]
    assert report.files == 2 and report.lines == 6 and not report.unreadable and not report.truncated


def test_cut_last_line_and_garbage_are_reported(tmp_path):
    (tmp_path / "guest-1.jsonl").write_bytes(line(1) + b"not json\n" + line(3) + b'{"event": "e", "mono_')
    report = ReadReport()
    evs = list(read_merged([str(tmp_path / "guest-1.jsonl")], report))
    assert [e["mono_ns"] for e in evs] == [1, 3]
    assert report.unreadable == [f"{tmp_path / 'guest-1.jsonl'}:2"]
    assert report.truncated == [f"{tmp_path / 'guest-1.jsonl'}:4"]


def test_compose_logs_on_stdin(monkeypatch):
    text = (b"Attaching to vm_host_1, vm_guest_1\n"
            + b"guest_1  | " + line(20, vcpu=0) + b"host_1   | " + line(10) + b"guest_1  | " + line(30, vcpu=0))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text)))
    report = ReadReport()
    evs = list(read_merged(["-"], report))
    assert [e["mono_ns"] for e in evs] == [10, 20, 30]
    assert report.unreadable == []  # compose's "Attaching to" line is not a log line, and not an error either


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(LogInputError, match="no such file"):
        list(read_merged([str(tmp_path / "nope.jsonl")]))
    with pytest.raises(LogInputError, match=r"no \*\.jsonl"):
        list(read_merged([str(tmp_path)]))
