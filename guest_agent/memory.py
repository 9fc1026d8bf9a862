# How a guest vCPU touches guest RAM, and what a page holds.
#
# An access is the guest half of the TLB-shootdown handshake (host_daemon/memory.py has the other):
#   announce `in_access = gfn + 1` in the control block -> fence -> read the published EPT entry
#     -> not present: clear `in_access`, VM exit
#     -> present: read, verify, write the page -> re-read the EPT entry -> clear `in_access`
# If the entry changed while we were inside (the host unmapped the page and remapped it, or evicted it), whatever we
# read is discarded and the access is retried: a stale read is never accepted, and a write that may have missed the
# host's copy is redone. The EPT and the control block are the views the host passed with `welcome`
# (shared/views.py); a reconnect after a host restart brings new ones (`rebind`).
#
# Two page formats, both verified on every access:
# - A private page belongs to one task: a 12-byte header `gfn, seq, writer` (u32 LE) and a body of one byte value
#   derived from (gfn, seq); `writer` is (boot << 16) | (vcpu << 8) | task. A page never written is all zeros
#   (seq 0). A lost write shows as an older seq; a stale or poisoned read, or a torn copy, as a body or header that
#   does not match.
# - A shared page (the first few gfns after the APF areas, shared_pages()) is read and written by every vCPU, as
#   kernel data is: 64 slots of 64 bytes, slot v written only by vCPU v (by whichever of its tasks runs), as
#   `seq_a, gfn, writer, body[48], seq_b` with seq_a stored first and seq_b last. A vCPU verifies its own slot
#   exactly (it knows what it last wrote there) and up to OTHER_SLOTS other vCPUs' slots, in turn, as a seqlock
#   reader: read seq_b, the rest, then seq_a; equal seqs mean a complete copy, whose gfn and body must then match;
#   unequal ones mean that vCPU is writing right now (or died writing), and the slot is not judged. x86-TSO keeps
#   stores in order and loads in order, which is all a seqlock needs. (With up to 4 vCPUs every other slot is read
#   on every access; with more, the cost of an access stays bounded and each slot is still read every few accesses.)
# One exception for both: data whose last writer was an earlier boot of this vCPU may be torn, because that boot may
# have been killed in the middle of writing it; the first access of a boot accepts it (and reports it as torn), as a
# kernel would find such a page after a crash.
from __future__ import annotations

import struct
from enum import Enum
from typing import Final

from shared.abi import MAX_VCPUS
from shared.fence import full_fence
from shared.guest_ram import PAGE_SIZE, GuestRam
from shared.views import CTL_IN_ACCESS, EPT_PRESENT, GuestViews

HEADER: Final = struct.Struct("<III")
BODY: Final = PAGE_SIZE - HEADER.size
PATTERNS: Final = [bytes([b]) * BODY for b in range(256)]
ZERO_PAGE: Final = bytes(PAGE_SIZE)
SLOT_SIZE: Final = PAGE_SIZE // MAX_VCPUS  # 64
SLOT_BODY: Final = SLOT_SIZE - 16  # between seq_a, gfn, writer (12 bytes) and seq_b (4)
SLOT_PATTERNS: Final = [bytes([b]) * SLOT_BODY for b in range(256)]
ZERO_BODY: Final = bytes(SLOT_BODY)
OTHER_SLOTS: Final = 3  # other vCPUs' slots judged per access to a shared page


def pattern_byte(gfn: int, seq: int) -> int:
    return (gfn * 131 + seq * 7 + 1) & 0xFF


def slot_pattern_byte(gfn: int, slot: int, seq: int) -> int:
    return (gfn * 131 + slot * 37 + seq * 7 + 1) & 0xFF


def shared_pages(pages: int) -> range:
    """The gfns every vCPU shares: 1/32 of guest RAM, 1 to 64 pages, right after gfn 0 (the APF areas)."""
    return range(1, 1 + max(1, min(64, pages // 32)))


class Access(Enum):
    DONE = "done"
    EXIT = "exit"  # the EPT entry was not present: the VM exit
    RETRY = "retry"  # the page was unmapped under us: result discarded, do it again


class SlotCheck:
    """What an access to a shared page found in the other vCPUs' slots."""

    __slots__ = ("bad", "good", "torn")

    def __init__(self) -> None:
        self.bad: list[int] = []  # slots whose complete copy did not match its seq
        self.good = 0  # slots whose complete copy matched
        self.torn = 0  # slots caught mid-write (not judged)


class GuestMemoryAccess:
    def __init__(self, ram: GuestRam, views: GuestViews, vcpus: int = 1) -> None:
        self.u32 = ram.u32
        self.mem = ram.mem
        self.vcpus = vcpus
        self._next_other = 0  # where the next access to a shared page starts reading the other slots
        self.rebind(views)

    def rebind(self, views: GuestViews) -> None:
        """Use the EPT and control block of a new connection (a host that restarted)."""
        self.ept = views.ept.u32
        self.ctl = views.ctl.u32

    def present(self, gfn: int) -> bool:
        return bool(self.ept[gfn] & EPT_PRESENT)

    def _enter(self, gfn: int) -> int | None:
        """Announce the access and read the EPT entry; None (and nothing announced) if it is not present."""
        self.ctl[CTL_IN_ACCESS] = gfn + 1
        full_fence()  # the store above must be visible before the load below (shared/fence.py)
        entry = int(self.ept[gfn])
        if not entry & EPT_PRESENT:
            self.ctl[CTL_IN_ACCESS] = 0
            return None
        return entry

    def _leave(self, gfn: int, entry: int) -> bool:
        """End the access; True if the page stayed mapped throughout (the result counts)."""
        same = self.ept[gfn] == entry
        self.ctl[CTL_IN_ACCESS] = 0
        return same

    def update_page(
        self, gfn: int, accept: tuple[int, ...] | None, writer: int
    ) -> tuple[Access, int, bool, bool]:
        """Verify private page gfn holds one of the `accept`ed seqs (None: first access this boot), then write the
        next seq. Returns (status, seq written, verified ok, torn by an earlier boot). Only DONE counts."""
        entry = self._enter(gfn)
        if entry is None:
            return Access.EXIT, 0, False, False
        mem = self.mem
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
        if not self._leave(gfn, entry):
            return Access.RETRY, new_seq, False, False
        return Access.DONE, new_seq, ok, torn

    def update_shared(
        self, gfn: int, slot: int, accept: tuple[int, ...] | None, writer: int, others: SlotCheck
    ) -> tuple[Access, int, bool, bool]:
        """Like update_page for this vCPU's `slot` of shared page gfn; also judges the other vCPUs' slots into
        `others` (counted only for a DONE access)."""
        entry = self._enter(gfn)
        if entry is None:
            return Access.EXIT, 0, False, False
        u32, mem = self.u32, self.mem
        others_to_read = [v for v in range(self.vcpus) if v != slot]
        if len(others_to_read) > OTHER_SLOTS:
            start = self._next_other % len(others_to_read)
            self._next_other = start + OTHER_SLOTS
            others_to_read = (others_to_read[start:] + others_to_read[:start])[:OTHER_SLOTS]
        for v in others_to_read:
            state = self._read_slot(gfn, v)
            if state is None:
                others.torn += 1
            elif state:
                others.good += 1
            else:
                others.bad.append(v)
        base = (gfn * PAGE_SIZE + slot * SLOT_SIZE) >> 2
        seq_b, g, w = int(u32[base + 15]), int(u32[base + 1]), int(u32[base + 2])
        body = bytes(mem[(base + 3) << 2 : (base + 15) << 2])
        seq_a = int(u32[base])
        if seq_a == seq_b == g == w == 0:
            intact = body == ZERO_BODY
        else:
            intact = seq_a == seq_b and g == gfn and body == SLOT_PATTERNS[slot_pattern_byte(gfn, slot, seq_a)]
        ok = intact and (accept is None or seq_a in accept)
        torn = not intact and accept is None and g == gfn and (w >> 16) != (writer >> 16)
        ok = ok or torn
        seq = max(seq_a, seq_b) if torn else seq_a
        new_seq = ((seq if ok else max(accept) if accept else 0) + 1) & 0xFFFFFFFF
        u32[base] = new_seq
        u32[base + 1] = gfn
        u32[base + 2] = writer
        mem[(base + 3) << 2 : (base + 15) << 2] = SLOT_PATTERNS[slot_pattern_byte(gfn, slot, new_seq)]
        u32[base + 15] = new_seq
        if not self._leave(gfn, entry):
            others.bad.clear()
            others.good = others.torn = 0
            return Access.RETRY, new_seq, False, False
        return Access.DONE, new_seq, ok, torn

    def _read_slot(self, gfn: int, slot: int) -> bool | None:
        """A seqlock read of another vCPU's slot: True if a complete copy matches, False if it does not, None if
        the slot was being written."""
        u32, mem = self.u32, self.mem
        base = (gfn * PAGE_SIZE + slot * SLOT_SIZE) >> 2
        seq_b, g = int(u32[base + 15]), int(u32[base + 1])
        body = bytes(mem[(base + 3) << 2 : (base + 15) << 2])
        seq_a = int(u32[base])
        if seq_a != seq_b:
            return None
        if seq_a == 0 and g == 0:
            return body == ZERO_BODY
        return g == gfn and body == SLOT_PATTERNS[slot_pattern_byte(gfn, slot, seq_a)]

    def store_u32(self, gpa: int, value: int) -> Access:
        """One aligned 32-bit store to guest memory, under the same EPT protocol (e.g. zeroing the APF area
        before APF is enabled, when its page is not pinned and may be swapped out)."""
        gfn = gpa // PAGE_SIZE
        entry = self._enter(gfn)
        if entry is None:
            return Access.EXIT
        self.u32[gpa >> 2] = value
        return Access.DONE if self._leave(gfn, entry) else Access.RETRY

    def leave(self) -> None:
        self.ctl[CTL_IN_ACCESS] = 0
