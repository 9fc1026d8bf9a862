# Structured logging shared by both sides: structlog rendering JSON lines with orjson (docs/LOGGING.md).
#
# Every line carries `event`, `timestamp` (ISO 8601 UTC), `mono_ns` (CLOCK_MONOTONIC, which is system-wide on Linux
# and so orders events across processes and containers), `level`, and the context each side binds: `role`, `vm`,
# `vcpu`, `boot`, `pid`. Event names follow KVM's tracepoints where the concept is KVM's.
#
# Each line is written with its own write(2) as soon as it is rendered: no process-local buffer, so a process killed
# with SIGKILL loses nothing it logged, and lines from processes appending to one file (a restarted host) never
# interleave (O_APPEND). A write of a few hundred bytes to the page cache costs about a microsecond and never waits
# for the disk, which keeps logging cheap enough for the APF hot path (measured in bench/).
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import orjson
import structlog


class JsonLinesSink:
    """The structlog "logger": takes rendered JSON bytes and writes each line at once to its file descriptors."""

    __slots__ = ("_fds", "_owned")

    def __init__(self, fds: list[int], owned: list[int]) -> None:
        self._fds = fds
        self._owned = owned

    def msg(self, message: bytes) -> None:
        line = message + b"\n"
        for fd in self._fds:
            try:  # noqa: SIM105 - the hot path: a bare try costs less than contextlib.suppress
                os.write(fd, line)
            except OSError:
                pass  # a closed stdout (the reader of a pipe went away) must not take the process down

    # structlog calls the method named after the level
    info = debug = warning = error = critical = exception = msg

    def close(self) -> None:
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._owned = []


_sink: JsonLinesSink | None = None


def _add_stamps(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["mono_ns"] = time.monotonic_ns()
    return event_dict


def configure(log_file: Path | None, *, stdout: bool = False) -> JsonLinesSink:
    """Set up structlog for this process. Call once, before the first log line."""
    global _sink
    fds: list[int] = []
    owned: list[int] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fds.append(fd)
        owned.append(fd)
    if stdout:
        fds.append(sys.stdout.fileno())
    if _sink is not None:
        _sink.close()
    sink = _sink = JsonLinesSink(fds, owned)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _add_stamps,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # `log.exception(...)`: the traceback as the `exception` field
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
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
