# A message stream over a trio byte stream: shared/wire.py framing plus send/receive, for both sides.
#
# One reader per connection owns a FrameReader; sends are whole frames written with one send_all under a lock
# (trio forbids concurrent send_all on one stream, and a host task pushing an interrupt may race the handler that
# answers an exit). A frame that a Unix socket takes whole at once, with no send under way, is written directly
# with one non-blocking write(2), without trio's two scheduler passes: the APF cycle's three frames are its hot
# path (bench/). Only what the socket does not take goes through send_all.
#
# A frame may carry file descriptors (SCM_RIGHTS), as `welcome` does: they travel with the frame's first byte, so
# the receiver has them once it has read that frame (the same read may also have returned frames sent before it;
# shared/blocking_channel.py collects them per read).
from __future__ import annotations

import array
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio

from .wire import FrameReader, Message, Schema, WireError, decode, encode

RECEIVE_CHUNK = 65536


class MessageChannel:
    def __init__(self, stream: trio.abc.Stream, schema: Schema) -> None:
        self.stream = stream
        self._schema = schema
        self._reader = FrameReader()
        self._frames: deque[bytes] = deque()
        self._send_lock = trio.Lock()
        self.closed = False
        # the trio socket of a Unix SocketStream (non-blocking, as trio keeps it), for the direct send
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) \
            and stream.socket.family == socket.AF_UNIX else None

    async def send(self, msg: Message) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled sender sends nothing (no scheduler pass else)
        data = encode(msg)
        sock = self._sock
        if sock is not None and not self._send_lock.locked() and not self.closed and (fd := sock.fileno()) >= 0:
            try:
                sent = os.write(fd, data)  # write(2) on a socket is send(2) without flags; SIGPIPE is ignored
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            if sent == len(data):
                return
            data = data[sent:]
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_with_fds(self, fds: Sequence[int], msg: Message) -> None:
        """One frame with file descriptors attached (the stream must be a Unix socket stream)."""
        data = encode(msg)
        stream = self.stream
        assert isinstance(stream, trio.SocketStream)
        async with self._send_lock:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = await stream.socket.sendmsg([data], ancillary)
            if sent < len(data):
                await stream.send_all(data[sent:])

    async def receive(self) -> Any:
        """The next valid message (of the channel's schema), or None at a clean end of stream.

        Raises WireError for a bad frame; unless it is fatal the channel can go on being read.
        """
        while not self._frames:
            data = await self.stream.receive_some(RECEIVE_CHUNK)
            if not data:
                if self._reader.pending:
                    raise WireError("truncated", f"stream ended inside a frame ({self._reader.pending} bytes)",
                                    fatal=True)
                return None
            self._frames.extend(self._reader.feed(data))
        return decode(self._frames.popleft(), self._schema)

    @property
    def buffered(self) -> bool:
        """Frames already read and not yet received: the next receive returns without waiting."""
        return bool(self._frames)

    async def aclose(self) -> None:
        self.closed = True
        await self.stream.aclose()
