# Reading apf-emu JSON-lines logs: files, directories or stdin, merged into one stream ordered by `mono_ns`.
#
# Each process writes its own lines in order, so a k-way merge by mono_ns gives the global order. A process killed
# mid-write leaves a cut last line: it is skipped and reported, never fatal. Compressed logs (`--log-compress gzip`,
# shared/logfile.py) are read the same way, decompressed as they stream; damaged compressed data is reported and
# the file is read around it (from the next gzip member on). Lines that are not apf-emu events
# (docker compose prefixes removed or not, stray prints) are counted as unreadable.
#
# A file (or stdin) of ftrace text, a real host's `trace-cmd report` or /sys/kernel/tracing/trace of the kvm APF
# tracepoints, is recognised by its first lines and read by apf_emu/ftrace/reader.py into host events of the same
# schema; its bad lines are reported as unreadable, with their number and why. One read takes one kind of input:
# apf-emu's logs, or traces (the checker judges each by what it can support).
#
# plan() finds once what each input is; merged() reads them, all of it or one shard's part of a check split by vCPU
# (apf_emu/shards.py, which also assumes files in order without scanning them and reads one again, sorted, if it
# goes back: OutOfOrder).
from __future__ import annotations

import heapq
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from shared.logfile import log_files, read_chunks

from .ftrace.reader import SNIFF_BYTES, FtraceReader, FtraceReport, looks_like_ftrace

Event = dict[str, Any]


@dataclass
class ReadReport:
    files: int = 0
    lines: int = 0
    truncated: list[str] = field(default_factory=list)  # "file:line" of cut last lines
    unreadable: list[str] = field(default_factory=list)  # "file:line" of other bad lines
    ftrace: FtraceReport | None = None  # what the inputs that were ftrace text held (None: there were none)


class Shard(Protocol):
    """What a reader of one shard's lines needs (apf_emu/shards.py's Shard): which shard it is, where the lines of
    no vCPU it does not count go, a line's route (its shard, or -1 for every shard) and the check of a parsed line
    against the route its bytes gave."""
    index: int
    uncounted: ReadReport

    def route_cached(self, raw: bytes) -> int: ...

    def verify(self, ev: Event, route: int) -> None: ...


class LogInputError(Exception):
    """A named input cannot be read at all."""


class OutOfOrder(Exception):
    """An input assumed in order (Input.scanned False) went back in time: read it again, sorted."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def expand(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if p == "-":
            out.append(p)
            continue
        path = Path(p)
        if path.is_dir():
            files = log_files(path)
            if not files:
                raise LogInputError(f"{p}: no *.jsonl, *.jsonl.gz or *.log files in this directory")
            out.extend(str(f) for f in files)
        elif path.is_file():
            out.append(str(path))
        else:
            raise LogInputError(f"{p}: no such file or directory")
    return out


def _events(name: str, lines: Iterable[bytes], report: ReadReport, shard: Shard | None = None) -> Iterator[Event]:
    """Events of one input's lines (each with its newline, but perhaps the last), lazily; with `shard`, only those
    of its vCPUs and those of no vCPU (apf_emu/shards.py)."""
    if shard is not None:
        yield from _shard_events(name, lines, report, shard)
        return
    for number, raw in enumerate(lines, 1):
        ev = parse_line(name, raw, number, report)
        if ev is not None:
            yield ev


# The fields the checker and the statistics key or index on: a line where one is a list or a map is not an event.
KEY_FIELDS = ("vm", "vcpu", "boot", "token", "gfn", "task", "cancelled")


def parse_line(name: str, raw: bytes, number: int, report: ReadReport) -> Event | None:
    report.lines += 1
    if raw.startswith(b"Attaching to "):  # the first line of `docker compose logs`/`up`: not a log line at all
        return None
    start = raw.find(b"{")  # tolerate a "service | " prefix from compose logs
    try:
        if start < 0:
            raise ValueError("no JSON object")
        ev = orjson.loads(raw[start:])
        if not isinstance(ev, dict) or not isinstance(ev.get("mono_ns"), int) or not isinstance(ev.get("event"), str):
            raise ValueError("not an apf-emu event")
        # a list or map anywhere means a "[" or a second "{" in the line: only then look at the key fields
        if (b"[" in raw or raw.find(b"{", start + 1) >= 0) and any(isinstance(ev.get(k), (list, dict))
                                                                   for k in KEY_FIELDS):
            raise ValueError("a key field is a list or a map")
    except (ValueError, orjson.JSONDecodeError):
        where = f"{name}:{number}"
        if not raw.endswith(b"\n"):  # only a file's last line can lack its newline: cut
            report.truncated.append(where)
        elif raw.strip():
            report.unreadable.append(where)
        return None
    return ev


def _shard_events(name: str, lines: Iterable[bytes], report: ReadReport, shard: Shard) -> Iterator[Event]:
    """_events for one shard: a line of another shard's vCPU is skipped unread (that shard counts it); a line of no
    vCPU is read by every shard and counted by the first."""
    route_of, index = shard.route_cached, shard.index
    for number, raw in enumerate(lines, 1):
        route = route_of(raw)
        if route >= 0 and route != index:
            continue
        ev = parse_line(name, raw, number, report if route >= 0 or index == 0 else shard.uncounted)
        if ev is not None:
            shard.verify(ev, route)
            yield ev


@dataclass
class Input:
    """One input, as read_merged found it: a file (or stdin's lines, read up front) of apf-emu logs or ftrace."""
    name: str
    ftrace: bool = False
    ordered: bool = True  # its mono_ns never go back: streamed, not sorted
    scanned: bool = True  # `ordered` was found by a scan; else it is assumed, and a read that finds otherwise
    # raises OutOfOrder (apf_emu/shards.py reads again, sorted)
    lines: list[bytes] | None = None  # stdin's


def sort_notes(report: ReadReport, inputs: list[Input]) -> None:
    """The report's cut and unreadable lines (and damage) in the order of the inputs and of their lines, however
    the reading was interleaved or split (apf_emu/shards.py)."""
    index = {inp.name: n for n, inp in enumerate(inputs)}

    def key(where: str) -> tuple[int, int]:
        name, _, number = where.rpartition(":")
        if number.isdigit() and name in index:
            return index[name], int(number)
        for n, inp in enumerate(inputs):  # "file: damaged gzip data ..."
            if where.startswith(inp.name + ":"):
                return n, -1
        return len(inputs), -1

    report.truncated.sort(key=key)
    report.unreadable.sort(key=key)


def read_merged(paths: Iterable[str], report: ReadReport | None = None) -> Iterator[Event]:
    """All events of all inputs, in mono_ns order."""
    report = report if report is not None else ReadReport()
    return merged(plan(paths, report), report)


def plan(paths: Iterable[str], report: ReadReport, *, scan: bool = True) -> list[Input]:
    """What each input is (LogInputError for one that cannot be read, or kinds that cannot be read together).
    `scan=False` assumes files in order rather than scanning them first (a reader that can start again)."""
    inputs: list[Input] = []
    kinds: set[str] = set()
    names = list(expand(paths))
    for name in names:
        report.files += 1
        if name == "-":
            lines = list(sys.stdin.buffer)
            ftrace = looks_like_ftrace(b"".join(lines[:200])[:SNIFF_BYTES])
            # `docker compose logs` interleaves several processes: sorted
            inputs.append(Input("<stdin>", ftrace=ftrace, ordered=False, lines=lines))
        else:
            try:
                ftrace = _is_ftrace(name)
                inputs.append(Input(name, ftrace=ftrace, ordered=ftrace or not scan or _in_order(name),
                                    scanned=ftrace or scan))
            except OSError as exc:
                raise LogInputError(f"{name}: {exc.strerror}") from None
        kinds.add("ftrace" if ftrace else "json")
        _one_kind(kinds)
    return inputs


def merged(inputs: list[Input], report: ReadReport, shard: Shard | None = None) -> Iterator[Event]:
    """The events of `inputs` (plan's), in mono_ns order; with `shard`, those it reads (apf_emu/shards.py)."""
    streams: list[Iterator[Event]] = []
    kinds: set[str] = set()
    scoped = len(inputs) > 1
    for inp in inputs:
        if inp.ftrace:
            lines = inp.lines if inp.lines is not None else _lines(inp.name, report)
            stream, kind = _ftrace_events(inp.name, lines, report, scoped=scoped)
            kinds.add(kind)
            _one_kind(kinds)
            streams.append(stream)
            continue
        damage = report if shard is None or shard.index == 0 else None
        raw = inp.lines if inp.lines is not None else _lines(inp.name, damage)
        # A file is written by one process at a time, in order: stream it (a long chaos run's logs are GBs).
        events = _events(inp.name, raw, report, shard)
        if not inp.ordered:
            events = _sorted(events)
        elif not inp.scanned:
            events = _in_order_or_raise(inp.name, events)
        streams.append(events)
    return heapq.merge(*streams, key=_mono_ns)


def _mono_ns(ev: Event) -> int:
    return ev["mono_ns"]  # type: ignore[no-any-return]


def _one_kind(kinds: set[str]) -> None:
    if kinds >= {"trace", "export"}:
        raise LogInputError("an apf-emu export and a real host's trace cannot be read together: the checker judges "
                            "them by different invariants (docs/TRACING.md)")
    if len(kinds) > 1:
        raise LogInputError("ftrace text and apf-emu logs cannot be read together: the checker judges a real trace "
                            "by what a host-side trace can support, and logs by every invariant (docs/TRACING.md)")


def _is_ftrace(name: str) -> bool:
    head = b""
    for chunk in read_chunks(name, []):
        head += chunk
        if len(head) >= SNIFF_BYTES:
            break
    return looks_like_ftrace(head[:SNIFF_BYTES])


def _ftrace_events(name: str, lines: Iterable[bytes], report: ReadReport, *,
                   scoped: bool = False) -> tuple[Iterator[Event], str]:
    """A trace's events, in time order (a trace whose clock is not global across CPUs can go back: sorted), and
    its kind: "export" (apf-emu's own) or "trace" (a real host's)."""
    if report.ftrace is None:
        report.ftrace = FtraceReport()
    before, lines_before = len(report.ftrace.bad), report.ftrace.lines
    reader = FtraceReader(name, report.ftrace, scoped=scoped)
    numbered = ((i, raw.decode("utf-8", "replace")) for i, raw in enumerate(lines, 1))
    events = list(reader.events(numbered))
    report.lines += report.ftrace.lines - lines_before
    report.unreadable.extend(report.ftrace.bad[before:])
    events.sort(key=lambda e: e["mono_ns"])
    return iter(events), "export" if reader.export else "trace"


def _lines(name: str, report: ReadReport | None) -> Iterator[bytes]:
    """A file's lines, each with its newline (but perhaps the last), decompressed if need be."""
    rest = b""
    damage = report.unreadable if report is not None else None
    for chunk in read_chunks(name, damage):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


_MONO = re.compile(rb'"mono_ns"\s*:\s*(-?\d+)')


def _in_order(name: str) -> bool:
    """Whether the file's mono_ns values never go back (a quick scan, without parsing JSON)."""
    last = -1
    rest = b""
    for chunk in read_chunks(name, []):  # (damage is reported by the read that follows)
        chunk = rest + chunk
        cut = chunk.rfind(b"\n") + 1
        rest = chunk[cut:]
        for m in _MONO.finditer(chunk, 0, cut):
            value = int(m.group(1))
            if value < last:
                return False
            last = value
    return True


def _in_order_or_raise(name: str, events: Iterator[Event]) -> Iterator[Event]:
    last = -1
    for ev in events:
        t = ev["mono_ns"]
        if t < last:
            raise OutOfOrder(name)
        last = t
        yield ev


def _sorted(events: Iterator[Event]) -> Iterator[Event]:
    evs = list(events)
    evs.sort(key=lambda e: e["mono_ns"])
    return iter(evs)
