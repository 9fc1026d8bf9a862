# Page-ins over time: the I/O around host_daemon/memory.py. A page-in is a trio task that waits for the page-in
# latency (the host's swap device, or a userfaultfd server, or a disk behind a DAX window) and then installs the
# page in one synchronous step of the memory model. Concurrent page-ins of one gfn share one task and one result.
#
# A page-in can fail (`--page-in-errors`: a file behind a virtiofs DAX window truncated, a dead disk), as
# get_user_pages_remote() in async_pf_execute can: the page stays out and the waiters are told (`PageIn.failed`).
#
# The asynchronous path (an APF) starts a page-in and lets the vCPU go; the synchronous path (`fault_in`, a vCPU
# halted until the page is in) waits for it. Neither ever waits for a guest: eviction does not (memory.py).
from __future__ import annotations

import random

import trio

from shared.config import PageInErrors, PageInLatency

from .memory import GuestMemory


class PageIn:
    """One page-in of a gfn, shared by everyone who waits for it: done once the page is in or the page-in failed."""

    __slots__ = ("_done", "failed")

    def __init__(self) -> None:
        self._done = trio.Event()
        self.failed = False

    async def wait(self) -> None:
        await self._done.wait()

    def is_set(self) -> bool:
        return self._done.is_set()

    def finish(self, *, failed: bool) -> None:
        self.failed = failed
        self._done.set()


class Pager:
    def __init__(self, memory: GuestMemory, latency: PageInLatency, rng: random.Random,
                 errors: PageInErrors | None = None) -> None:
        self.memory = memory
        self.latency = latency
        self.rng = rng
        self.errors = errors or PageInErrors()
        self.failures = 0
        self._page_ins: dict[int, PageIn] = {}

    def paging_in(self, gfn: int) -> bool:
        return gfn in self._page_ins

    def start_page_in(self, gfn: int, nursery: trio.Nursery) -> PageIn:
        """Start (or join) the asynchronous page-in of gfn; it is done once the page is present, or failed."""
        page_in = self._page_ins.get(gfn)
        if page_in is None:
            page_in = PageIn()
            if self.memory.present(gfn):
                page_in.finish(failed=False)
            else:
                self._page_ins[gfn] = page_in
                nursery.start_soon(self._page_in, gfn, page_in)
        return page_in

    async def fault_in(self, gfn: int, nursery: trio.Nursery) -> bool:
        """The synchronous path: returns once gfn is present (True), or once its page-in failed (False)."""
        while not self.memory.present(gfn):
            page_in = self.start_page_in(gfn, nursery)
            await page_in.wait()
            if page_in.failed:
                return False
        return True

    async def _page_in(self, gfn: int, page_in: PageIn) -> None:
        failed = True
        try:
            delay = self.latency.sample(self.rng)
            if delay > 0:
                await trio.sleep(delay)
            else:  # a page-in of latency 0 is done when its task first runs (one scheduler pass less), unless cancelled
                await trio.lowlevel.checkpoint_if_cancelled()
            failed = self.errors.fails(gfn, self.rng)
            if failed:
                self.failures += 1
            else:
                self.memory.install(gfn)
        finally:
            del self._page_ins[gfn]
            page_in.finish(failed=failed)
