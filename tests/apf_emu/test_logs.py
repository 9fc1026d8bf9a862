# Reading logs: files stream in order, a file that is not in order is sorted, compose's prefixes and a cut last
# line are tolerated, and the merge of several inputs is ordered by mono_ns.
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from apf_emu.cli import analyse, stats_json
from apf_emu.logs import LogInputError, ReadReport, read_merged
from apf_emu.trace import build_trace
from shared.logfile import LineWriter

ROOT = Path(__file__).resolve().parents[2]


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


def _gzip_copy(src: Path, dst: Path, *, cut: bool) -> None:
    """What a process writing with --log-compress gzip leaves: every line flushed on its own; `cut`: killed before
    the stream's trailer (and inside its last line)."""
    data = src.read_bytes()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = LineWriter(fd, "gzip")
        lines = data.splitlines(keepends=True)
        for raw in lines[:-1] if cut else lines:
            writer.write(raw)
        if cut:
            writer.write(lines[-1][: len(lines[-1]) // 2])  # the last line cut in the middle, and no trailer
        else:
            writer.finish()
    finally:
        os.close(fd)


def test_compressed_logs_give_exactly_what_plain_ones_give(clean_logs, tmp_path):
    """check, stats and trace over gzip logs (one of them cut by a SIGKILL) agree with the plain logs they hold."""
    plain, packed = tmp_path / "plain", tmp_path / "gz"
    plain.mkdir()
    packed.mkdir()
    for i, f in enumerate(sorted(clean_logs.iterdir())):
        (plain / f.name).write_bytes(f.read_bytes())
        if f.name == "harness.jsonl":
            (packed / f.name).write_bytes(f.read_bytes())
            continue
        cut = i == 1
        if cut:  # the plain twin of a cut file ends in the same half line
            body = f.read_bytes().splitlines(keepends=True)
            (plain / f.name).write_bytes(b"".join(body[:-1]) + body[-1][: len(body[-1]) // 2])
        _gzip_copy(f, packed / f"{f.stem}.4242.jsonl.gz", cut=cut)
    results = []
    for d in (plain, packed):
        violations, stats, report, checker = analyse([str(d)])
        trace = build_trace(read_merged([str(d)]))
        results.append(([v.as_dict() for v in violations], stats_json(stats), len(report.truncated), trace,
                         checker.protocol_events))
    assert results[0][4] > 1000 and results[0][2] == 1
    assert results[0] == results[1]


def test_a_damaged_gzip_log_is_reported_and_read_up_to_the_damage(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_bytes(b"".join(line(t, x=(t * 7919) % 1000003) for t in range(1, 20000)))
    dst = tmp_path / "host.1.jsonl.gz"
    _gzip_copy(src, dst, cut=False)
    data = bytearray(dst.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
    dst.write_bytes(bytes(data))
    report = ReadReport()
    evs = list(read_merged([str(dst)], report))
    assert 0 < len(evs) < 19999 and [e["mono_ns"] for e in evs] == sorted(e["mono_ns"] for e in evs)
    assert any("not a readable gzip stream" in u for u in report.unreadable)


def test_a_run_with_compressed_logs_is_checked_like_any_other(tmp_path):
    """`apf-emu run --log-compress gzip`: each process writes its own .jsonl.gz, and the run's verdict, check and
    stats read them."""
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "run", "--vcpus", "2", "--duration", "2",
                           "--log-compress", "gzip", "--log-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.split(".")[0] for n in names if n.endswith(".jsonl.gz")] == ["guest-0", "guest-1", "host"]
    assert "invariants: all" in proc.stdout
    check = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and " 0 violations" in check.stdout
