# The socket transport, host side: an exception and an interrupt are frames on the vCPU's own connection
# (`exception {vector, cr2}`, `interrupt {vector}`). The guest reads them while it waits for a reply (they are then
# pending until the exit ends) and, between instructions, with a non-blocking read.
from __future__ import annotations

import contextlib

import trio

from shared.channel import MessageChannel
from shared.wire import InjectException, Interrupt


class Notifier:
    transport = "socket"

    def __init__(self, chan: MessageChannel, ctl: memoryview, pid: int) -> None:
        self.chan = chan

    async def inject_exception(self, vector: int, cr2: int) -> None:
        await self.chan.send(InjectException(vector, cr2))

    async def interrupt(self, vector: int) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.chan.send(Interrupt(vector))

    def close(self) -> None:
        return None
