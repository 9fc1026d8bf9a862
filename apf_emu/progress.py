# The one live status line at the bottom of a terminal: `run` and `chaos` (elapsed, APFs/s, violations so far) and
# `campaign` (cases done, failing, running, ETA) redraw it in place, and every other line written to stderr while
# it is up (the children's stderr, a failing case) goes above it. When stderr is not a terminal (a pipe, a file, CI)
# nothing is drawn and lines pass through as they are: logs of a non-interactive run hold no escape codes.
# There is one terminal, so one line: `active` is the line being drawn, if any, and `write_above` is how the
# runner's stderr pumps write through it.
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from typing import TextIO

CLEAR = "\r\x1b[K"  # carriage return, erase to the end of the line


class StatusLine:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self.tty = tty
        self.text = ""

    def show(self, text: str) -> None:
        """Redraw the line (on a terminal; elsewhere nothing)."""
        if not self.tty:
            return
        width = max(20, shutil.get_terminal_size().columns - 1)
        self.text = text if len(text) <= width else text[:width - 1] + "…"
        self.stream.write(CLEAR + self.text)
        self.stream.flush()

    def say(self, line: str) -> None:
        """A line of its own, above the status line."""
        if self.tty:
            self.stream.write(CLEAR + line + "\n" + self.text)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.text:
            self.stream.write(CLEAR)
            self.stream.flush()
        self.text = ""


active: StatusLine | None = None


@contextlib.contextmanager
def status_line(stream: TextIO | None = None) -> Iterator[StatusLine]:
    """The terminal's status line while the block runs; erased at its end."""
    global active
    line = StatusLine(stream)
    active = line if line.tty else None
    try:
        yield line
    finally:
        active = None
        line.clear()


def write_above(data: bytes) -> None:
    """Whole lines for stderr (bytes, as a child wrote them), above the status line if one is drawn."""
    line = active
    if line is None:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
        return
    line.stream.write(CLEAR)
    line.stream.flush()
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()
    line.stream.write(line.text)
    line.stream.flush()
