# The blocking twin of shared/channel.py: a message stream over a plain Unix socket, for whoever plays a guest with a
# blocking vCPU loop: the guest agent's transport, the scripted guests of the tests, the benchmarks.
#
# Reads use recvmsg so that file descriptors sent with a frame (SCM_RIGHTS: the EPT and the control block that come
# with `welcome`) are collected as they arrive; `take_fds` hands them over. Descriptors nobody takes are closed
# with the channel, so a peer cannot make us leak them.
from __future__ import annotations

import array
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from .wire import HOST_TO_GUEST, FrameReader, Message, Schema, WireError, decode, encode

RECEIVE_CHUNK = 65536
MAX_FDS = 8  # per read; the host sends at most 2


class ChannelClosed(Exception):
    """The peer closed the connection (or it broke) between frames."""


class NoHost(Exception):
    """Nothing listens on the socket path (yet)."""


def connect(path: Path, timeout: float) -> socket.socket:
    """Connect to a Unix socket, retrying while nothing listens there yet (a host starting or restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise NoHost(f"no host listening on {path} after {timeout} s") from None
            time.sleep(0.02)


class BlockingChannel:
    def __init__(self, sock: socket.socket, schema: Schema = HOST_TO_GUEST) -> None:
        self.sock = sock
        self._schema = schema
        self._reader = FrameReader()
        self.frames: deque[bytes] = deque()
        self._fds: list[int] = []
        self._cmsg_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

    def send(self, msg: Message) -> None:
        try:
            self.sock.sendall(encode(msg))
        except OSError as exc:
            raise ChannelClosed(f"sending {msg.TYPE} failed: {exc}") from None

    def fill(self, *, block: bool) -> bool:
        """Read what the socket has into frames. False if nothing was there (non-blocking reads only)."""
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                RECEIVE_CHUNK, self._cmsg_space, 0 if block else socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return False
        except TimeoutError:
            raise  # a socket timeout set by the caller (tests): not a closed connection
        except OSError as exc:
            raise ChannelClosed(f"connection failed: {exc}") from None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            if self._reader.pending:
                raise WireError("truncated", f"stream ended inside a frame ({self._reader.pending} bytes)", fatal=True)
            raise ChannelClosed("the peer closed the connection")
        self.frames.extend(self._reader.feed(data))
        return True

    def receive(self, *, block: bool = True) -> Any:
        """The next message; None only for a non-blocking read that found nothing."""
        while not self.frames:
            if not self.fill(block=block):
                return None
        return decode(self.frames.popleft(), self._schema)

    def request(self, msg: Message) -> Any:
        self.send(msg)
        reply = self.receive()
        assert reply is not None
        return reply

    def take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)
        self.sock.close()
