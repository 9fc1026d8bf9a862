# Reading apf-emu JSON-lines logs: files, directories or stdin, merged into one stream ordered by `mono_ns`.
#
# Each process writes its own lines in order, so a k-way merge by mono_ns gives the global order. A process killed
# mid-write leaves a cut last line: it is skipped and reported, never fatal. Lines that are not apf-emu events
# (docker compose prefixes removed or not, stray prints) are counted as unreadable.
from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

Event = dict[str, Any]


@dataclass
class ReadReport:
    files: int = 0
    lines: int = 0
    truncated: list[str] = field(default_factory=list)  # "file:line" of cut last lines
    unreadable: list[str] = field(default_factory=list)  # "file:line" of other bad lines


class LogInputError(Exception):
    """A named input cannot be read at all."""


def expand(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if p == "-":
            out.append(p)
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.log"))
            if not files:
                raise LogInputError(f"{p}: no *.jsonl or *.log files in this directory")
            out.extend(str(f) for f in files)
        elif path.is_file():
            out.append(str(path))
        else:
            raise LogInputError(f"{p}: no such file or directory")
    return out


def _events(name: str, stream: IO[bytes], report: ReadReport) -> Iterator[Event]:
    lines = stream.read().split(b"\n")
    ends_clean = lines and lines[-1] == b""
    if ends_clean:
        lines.pop()
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        report.lines += 1
        start = raw.find(b"{")  # tolerate a "service | " prefix from compose logs
        try:
            if start < 0:
                raise ValueError("no JSON object")
            ev = orjson.loads(raw[start:])
            if not isinstance(ev, dict) or not isinstance(ev.get("mono_ns"), int) or "event" not in ev:
                raise ValueError("not an apf-emu event")
        except (ValueError, orjson.JSONDecodeError):
            where = f"{name}:{i + 1}"
            if i == last and not ends_clean:
                report.truncated.append(where)
            elif raw.strip():
                report.unreadable.append(where)
            continue
        yield ev


def read_merged(paths: Iterable[str], report: ReadReport | None = None) -> Iterator[Event]:
    """All events of all inputs, in mono_ns order."""
    report = report if report is not None else ReadReport()
    streams: list[Iterator[Event]] = []
    for name in expand(paths):
        report.files += 1
        if name == "-":
            streams.append(_sorted(_events("<stdin>", sys.stdin.buffer, report)))
        else:
            try:
                with open(name, "rb") as f:
                    streams.append(_sorted(_events(name, f, report)))
            except OSError as exc:
                raise LogInputError(f"{name}: {exc.strerror}") from None
    return heapq.merge(*streams, key=lambda e: e["mono_ns"])


def _sorted(events: Iterator[Event]) -> Iterator[Event]:
    # One file is usually one process (already ordered); stdin from `docker compose logs` interleaves several.
    evs = list(events)
    evs.sort(key=lambda e: e["mono_ns"])
    return iter(evs)
