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

from apf_emu.cli import analyse
from apf_emu.logs import LogInputError, ReadReport, read_merged
from apf_emu.summary import stats_json
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


def test_a_line_whose_keys_are_lists_or_maps_is_not_an_event(tmp_path):
    """The checker and the statistics key on vm, vcpu, boot and token (KEY_FIELDS): such a line is reported as
    unreadable and skipped, and `apf-emu check` of it says so instead of crashing."""
    bad = [line(2, vm=["x"]), line(3, vcpu={"a": 1}), line(4, token=[1]), line(5, event=["e"]), line(6, boot={})]
    path = tmp_path / "host.jsonl"
    path.write_bytes(line(1, vm="v") + b"".join(bad) + line(7, vm="v"))
    report = ReadReport()
    assert [e["mono_ns"] for e in read_merged([str(path)], report)] == [1, 7]
    assert report.unreadable == [f"{path}:{n}" for n in range(2, 7)]
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 1, 2), proc.stderr


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


def _write_gzip(path: Path, monos: range, *, finish: bool = True) -> list[int]:
    """Lines written as a --log-compress gzip writer writes them; returns the file's size after each line."""
    ends = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        writer = LineWriter(fd, "gzip")
        for t in monos:
            writer.write(line(t, x=(t * 7919) % 1000003))
            ends.append(os.fstat(fd).st_size)
        if finish:
            writer.finish()
    finally:
        os.close(fd)
    return ends


def test_damaged_gzip_data_is_reported_and_what_precedes_it_kept(tmp_path):
    dst = tmp_path / "host.1.jsonl.gz"
    ends = _write_gzip(dst, range(1, 20000), finish=False)  # cut, as by a SIGKILL
    _write_gzip(dst, range(20000, 21000))  # the same file written again by a later writer: a second member
    data = bytearray(dst.read_bytes())
    at = ends[len(ends) // 2]
    data[at:at + 8] = b"\xff" * 8
    dst.write_bytes(bytes(data))
    report = ReadReport()
    monos = [e["mono_ns"] for e in read_merged([str(dst)], report)]
    intact = sum(1 for end in ends if end <= at)  # lines written wholly before the damage
    assert monos[:intact] == list(range(1, intact + 1))
    assert monos[-1000:] == list(range(20000, 21000))  # the next member is found again
    assert any("damaged gzip data" in u for u in report.unreadable)


def test_a_failed_compressed_write_loses_only_its_own_line(tmp_path, monkeypatch):
    """A full disk makes one write fail: the writer starts a new member, so every later line still reads right."""
    dst = tmp_path / "guest-0.1.jsonl.gz"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    writer = LineWriter(fd, "gzip")
    real_write = os.write
    for t in range(1, 100):
        if t == 50:
            monkeypatch.setattr(os, "write", lambda _fd, data: real_write(_fd, data[: len(data) // 2]))
            with pytest.raises(OSError):
                writer.write(line(t))
            monkeypatch.setattr(os, "write", real_write)
            continue
        writer.write(line(t))
    writer.finish()
    os.close(fd)
    report = ReadReport()
    monos = [e["mono_ns"] for e in read_merged([str(dst)], report)]
    assert monos == [t for t in range(1, 100) if t != 50]


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
