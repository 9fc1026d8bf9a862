# Page-ins over time: the I/O around host_daemon/memory.py. A page-in is a trio task that waits for the page-in
# latency (the host's swap device, or a userfaultfd server, or a disk behind a DAX window) and then installs the
# page in one synchronous step of the memory model. Concurrent page-ins of one gfn share one task and one event.
#
# The asynchronous path (an APF) starts a page-in and lets the vCPU go; the synchronous path (`fault_in`, a vCPU
# halted until the page is in) waits for it. Neither ever waits for a guest: eviction does not (memory.py).
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import trio

from .memory import GuestMemory


@dataclass(frozen=True, slots=True)
class PageInLatency:
    """A page-in latency distribution: `0`, `fixed:2ms`, `exp:2ms` (mean), `uniform:0.5ms:3ms`."""

    kind: str
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> PageInLatency:
        parts = spec.strip().lower().split(":")
        try:
            if parts == ["0"]:
                return cls("fixed", 0.0)
            kind, args = parts[0], [_seconds(p) for p in parts[1:]]
            if kind == "fixed" and len(args) == 1:
                return cls("fixed", args[0])
            if kind == "exp" and len(args) == 1:
                return cls("exp", args[0])
            if kind == "uniform" and len(args) == 2 and args[0] <= args[1]:
                return cls("uniform", args[0], args[1])
        except ValueError:
            pass
        raise ValueError(
            f"bad page-in latency {spec!r}: use 0, fixed:T, exp:MEAN or uniform:LO:HI with T like 2ms, 150us, 0.01s"
        )

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return rng.uniform(self.a, self.b)

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{self.a * 1e3:g}ms:{self.b * 1e3:g}ms"
        return f"{self.kind}:{self.a * 1e3:g}ms"


_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(s|ms|us|µs|ns)?", text)
    if not m:
        raise ValueError(text)
    value = float(m.group(1)) * _UNITS[m.group(2) or "ms"]
    if value > 60:
        raise ValueError(text)
    return value


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
