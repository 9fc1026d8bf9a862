# How a guest vCPU touches guest RAM, and what a page holds.
#
# An access is the guest half of the TLB-shootdown handshake (host_daemon/memory.py has the other):
#   announce `in_access = gfn + 1` -> read the EPT entry -> not present: VM exit
#                                  -> present: read, verify, write the page -> re-read the EPT entry -> clear
# If the entry changed while we were inside (the host unmapped the page), whatever we read is discarded and the
# access is retried: a stale read is never accepted, and a write that may have missed the host's copy is redone.
#
# Page format (written by the workload, verified on every access): a 12-byte header `gfn, seq, writer` (u32 LE)
# and a body of one byte value derived from (gfn, seq); `writer` is (boot << 16) | (vcpu << 8) | task. A page never
# written is all zeros and counts as seq 0. A lost write shows as an older seq; a stale or poisoned read, or a torn
# copy, as a body or header that does not match. One exception: a page whose last writer was an earlier boot of
# this vCPU may be torn, because that boot may have been killed in the middle of writing it; the first access of
# a boot accepts it (and reports it as torn), as a kernel would find such a page after a crash.
from __future__ import annotations

import struct
from enum import Enum
from typing import Final

from shared.guest_ram import PAGE_SIZE, GuestRam

HEADER: Final = struct.Struct("<III")
BODY: Final = PAGE_SIZE - HEADER.size
PATTERNS: Final = [bytes([b]) * BODY for b in range(256)]
ZERO_PAGE: Final = bytes(PAGE_SIZE)


def pattern_byte(gfn: int, seq: int) -> int:
    return (gfn * 131 + seq * 7 + 1) & 0xFF


class Access(Enum):
    DONE = "done"
    EXIT = "exit"  # the EPT entry was not present: the VM exit
    RETRY = "retry"  # the page was unmapped under us: result discarded, do it again


class GuestMemoryAccess:
    def __init__(self, ram: GuestRam, vcpu: int) -> None:
        self.u32 = ram.u32
        self.mem = ram.mem
        self.ept0 = ram.layout.ept_index(0)
        self.in_access = ram.layout.in_access_index(vcpu)

    def present(self, gfn: int) -> bool:
        return bool(self.u32[self.ept0 + gfn] & 1)

    def update_page(
        self, gfn: int, accept: tuple[int, ...] | None, writer: int
    ) -> tuple[Access, int, bool, bool]:
        """Verify gfn holds one of the `accept`ed seqs (None: first access this boot), then write the next seq.

        Returns (status, seq written, verified ok, torn by an earlier boot). Only a DONE result counts.
        """
        u32, mem = self.u32, self.mem
        ix = self.ept0 + gfn
        u32[self.in_access] = gfn + 1
        entry = u32[ix]
        if not entry & 1:
            u32[self.in_access] = 0
            return Access.EXIT, 0, False, False
        off = gfn * PAGE_SIZE
        g, seq, _writer = HEADER.unpack_from(mem, off)
        if g == 0 and seq == 0 and _writer == 0:
            intact = bytes(mem[off : off + PAGE_SIZE]) == ZERO_PAGE
        else:
            intact = g == gfn and bytes(mem[off + HEADER.size : off + PAGE_SIZE]) == PATTERNS[pattern_byte(gfn, seq)]
        ok = intact and (accept is None or seq in accept)
        torn = not intact and accept is None and g == gfn and (_writer >> 16) != (writer >> 16)
        ok = ok or torn
        new_seq = ((seq if ok else max(accept) if accept else 0) + 1) & 0xFFFFFFFF
        HEADER.pack_into(mem, off, gfn, new_seq, writer)
        mem[off + HEADER.size : off + PAGE_SIZE] = PATTERNS[pattern_byte(gfn, new_seq)]
        changed = u32[ix] != entry
        u32[self.in_access] = 0
        if changed:
            return Access.RETRY, new_seq, False, False
        return Access.DONE, new_seq, ok, torn

    def store_u32(self, gpa: int, value: int) -> Access:
        """One aligned 32-bit store to guest memory, under the same EPT protocol (e.g. zeroing the APF area
        before APF is enabled, when its page is not pinned and may be swapped out)."""
        u32 = self.u32
        gfn = gpa // PAGE_SIZE
        ix = self.ept0 + gfn
        u32[self.in_access] = gfn + 1
        entry = u32[ix]
        if not entry & 1:
            u32[self.in_access] = 0
            return Access.EXIT
        u32[gpa >> 2] = value
        changed = u32[ix] != entry
        u32[self.in_access] = 0
        return Access.RETRY if changed else Access.DONE

    def leave(self) -> None:
        self.u32[self.in_access] = 0
