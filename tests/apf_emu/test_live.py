# apf_emu/live.py and apf_emu/progress.py: the live status of `run` and `chaos`. LiveCheck follows growing log files
# (lines cut mid-write are kept for the next poll), holds each event back until it is LAG_NS old, and feeds one
# checker in mono_ns order: what it finds is what a checker fed the same events finds. The status line is drawn
# on a terminal only; a real `apf-emu run` under a pseudo-terminal shows it.
from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import orjson

from apf_emu.checker import Checker
from apf_emu.live import LAG_NS, LiveCheck
from apf_emu.logs import read_merged
from apf_emu.progress import CLEAR, StatusLine

from .test_checker import duplicate_token

ROOT = Path(__file__).resolve().parents[2]


def test_live_check_feeds_what_the_watermark_allows_and_finds_what_a_checker_finds(clean_logs: Path,
                                                                                   tmp_path: Path) -> None:
    events = duplicate_token(list(read_merged([str(clean_logs)])))
    files = {"host.jsonl": [e for e in events if e["role"] != "guest"],
             "guest-0.jsonl": [e for e in events if e["role"] == "guest"]}
    data = {name: b"".join(orjson.dumps(e) + b"\n" for e in evs) for name, evs in files.items()}
    mid = events[len(events) // 2]["mono_ns"]
    live = LiveCheck(tmp_path)
    for name, raw in data.items():  # each file written up to the middle of the run, its last line cut
        upto = sum(len(orjson.dumps(e)) + 1 for e in files[name] if e["mono_ns"] <= mid)
        (tmp_path / name).write_bytes(raw[:upto + 7])
    live.poll(mid + LAG_NS // 2)  # only what is LAG_NS old is fed
    assert live.checker.events == sum(1 for e in events if e["mono_ns"] <= mid - LAG_NS // 2)
    for name, raw in data.items():
        (tmp_path / name).write_bytes(raw)
    live.poll(events[-1]["mono_ns"] + LAG_NS)
    assert live.checker.events == len(events) and live.report.unreadable == []
    reference = Checker()
    for ev in events:
        reference.feed(ev)
    assert live.violations == len(reference.violations) >= 1  # the duplicated token
    assert live.apfs == sum(1 for e in events if e["event"] == "kvm_async_pf_not_present"
                            and e.get("injected") is not False)
    assert live.text("apf-emu run", 3.0).endswith(f"{live.violations} violation{'s' * (live.violations > 1)} so far")


def test_the_status_line_is_drawn_on_a_terminal_only() -> None:
    tty = io.StringIO()
    line = StatusLine(tty, tty=True)
    line.show("3 s, 100 APFs/s")
    line.say("guest-0: a warning")
    line.clear()
    assert tty.getvalue() == (CLEAR + "3 s, 100 APFs/s" + CLEAR + "guest-0: a warning\n3 s, 100 APFs/s" + CLEAR)
    plain = io.StringIO()
    line = StatusLine(plain, tty=False)
    line.show("3 s")
    line.say("guest-0: a warning")
    line.clear()
    assert plain.getvalue() == "guest-0: a warning\n"


def test_a_run_on_a_terminal_shows_its_live_status(tmp_path: Path) -> None:
    main, sub = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "apf_emu", "run", "--duration", "3", "--log-dir", str(tmp_path)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sub)
    os.close(sub)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the run closed the terminal's last writer
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]
    status = [part for part in seen.decode(errors="replace").split(CLEAR) if part.startswith("apf-emu run:")]
    assert status, seen[-2000:]
    assert any("APFs/s" in s and "no violation so far" in s and " 0 APFs," not in s for s in status), status
    assert b"\x1b[K" not in out  # stdout (the summary) has no escape codes
