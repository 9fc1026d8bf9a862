# The live status of a long `run` or `chaos` on a terminal: elapsed time, APFs per second and the violations found
# so far, redrawn in the status line (apf_emu/progress.py) every second while the VM runs.
#
# LiveCheck follows the run's plain log files as they grow (a gzip log cannot be read until it is closed, so a
# --log-compress gzip run shows its elapsed time only), parses each new complete line as the log reader does, and
# feeds one checker in mono_ns order through a watermark: an event is fed once it is LAG_NS old, when every
# process that was running has written what it did before it (no log line is batched). What it counts is a
# glimpse; the verdict at the end is still the checker's over the whole logs (apf_emu/verdict.py).
from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

import trio

from .checker import Checker
from .logs import Event, ReadReport, parse_line
from .progress import StatusLine

LAG_NS: Final = 1_000_000_000
RATE_WINDOW_S: Final = 5.0
TICK_S: Final = 1.0
READ_AT_MOST: Final = 64 << 20  # bytes per file and tick: a backlog is worked off over several ticks


class LiveCheck:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.checker = Checker()
        self.report = ReadReport()
        self.apfs = 0
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._lines: dict[Path, int] = {}
        self._pending: list[tuple[int, int, Event]] = []
        self._seq = 0
        self._samples: deque[tuple[float, int]] = deque()

    @property
    def violations(self) -> int:
        return len(self.checker.violations)

    def poll(self, now_ns: int) -> None:
        """Read what the files gained since the last poll; feed the checker every event up to now - LAG_NS."""
        for path in sorted(self.log_dir.glob("*.jsonl")):
            self._read(path)
        watermark = now_ns - LAG_NS
        while self._pending and self._pending[0][0] <= watermark:
            _ns, _seq, ev = heapq.heappop(self._pending)
            self.checker.feed(ev)
            if ev["event"] == "kvm_async_pf_not_present" and ev.get("role") == "host" \
                    and ev.get("injected") is not False:
                self.apfs += 1
        self._samples.append((now_ns / 1e9, self.apfs))
        while len(self._samples) > 2 and self._samples[1][0] <= now_ns / 1e9 - RATE_WINDOW_S:
            self._samples.popleft()

    def rate(self) -> float:
        """APFs per second over the last few seconds of events fed."""
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _read(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read(READ_AT_MOST)
        except OSError:
            return  # a file the run replaced or removed: the final verdict reads what is there
        if not data:
            return
        self._offsets[path] = self._offsets.get(path, 0) + len(data)
        data = self._partial.pop(path, b"") + data
        *lines, rest = data.split(b"\n")
        if rest:
            self._partial[path] = rest
        number = self._lines.get(path, 0)
        for raw in lines:
            number += 1
            ev = parse_line(path.name, raw + b"\n", number, self.report)
            if ev is not None:
                self._seq += 1
                heapq.heappush(self._pending, (ev["mono_ns"], self._seq, ev))
        self._lines[path] = number

    def text(self, what: str, elapsed_s: float) -> str:
        n = self.violations
        found = f"{n} violation{'s' if n > 1 else ''} so far" if n else "no violation so far"
        return f"{what}: {elapsed_s:5.0f} s, {self.apfs} APFs, {self.rate():.0f} APFs/s, {found}"


async def show(log_dir: Path, what: str, line: StatusLine, clock: Callable[[], int] = time.monotonic_ns, *,
               task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
    """Until its scope (given to the starter) is cancelled: poll the logs in a worker thread (the runner's loop
    stays free) and redraw `line`."""
    live = LiveCheck(log_dir)
    start = clock()
    with trio.CancelScope() as scope:
        task_status.started(scope)
        while True:
            await trio.sleep(TICK_S)
            now = clock()
            await trio.to_thread.run_sync(live.poll, now)
            line.show(live.text(what, (now - start) / 1e9))
