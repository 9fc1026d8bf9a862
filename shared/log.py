# Structured logging shared by both sides: structlog rendering JSON lines with orjson (docs/LOGGING.md).
#
# Every line carries `event`, `timestamp` (ISO 8601 UTC), `mono_ns` (CLOCK_MONOTONIC, which is system-wide on Linux
# and so orders events across processes and containers), `level`, and the context each side binds: `role`, `vm`,
# `vcpu`, `boot`, `pid`. Event names follow KVM's tracepoints where the concept is KVM's.
#
# Each line is written with its own write(2) as soon as it is rendered: no process-local buffer, so a process killed
# with SIGKILL loses nothing it logged, and lines from processes appending to one file (a restarted host) never
# interleave (O_APPEND). With `--log-compress gzip` each line is compressed and flushed on its own
# (shared/logfile.py), into a file of this process's own. A write of a few hundred bytes to the page cache costs
# about a microsecond and never waits for the disk, which keeps logging cheap enough for the APF hot path (measured
# in bench/).
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from .logfile import LineWriter


class JsonLinesSink:
    """The structlog "logger": takes rendered JSON bytes and writes each line at once to its file descriptors."""

    __slots__ = ("_owned", "_writers")

    def __init__(self, writers: list[LineWriter], owned: list[LineWriter]) -> None:
        self._writers = writers
        self._owned = owned

    def msg(self, message: bytes) -> None:
        line = message + b"\n"
        for writer in self._writers:
            try:  # noqa: SIM105 - the hot path: a bare try costs less than contextlib.suppress
                writer.write(line)
            except OSError:
                pass  # a closed stdout (the reader of a pipe went away) must not take the process down

    # structlog calls the method named after the level
    info = debug = warning = error = critical = exception = msg

    def close(self) -> None:
        for writer in self._owned:
            with contextlib.suppress(OSError):
                writer.finish()
            with contextlib.suppress(OSError):
                os.close(writer.fd)
        self._writers = []
        self._owned = []


_sink: JsonLinesSink | None = None


_LEVELS: Final = {"warn": "warning", "exception": "error"}  # structlog's add_log_level names
_second: list[Any] = [None, ""]  # the last whole UTC second stamped, and its ISO 8601 text


def add_stamps(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`level`, `mono_ns` and `timestamp` in one step (what add_log_level and TimeStamper(fmt="iso", utc=True)
    write, with the text of the second formatted once per second: this runs for every line of the hot path)."""
    event_dict["level"] = _LEVELS.get(method, method)
    event_dict["mono_ns"] = time.monotonic_ns()
    seconds, ns = divmod(time.time_ns(), 1_000_000_000)
    if seconds != _second[0]:
        _second[0], _second[1] = seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    us = ns // 1000  # datetime.isoformat, which TimeStamper uses, leaves out a fraction of 0
    event_dict["timestamp"] = f"{_second[1]}.{us:06d}Z" if us else f"{_second[1]}Z"
    return event_dict


class FastBoundLogger(structlog.BoundLoggerBase):
    """structlog's bound logger (bind, new, unbind, the context) for the hot path of both sides: a line at INFO or
    above is the context, the event's fields, `event`, then add_stamps and, where there is exc_info, structlog's
    format_exc_info, rendered by orjson (anything it cannot render as its repr, as structlog's JSONRenderer does)
    and handed to the sink: the chain configure() would otherwise run processor by processor, done in one call
    (bench/ measured 5 µs a line through the chain, about half of it here). DEBUG lines are dropped."""

    def _emit(self, method: str, event: str, kw: dict[str, Any]) -> None:
        ev: MutableMapping[str, Any] = self._context.copy()
        ev.update(kw)
        ev["event"] = event
        add_stamps(None, method, ev)
        if "exc_info" in ev:
            ev = structlog.processors.format_exc_info(None, method, ev)
        self._logger.msg(orjson.dumps(ev, default=repr))

    def debug(self, event: str, **kw: Any) -> None:
        return None

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    warn = warning

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        self._emit("critical", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        kw.setdefault("exc_info", True)
        self._emit("error", event, kw)


def configure(log_file: Path | None, *, stdout: bool = False, compression: str = "none") -> JsonLinesSink:
    """Set up structlog for this process. Call once, before the first log line. `compression` applies to the file
    (shared/logfile.py names it: `log_path`); stdout is always plain."""
    global _sink
    writers: list[LineWriter] = []
    owned: list[LineWriter] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        writer = LineWriter(fd, compression)
        writers.append(writer)
        owned.append(writer)
    if stdout:
        writers.append(LineWriter(sys.stdout.fileno()))
    if _sink is not None:
        _sink.close()
    sink = _sink = JsonLinesSink(writers, owned)
    structlog.configure(
        processors=[],  # FastBoundLogger stamps and renders each line itself
        wrapper_class=FastBoundLogger,
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    return sink


def get_logger(role: str, vm: str, *, vcpu: int | None = None, boot: int | None = None) -> Any:
    """A bound logger carrying the schema's context fields."""
    return structlog.get_logger().bind(role=role, vm=vm, vcpu=vcpu, boot=boot, pid=os.getpid())


def close() -> None:
    global _sink
    if _sink is not None:
        _sink.close()
        _sink = None
