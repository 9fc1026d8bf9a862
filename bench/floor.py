"""Transport floors: the raw round trip of each transport between two processes, with the same code paths as the
emulator minus the protocol (no MSR or fault logic, no logging).

- socket: the client writes a frame with shared.wire.encode on a blocking Unix socket (as a guest agent does) and
  a trio server reading through shared.channel.MessageChannel (as the host daemon does) answers with a frame.
- signal: the same request frame, but the trio server answers with pidfd_send_signal(SIGRTMIN) (as the host's
  signal notifier injects a #PF) and the client wakes from select() on its signal wakeup fd (as a guest agent does).

Usage: python -m bench.floor [--round-trips N]    (prints median and p99 in microseconds)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hdrh.histogram import HdrHistogram

from shared.signals import SIG_PF
from shared.wire import HOST_TO_GUEST, FrameReader, MsrResult, MsrWrite, decode, encode

ROOT = Path(__file__).resolve().parents[1]


def histogram() -> HdrHistogram:
    return HdrHistogram(1, 60_000_000_000, 3)  # ns


# --- the server (a child process) -------------------------------------------------------------------------------
async def _serve(path: str, mode: str) -> None:
    import trio

    from shared.channel import MessageChannel
    from shared.wire import GUEST_TO_HOST

    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    sock, _ = await listener.accept()
    chan = MessageChannel(trio.SocketStream(sock), GUEST_TO_HOST)
    pidfd = None
    while (msg := await chan.receive()) is not None:
        if mode == "socket":
            await chan.send(MsrResult(msg.msr, True, None))
        else:
            if pidfd is None:
                pidfd = os.pidfd_open(msg.value)
            signal.pidfd_send_signal(pidfd, SIG_PF)


def serve_main(path: str, mode: str) -> None:
    import trio

    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C of the whole benchmark: stop quietly
        trio.run(_serve, path, mode)


# --- the client -------------------------------------------------------------------------------------------------
def measure(mode: str, round_trips: int = 5000, warmup: int = 500) -> HdrHistogram:
    """Round-trip times (ns) of `mode` ("socket" or "signal")."""
    with tempfile.TemporaryDirectory(prefix="apf-floor-") as tmp:
        path = os.path.join(tmp, "floor.sock")
        server = subprocess.Popen([sys.executable, "-m", "bench.floor", "--serve", mode, path], cwd=ROOT)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the floor server did not start") from None
                    time.sleep(0.01)
            hist = histogram()
            if mode == "socket":
                _socket_round_trips(sock, hist, round_trips, warmup)
            else:
                _signal_round_trips(sock, hist, round_trips, warmup)
        finally:
            sock.close()  # the server ends with our connection
            try:
                server.wait(10)
            except BaseException:
                server.kill()
                server.wait()
                raise
    return hist


def _socket_round_trips(sock: socket.socket, hist: HdrHistogram, n: int, warmup: int) -> None:
    reader = FrameReader()
    frame = encode(MsrWrite(0x4B564D07, 1))
    for i in range(n + warmup):
        t0 = time.monotonic_ns()
        sock.sendall(frame)
        frames: list[bytes] = []
        while not frames:
            frames = reader.feed(sock.recv(65536))
        decode(frames[0], HOST_TO_GUEST)
        if i >= warmup:
            hist.record_value(time.monotonic_ns() - t0)


def _signal_round_trips(sock: socket.socket, hist: HdrHistogram, n: int, warmup: int) -> None:
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    old_handler = signal.signal(SIG_PF, lambda *_: None)
    frame = encode(MsrWrite(0x4B564D07, os.getpid()))
    try:
        for i in range(n + warmup):
            t0 = time.monotonic_ns()
            sock.sendall(frame)
            select.select([wake_r], [], [])
            wake_r.recv(64)
            if i >= warmup:
                hist.record_value(time.monotonic_ns() - t0)
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(SIG_PF, old_handler)
        wake_r.close()
        wake_w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--round-trips", type=int, default=5000)
    args = p.parse_args()
    if args.serve:
        serve_main(args.serve[1], args.serve[0])
        return
    for mode in ("socket", "signal"):
        h = measure(mode, args.round_trips)
        print(f"{mode:7} round trip  p50 {h.get_value_at_percentile(50) / 1000:7.1f} us  "
              f"p99 {h.get_value_at_percentile(99) / 1000:7.1f} us  (n={h.get_total_count()})")


if __name__ == "__main__":
    main()
