# The host's guest-memory model: which pages are resident, how a page is evicted while vCPUs run, and how it comes
# back. Synchronous and without I/O waits: host_daemon/pager.py wraps it with page-in latency and trio events.
#
# Guest RAM has P pages; at most R of them are resident (the VM's memory cgroup). Residency lives in host-private
# memory, the master EPT in the backing store (host_daemon/backing_store.py): `(generation << 1) | present` per gfn.
# Guests see the *published* EPT (shared/views.py), which only this module writes, always right after the master,
# and which the host never reads back. Nothing a guest can write decides what the host does with a page: a guest
# can neither make the host page in over newer data nor keep a page resident that another vCPU needs evicted.
#
# Eviction races with guest accesses exactly as unmapping races with a running vCPU, and is handled the same way, by
# a TLB shootdown (KVM: `kvm_mmu_notifier_invalidate_range_start` zaps the SPTE and `kvm_flush_remote_tlbs` waits
# for every vCPU to leave guest mode; the guest side mirrors `mmu_invalidate_retry`, re-checking the generation).
# A guest announces `in_access = gfn + 1` in its control block, fences, reads the published entry, accesses the
# page, re-reads the entry and clears `in_access` (guest_agent/memory.py). The host evicts a victim V by:
#   1. skipping V if a live vCPU's `in_access` names it (the pre-check: no unmap, no churn for that vCPU);
#   2. unmap: master, then published entry := not present, generation + 1; full fence (shared/fence.py);
#   3. shootdown: if a live vCPU's `in_access` now names V (it entered between 1 and 2), cancel: map V again under
#      generation + 2 (that vCPU's re-check makes it retry its access) and try the next victim;
#   4. copy V to the backing store's free slot, commit it with one store, poison V in guest RAM.
# Steps 1-4 run without an await, so no other host task (a page-in, a fault, a connection ending) ever sees a
# victim half-evicted. Page-in (`install`) is likewise one synchronous step: if the master says the page is present
# (someone paged it in, or its eviction was cancelled) nothing is copied; otherwise room is made, the newest copy
# is copied in, and the entry is marked present (master, then published).
#
# The rules, and the interleavings they exclude:
# - A page is copied in from the backing store only when the master says it is not present, and the master says
#   so only after its newest contents were committed there (steps 2-4 are atomic for the host). So a fault on a
#   page whose eviction was cancelled never pages in an older copy over newer data (the lost write of a vCPU
#   stopped inside an access while another faults on the page). A vCPU that faults on such a page is answered
#   at once: the page is present.
# - A vCPU inside an access (running, stopped, slow) holds up the eviction of that one page only, for no time: the
#   host passes over it and evicts another. No other page and no other vCPU waits for it.
# - Only the control blocks of vCPUs connected now are read; a vCPU that goes away (killed, reset) releases what it
#   held when its connection ends. A value that names no page is ignored (logged once per connection).
# - If every resident page is pinned (an APF area) or held, the page-in proceeds above the limit (`overcommits`)
#   and later page-ins evict the excess: the limit is a knob of the emulation, a guest never waits for it.
# - After a host restart (--recover) guests that were attached to the dead host may still be running on its EPT
#   (they read the old published copy until they reconnect). Until each of them is back, or a newer boot took its
#   vCPU, or its process is gone (looked at on every page-in; a guest whose pid the host cannot see, in another
#   PID namespace, counts as gone only by a reconnect or a newer boot), this module evicts nothing (the recovery
#   window): a page they think present is present. Page-ins go above the limit meanwhile.
# Evicted contents go to the crash-consistent swap of host_daemon/backing_store.py, so a host killed at any point
# and restarted with --recover rebuilds this model from the master EPT and the swap's commit words.
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from shared.fence import full_fence
from shared.guest_ram import PAGE_SIZE, GuestRam
from shared.views import CTL_IN_ACCESS, EPT_PRESENT, ept_entry

from .backing_store import BackingStore
from .processes import pid_alive

POISON: Final = b"\xdb" * PAGE_SIZE  # what a guest would read from an evicted page if the shootdown were broken


@dataclass
class MemoryStats:
    page_ins: int = 0
    evictions: int = 0
    eviction_skips: int = 0  # victims passed over because a vCPU was inside an access to them
    shootdown_cancels: int = 0  # evictions undone because a vCPU entered the victim while it was being unmapped
    overcommits: int = 0  # page-ins that found no victim (all pinned or held, or the recovery window)
    recovered_pages: int = 0


class GuestMemory:
    def __init__(self, ram: GuestRam, ept: memoryview, backing: BackingStore, resident_limit: int, log: Any,
                 *, recover: bool = False) -> None:
        pages = ram.layout.pages
        if not 2 <= resident_limit < pages:
            raise ValueError(f"resident limit must be at least 2 and below the {pages} pages of guest RAM")
        self.ram = ram
        self.backing = backing
        self.resident_limit = resident_limit
        self.log = log
        self.stats = MemoryStats()
        self._pages = pages
        self._ept = ept
        self._fifo: deque[int] = deque()  # evictable resident pages, oldest first
        self._pinned: dict[int, int] = {}  # gfn -> pin count (pages holding an enabled APF area)
        self._resident = 0
        self._ctl: dict[int, memoryview] = {}  # vCPU -> u32 view of its control block, while it is connected
        self._garbage_reported: set[int] = set()
        self._awaiting: dict[int, int] = {}  # recovery window: vCPU -> pid (0: unknown) of a guest of the dead host
        if recover:
            self._recover()
        else:
            # Boot state: the first R pages resident, the rest swapped out (their contents: zeros, generation 0,
            # which is what a new swap object says).
            for gfn in range(pages):
                backing.set_residency(gfn, ept_entry(0, present=gfn < resident_limit))
            self._fifo.extend(range(resident_limit))
            self._resident = resident_limit
        for gfn in range(pages):
            self._ept[gfn] = backing.residency(gfn)

    def _recover(self) -> None:
        """Rebuild residency after a host restart from what survived: the master EPT and the swap's commit words."""
        backing = self.backing
        for gfn in range(self._pages):
            entry = backing.residency(gfn)
            if not entry & EPT_PRESENT and not backing.holds(gfn, entry >> 1):
                # An eviction that never committed: guest RAM still holds the page (it is poisoned only after the
                # commit). A page-in interrupted before marking the page present leaves the swap copy valid
                # instead, and the page stays out.
                backing.set_residency(gfn, ept_entry((entry >> 1) + 1, present=True))
                self.stats.recovered_pages += 1
            if backing.residency(gfn) & EPT_PRESENT:
                self._fifo.append(gfn)
                self._resident += 1
        self._awaiting = backing.connected_guests()
        if self._awaiting:
            self.log.warning("memory_recovery_window", awaiting=sorted(self._awaiting),
                             message="no eviction until the guests of the previous host are back or gone")

    # --- queries -------------------------------------------------------------------------------------------------
    def present(self, gfn: int) -> bool:
        return bool(self.backing.residency(gfn) & EPT_PRESENT)

    @property
    def resident(self) -> int:
        return self._resident

    @property
    def awaiting(self) -> list[int]:
        """vCPUs the recovery window still waits for."""
        return sorted(self._awaiting)

    # --- vCPUs ---------------------------------------------------------------------------------------------------
    def attach(self, vcpu: int, ctl: memoryview) -> None:
        """A vCPU connected: from now on its `in_access` holds up the eviction of the page it names."""
        self._ctl[vcpu] = ctl
        self._garbage_reported.discard(vcpu)
        self.vcpu_back(vcpu)

    def detach(self, vcpu: int, ctl: memoryview) -> None:
        """The vCPU's connection ended: it holds nothing any more (its guest is dead or will reconnect). `ctl` is the
        block that connection attached: a newer connection's block stays."""
        if self._ctl.get(vcpu) is ctl:
            del self._ctl[vcpu]

    def vcpu_back(self, vcpu: int) -> None:
        """The guest the previous host knew on this vCPU is back, or a newer boot replaced it."""
        if self._awaiting.pop(vcpu, None) is not None and not self._awaiting:
            self.log.info("memory_recovery_window", awaiting=[])

    def _window_open(self) -> bool:
        for vcpu, pid in list(self._awaiting.items()):
            if pid > 0 and not pid_alive(pid):
                self.vcpu_back(vcpu)
        return bool(self._awaiting)

    def _held(self) -> set[int]:
        """The gfns that connected vCPUs are inside an access to now."""
        held = set()
        for vcpu, ctl in self._ctl.items():
            marker = int(ctl[CTL_IN_ACCESS])
            if 0 < marker <= self._pages:
                held.add(marker - 1)
            elif marker and vcpu not in self._garbage_reported:
                self._garbage_reported.add(vcpu)
                self.log.warning("ctl_garbage", vcpu=vcpu, in_access=marker,
                                 message="in_access names no page of guest RAM; ignored")
        return held

    # --- page-in -------------------------------------------------------------------------------------------------
    def install(self, gfn: int) -> bool:
        """Bring gfn in from the backing store, making room first. False if it was present already."""
        if self.present(gfn):
            return False
        if self._awaiting:
            self._window_open()  # notice guests of the dead host that are gone, at every page-in
        self._make_room()
        off = gfn * PAGE_SIZE
        self.ram.mem[off : off + PAGE_SIZE] = self.backing.read(gfn)
        self._set(gfn, ept_entry((self.backing.residency(gfn) >> 1) + 1, present=True))
        self._resident += 1
        if gfn not in self._pinned:
            self._fifo.append(gfn)
        self.stats.page_ins += 1
        return True

    def _set(self, gfn: int, entry: int) -> None:
        """Master first, then the published copy: a page guests may see present is present in the master."""
        self.backing.set_residency(gfn, entry)
        self._ept[gfn] = entry

    # --- eviction ------------------------------------------------------------------------------------------------
    def _make_room(self) -> None:
        if self._resident < self.resident_limit:
            return
        if self._awaiting and self._window_open():
            self.stats.overcommits += 1
            return
        held = self._held()
        for _ in range(len(self._fifo)):
            if self._resident < self.resident_limit:
                return
            gfn = self._fifo.popleft()
            if gfn in self._pinned or not self.present(gfn):
                continue  # unpin puts a pinned page back; an absent one is not evictable
            if gfn in held or not self._evict(gfn):
                self.stats.eviction_skips += gfn in held
                self._fifo.append(gfn)
        if self._resident >= self.resident_limit:
            self.stats.overcommits += 1

    def _evict(self, gfn: int) -> bool:
        """Unmap, shoot down, copy out, poison. False if a vCPU entered the page meanwhile (the unmap is undone)."""
        gen = self.backing.residency(gfn) >> 1
        self._set(gfn, ept_entry(gen + 1, present=False))  # 2. unmap
        full_fence()
        if gfn in self._held():  # 3. shootdown: someone got in before the unmap was visible
            self._set(gfn, ept_entry(gen + 2, present=True))
            self.stats.shootdown_cancels += 1
            return False
        off = gfn * PAGE_SIZE
        self.backing.write(gfn, gen + 1, self.ram.mem[off : off + PAGE_SIZE])  # 4. copy out and commit
        self.ram.mem[off : off + PAGE_SIZE] = POISON
        self._resident -= 1
        self.stats.evictions += 1
        return True

    # --- pinning -------------------------------------------------------------------------------------------------
    def pin(self, gfn: int) -> None:
        """Keep a resident page resident (the caller faulted it in first)."""
        self._pinned[gfn] = self._pinned.get(gfn, 0) + 1

    def unpin(self, gfn: int) -> None:
        n = self._pinned.get(gfn, 0) - 1
        if n > 0:
            self._pinned[gfn] = n
        else:
            self._pinned.pop(gfn, None)
            if self.present(gfn) and gfn not in self._fifo:
                self._fifo.append(gfn)

