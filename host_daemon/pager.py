# Page-ins over time: the I/O around host_daemon/memory.py. A page-in is a trio task that waits for the page-in
# latency (the host's swap device, or a userfaultfd server, or a disk behind a DAX window) and then installs the
# page in one synchronous step of the memory model. Concurrent page-ins of one gfn share one task and one event.
#
# The asynchronous path (an APF) starts a page-in and lets the vCPU go; the synchronous path (`fault_in`, a vCPU
# halted until the page is in) waits for it. Neither ever waits for a guest: eviction does not (memory.py).
from __future__ import annotations

import random

import trio

from shared.config import PageInLatency

from .memory import GuestMemory


class Pager:
    def __init__(self, memory: GuestMemory, latency: PageInLatency, rng: random.Random) -> None:
        self.memory = memory
        self.latency = latency
        self.rng = rng
        self._page_ins: dict[int, trio.Event] = {}

    def paging_in(self, gfn: int) -> bool:
        return gfn in self._page_ins

    def start_page_in(self, gfn: int, nursery: trio.Nursery) -> trio.Event:
        """Start (or join) the asynchronous page-in of gfn; the event is set once it is present."""
        event = self._page_ins.get(gfn)
        if event is None:
            event = trio.Event()
            if self.memory.present(gfn):
                event.set()
            else:
                self._page_ins[gfn] = event
                nursery.start_soon(self._page_in, gfn, event)
        return event

    async def fault_in(self, gfn: int, nursery: trio.Nursery) -> None:
        """The synchronous path: returns once gfn is present."""
        while not self.memory.present(gfn):
            await self.start_page_in(gfn, nursery).wait()

    async def _page_in(self, gfn: int, event: trio.Event) -> None:
        try:
            await trio.sleep(self.latency.sample(self.rng))
            self.memory.install(gfn)
        finally:
            del self._page_ins[gfn]
            event.set()
