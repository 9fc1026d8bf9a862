# What the host shares with a guest besides guest RAM, and how: two memory objects, passed as file descriptors
# (SCM_RIGHTS) with the `welcome` frame, in this order:
#
#   1. the emulated EPT of the VM: one u32 per gfn, `(generation << 1) | present`. The host writes it; a guest can
#      only read it: it is a memfd sealed with F_SEAL_FUTURE_WRITE|SHRINK|GROW|SEAL after the host mapped it, so
#      the kernel refuses every writable shared mapping, write(2) and mprotect a guest may try. It is the copy the
#      host *publishes*: the host keeps the real residency state in its private backing store and never reads this
#      one back (host_daemon/memory.py). A guest access to a gfn whose entry is not present is the VM exit.
#   2. this vCPU's control block: one page, private to this connection (nobody else holds the fd):
#        word 0        in_access  guest  gfn + 1 while the vCPU is inside an access to gfn, else 0: what the host's
#                                        TLB shootdown looks at before it copies a page out
#        word 1        cr2        host   signal transport: CR2 of the last exception injected by signal
#        word 2        pf_seq     host   signal transport: incremented after cr2 and vector, before SIG_PF
#        word 3        vector     host   signal transport: the vector of that exception (14: #PF)
#        words 16-271  irr[v]     host   signal transport: raise counter of vector v, incremented before v's signal
#      A guest can write all of it, but what it writes reaches only itself: the host reads nothing here but
#      `in_access`, only while this connection lives, and uses it only to skip one eviction victim.
#
# Both objects are fresh per connection (the EPT per host instance), so their counters start at 0 and nothing of an
# earlier boot or an earlier host is ever read from them.
from __future__ import annotations

import mmap
import os
from typing import Final

from .guest_ram import PAGE_SIZE, page_align

EPT_PRESENT: Final = 1
CTL_SIZE: Final = PAGE_SIZE
CTL_IN_ACCESS: Final = 0
CTL_CR2: Final = 1
CTL_PF_SEQ: Final = 2
CTL_EXC_VECTOR: Final = 3
CTL_IRR: Final = 16
WELCOME_FDS: Final = 2  # the EPT, then the control block


def ept_size(pages: int) -> int:
    return page_align(pages * 4)


def ept_entry(generation: int, *, present: bool) -> int:
    return ((generation << 1) | (EPT_PRESENT if present else 0)) & 0xFFFF_FFFF


class MappedFd:
    """A shared mapping of a memory fd, as u32 words; the fd is closed once mapped. `close()` is idempotent."""

    def __init__(self, fd: int, size: int, *, writable: bool, what: str) -> None:
        try:
            found = os.fstat(fd).st_size
            if found < size:
                raise ValueError(f"the {what} passed by the host is {found} bytes, not {size}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.u32: memoryview = memoryview(self._map).cast("I")

    def close(self) -> None:
        if self._map is None:
            return
        self.u32.release()
        self._map.close()
        self._map = None


class GuestViews:
    """A guest's mappings of the two objects of `welcome`: the EPT read-only, its control block read-write."""

    def __init__(self, fds: list[int], pages: int) -> None:
        if len(fds) != WELCOME_FDS:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"welcome carried {len(fds)} file descriptors, not {WELCOME_FDS}")
        try:
            self.ept = MappedFd(fds[0], ept_size(pages), writable=False, what="EPT")
        except BaseException:
            os.close(fds[1])
            raise
        try:
            self.ctl = MappedFd(fds[1], CTL_SIZE, writable=True, what="control block")
        except BaseException:
            self.ept.close()
            raise

    def close(self) -> None:
        self.ept.close()
        self.ctl.close()
