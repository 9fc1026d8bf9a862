# Structured logging shared by both sides: structlog rendering JSON lines with orjson (docs/LOGGING.md).
#
# Every line carries `event`, `timestamp` (ISO 8601 UTC), `mono_ns` (CLOCK_MONOTONIC, which is system-wide on Linux
# and so orders events across processes and containers), `level`, and the context each side binds: `role`, `vm`,
# `vcpu`, `boot`, `pid`. Event names follow KVM's tracepoints where the concept is KVM's.
#
# The log is on the APF hot path, so a log call only renders the line (orjson) and appends it to a process-local
# buffer. A periodic `flush_every` task hands the batch to a worker thread for the write, so the event loop never
# waits on the file; a buffer that grows past FLUSH_BYTES anyway (a loop too busy to flush) is written in place.
# At exit everything left is written. A process killed with SIGKILL loses at most its last batch, and its last
# line may be cut: the log checker tolerates both.
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from collections.abc import MutableMapping
from typing import IO, Any, Final

import orjson
import structlog
import trio

FLUSH_BYTES: Final = 4 * 1024 * 1024
FLUSH_INTERVAL_S: Final = 0.05


class JsonLinesSink:
    """The structlog "logger": takes rendered JSON bytes, writes lines to a file and/or stdout in batches."""

    __slots__ = ("_outs", "_buf", "_size")

    def __init__(self, outs: list[IO[bytes]]) -> None:
        self._outs = outs
        self._buf: list[bytes] = []
        self._size = 0

    def msg(self, message: bytes) -> None:
        self._buf.append(message)
        self._buf.append(b"\n")
        self._size += len(message) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()

    # structlog calls the method named after the level
    info = debug = warning = error = critical = exception = msg

    def take(self) -> bytes:
        """Remove and return the buffered lines.

        Swapping the list (not clearing it) keeps a line that a signal handler logs in between: it lands either in
        the batch taken or in the new buffer.
        """
        buf = self._buf
        self._buf = []
        self._size = 0
        return b"".join(buf)

    def write(self, data: bytes) -> None:
        if not data:
            return
        for out in self._outs:
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError):
                pass  # a closed stdout (e.g. the reader of a pipe went away) must not take the process down

    def flush(self) -> None:
        self.write(self.take())

    def close(self) -> None:
        self.flush()
        for out in self._outs:
            if out is not sys.stdout.buffer:
                try:
                    out.close()
                except OSError:
                    pass
        self._outs = []


_sink: JsonLinesSink | None = None


def _add_stamps(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["mono_ns"] = time.monotonic_ns()
    return event_dict


def configure(log_file: Path | None, *, stdout: bool = False) -> JsonLinesSink:
    """Set up structlog for this process. Call once, before the first log line."""
    global _sink
    outs: list[IO[bytes]] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        outs.append(open(log_file, "ab"))
    if stdout:
        outs.append(sys.stdout.buffer)
    if _sink is not None:
        _sink.close()
    sink = _sink = JsonLinesSink(outs)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _add_stamps,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
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


def flush() -> None:
    if _sink is not None:
        _sink.flush()


def close() -> None:
    global _sink
    if _sink is not None:
        _sink.close()
        _sink = None


async def flush_every(interval: float = FLUSH_INTERVAL_S) -> None:
    """Run in a nursery: keeps the log outputs at most `interval` behind the process, writing from a thread."""
    limiter = trio.CapacityLimiter(1)  # one writer at a time keeps the lines in order
    while True:
        await trio.sleep(interval)
        sink = _sink
        if sink is not None:
            data = sink.take()
            if data:
                await trio.to_thread.run_sync(sink.write, data, limiter=limiter)


class FlushThread:
    """For processes without an event loop (the guest vCPU): writes the buffered lines every `interval`."""

    def __init__(self, interval: float = FLUSH_INTERVAL_S) -> None:
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="log-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            sink = _sink
            if sink is not None:
                sink.write(sink.take())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        flush()


def start_flush_thread(interval: float = FLUSH_INTERVAL_S) -> FlushThread:
    return FlushThread(interval)
