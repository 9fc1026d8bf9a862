# The host's guest-memory model: which pages are resident, where evicted contents go, how long a page-in takes.
#
# Guest RAM has P pages; at most R of them are resident (the VM's memory cgroup). Residency is what the guest sees in
# the emulated EPT (shared/guest_ram.py): an entry is `(generation << 1) | present`. Only the host writes it.
#
# Eviction races with guest accesses exactly as unmapping races with a running vCPU, and is handled the same way, with
# a TLB shootdown:
#   1. unmap: write the EPT entry not-present with a new generation;
#   2. shootdown: wait until no vCPU's `in_access` names this gfn. A guest announces `in_access = gfn + 1` *before*
#      it reads the EPT entry and clears it after its access, so any access that could have seen the old mapping has
#      finished when the wait ends, and every later one sees the page not present and exits;
#   3. only then copy the page to the backing store and poison it in guest RAM.
# The guest also re-reads the EPT entry after its access and retries if it changed (guest_agent/memory.py): a
# second, independent line of defence against a stale read, since Python cannot emit the store-load fence the
# announce/unmap handshake needs on x86-TSO in theory (in practice the host's wait spans a trio checkpoint and the
# guest's access hundreds of Python instructions). tests/integration/test_shootdown.py hammers both at full speed.
#
# A vCPU that stays inside an access (SIGSTOPped guest) would block eviction of that one page: after a bounded wait
# the host remaps the page under a new generation and picks another victim.
#
# Evicted contents go to the crash-consistent swap of host_daemon/backing_store.py, so a host killed at any point
# and restarted with --recover rebuilds this model from the EPT and the swap's commit words (`recover`).
from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import trio

from shared.abi import MAX_VCPUS
from shared.guest_ram import EPT_PRESENT, PAGE_SIZE, VCPU_CTL_SIZE, GuestRam

from .backing_store import BackingStore

POISON: Final = b"\xdb" * PAGE_SIZE  # what a guest would read from an evicted page if the shootdown were broken
SHOOTDOWN_MAX_YIELDS: Final = 2000


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


@dataclass
class MemoryStats:
    page_ins: int = 0
    evictions: int = 0
    shootdown_waits: int = 0
    shootdown_aborts: int = 0
    recovered_pages: int = 0


@dataclass
class GuestMemory:
    ram: GuestRam
    resident_limit: int
    latency: PageInLatency
    rng: random.Random
    backing: BackingStore
    recover: bool = False
    stats: MemoryStats = field(default_factory=MemoryStats)

    def __post_init__(self) -> None:
        pages = self.ram.layout.pages
        if not 2 <= self.resident_limit < pages:
            raise ValueError(f"resident limit must be at least 2 and below the {pages} pages of guest RAM")
        self._ept0 = self.ram.layout.ept_index(0)
        self._in_access0 = self.ram.layout.in_access_index(0)
        self._fifo: deque[int] = deque()  # evictable resident pages, oldest first
        self._pinned: dict[int, int] = {}  # gfn -> pin count (pages holding an enabled APF area)
        self._resident = 0
        self._page_ins: dict[int, trio.Event] = {}
        self._install_lock = trio.Lock()
        u32 = self.ram.u32
        if self.recover:
            self._recover()
            return
        # Boot state: the first R pages resident, the rest swapped out (their contents: zeros, generation 0, which
        # is what a new swap object says).
        for gfn in range(pages):
            u32[self._ept0 + gfn] = EPT_PRESENT if gfn < self.resident_limit else 0
        self._fifo.extend(range(self.resident_limit))
        self._resident = self.resident_limit

    def _recover(self) -> None:
        """Rebuild residency after a host restart from what survived: the EPT and the swap's commit words."""
        u32 = self.ram.u32
        for gfn in range(self.ram.layout.pages):
            ix = self._ept0 + gfn
            entry = u32[ix]
            if not entry & EPT_PRESENT and not self.backing.holds(gfn, entry >> 1):
                # An eviction that never committed (or a page-in that did not finish marking it present, which
                # leaves the swap copy valid and lands in the branch below instead): guest RAM still holds the page.
                u32[ix] = ((entry >> 1) + 1) << 1 | EPT_PRESENT
                self.stats.recovered_pages += 1
            if u32[ix] & EPT_PRESENT:
                self._fifo.append(gfn)
                self._resident += 1

    # --- queries -------------------------------------------------------------------------------------------------
    def present(self, gfn: int) -> bool:
        return bool(self.ram.u32[self._ept0 + gfn] & EPT_PRESENT)

    def paging_in(self, gfn: int) -> bool:
        return gfn in self._page_ins

    @property
    def resident(self) -> int:
        return self._resident

    # --- page-in -------------------------------------------------------------------------------------------------
    def start_page_in(self, gfn: int, nursery: trio.Nursery) -> trio.Event:
        """Start (or join) the asynchronous page-in of gfn; the event is set once it is present."""
        event = self._page_ins.get(gfn)
        if event is None:
            event = self._page_ins[gfn] = trio.Event()
            if self.present(gfn):
                del self._page_ins[gfn]
                event.set()
            else:
                nursery.start_soon(self._page_in, gfn, event)
        return event

    async def fault_in(self, gfn: int, nursery: trio.Nursery) -> None:
        """The synchronous path: returns once gfn is present."""
        while not self.present(gfn):
            await self.start_page_in(gfn, nursery).wait()

    async def _page_in(self, gfn: int, event: trio.Event) -> None:
        try:
            await trio.sleep(self.latency.sample(self.rng))
            async with self._install_lock:
                while self._resident >= self.resident_limit:
                    await self._evict_one()
                off = gfn * PAGE_SIZE
                self.ram.mem[off : off + PAGE_SIZE] = self.backing.read(gfn)
                ix = self._ept0 + gfn
                self.ram.u32[ix] = ((self.ram.u32[ix] >> 1) + 1) << 1 | EPT_PRESENT
                self._resident += 1
                if gfn not in self._pinned:
                    self._fifo.append(gfn)
                self.stats.page_ins += 1
        finally:
            del self._page_ins[gfn]
            event.set()

    # --- eviction ------------------------------------------------------------------------------------------------
    async def _evict_one(self) -> None:
        for _ in range(len(self._fifo)):
            gfn = self._fifo.popleft()
            if gfn in self._pinned or not self.present(gfn):
                continue
            if await self.evict(gfn):
                return
            self._fifo.append(gfn)
            await trio.sleep(0)
        raise RuntimeError("no evictable page: every resident page is pinned or busy")

    async def evict(self, gfn: int) -> bool:
        """Unmap, shoot down, copy out, poison. False if a vCPU stayed inside an access to gfn too long."""
        u32 = self.ram.u32
        ix = self._ept0 + gfn
        gen = u32[ix] >> 1
        u32[ix] = (gen + 1) << 1  # 1. unmap
        marker = gfn + 1
        yields = 0
        while marker in self._in_access_snapshot():  # 2. shootdown
            if yields == 0:
                self.stats.shootdown_waits += 1
            yields += 1
            if yields > SHOOTDOWN_MAX_YIELDS:
                u32[ix] = (gen + 2) << 1 | EPT_PRESENT
                self.stats.shootdown_aborts += 1
                return False
            await trio.sleep(0)
        off = gfn * PAGE_SIZE
        self.backing.write(gfn, gen + 1, self.ram.mem[off : off + PAGE_SIZE])  # 3. copy out and commit
        self.ram.mem[off : off + PAGE_SIZE] = POISON
        self._resident -= 1
        self.stats.evictions += 1
        return True

    def _in_access_snapshot(self) -> list[int]:
        step = VCPU_CTL_SIZE // 4
        return self.ram.u32[self._in_access0 : self._in_access0 + MAX_VCPUS * step : step].tolist()

    def clear_in_access(self, vcpu: int) -> None:
        """A vCPU went away: it is inside no access any more."""
        self.ram.u32[self._in_access0 + vcpu * (VCPU_CTL_SIZE // 4)] = 0

    # --- pinning -------------------------------------------------------------------------------------------------
    def pin(self, gfn: int) -> None:
        self._pinned[gfn] = self._pinned.get(gfn, 0) + 1

    def unpin(self, gfn: int) -> None:
        n = self._pinned.get(gfn, 0) - 1
        if n > 0:
            self._pinned[gfn] = n
        else:
            self._pinned.pop(gfn, None)
            if self.present(gfn) and gfn not in self._fifo:
                self._fifo.append(gfn)
