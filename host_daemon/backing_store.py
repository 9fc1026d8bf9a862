# The host's private, crash-consistent state: which pages are resident (the real EPT; guests only ever see the copy
# the host publishes, shared/views.py), the swap device that holds evicted pages, and the per-vCPU registers a VMM
# must restore after it restarts. One POSIX shm object per VM, `/apf-emu-<vm>-swap`, mode 0600, that no guest is
# given: the host trusts nothing a guest can write, and this is where everything it decides from lives. It outlives
# a host killed with SIGKILL, so a host started with --recover finds guest memory exactly as it was.
#
# Layout (u32 words unless said):
#   header          magic, version, pages
#   residency[P]    (generation << 1) | present, per gfn: the master EPT. The published EPT is written after it
#   swap_state[P]   (generation << 1) | slot : which of the page's two slots holds its copy, and the EPT generation
#                   at which that copy was made (the generation of the unmap that preceded it)
#   vcpu[64]        16 words each: valid, boot, msr_en lo, msr_en hi, msr_int, apf_id, connected, pid, spiv
#   slots[P][2]     two 4 KiB copies per page
#
# An eviction writes the copy into the slot NOT named by swap_state, then commits with one aligned store of
# swap_state naming the new slot and generation, and only then poisons the page in guest RAM. Killed at any
# instruction, it leaves a readable copy: before the commit the page in guest RAM is still intact (and its EPT
# generation does not match swap_state, so recovery knows), after it the new slot is. A page-in copies the slot
# into guest RAM and then marks the EPT entry present; killed before that, the slot is still valid. Recovery reads
# only the residency table and swap_state (host_daemon/memory.py, GuestMemory._recover).
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Final

import posix_ipc

from shared.abi import MAX_VCPUS
from shared.guest_ram import PAGE_SIZE, page_align, swap_name, unlink

MAGIC: Final = 0x41504653  # "APFS"
VERSION: Final = 4  # 3: the SPIV register saved with each vCPU; 4: and MSR_APF_EMU_VE_INFO
VCPU_WORDS: Final = 16
V_VALID, V_BOOT, V_EN_LO, V_EN_HI, V_INT, V_APF_ID, V_CONNECTED, V_PID, V_SPIV, V_VE_LO, V_VE_HI = range(11)


def _slots_off(pages: int) -> int:
    """Where the page slots start: after the header page, residency, swap_state and the vCPU records."""
    return PAGE_SIZE + 2 * page_align(pages * 4) + page_align(MAX_VCPUS * VCPU_WORDS * 4)


def store_size(pages: int) -> int:
    """The size of the backing store of a `pages`-page VM (the layout above)."""
    return _slots_off(pages) + pages * 2 * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class SavedVcpu:
    boot: int
    msr_en: int
    msr_int: int
    apf_id: int
    spiv: int  # the LAPIC's spurious-interrupt vector register (its software enable)
    msr_ve: int = 0  # the `ve` ABI's MSR_APF_EMU_VE_INFO


class BackingStore:
    """Evicted page contents and saved vCPU registers, in shared memory that survives the host process."""

    def __init__(self, vm: str, pages: int, *, recover: bool) -> None:
        self.name = swap_name(vm)
        self.pages = pages
        self.residency_off = PAGE_SIZE
        self.state_off = self.residency_off + page_align(pages * 4)
        self.vcpu_off = self.state_off + page_align(pages * 4)
        self.slots_off = _slots_off(pages)
        size = store_size(pages)
        if recover:
            shm = posix_ipc.SharedMemory(self.name, 0)
            found = shm.size
            if found != size:
                shm.close_fd()
                raise ValueError(f"{self.name} is {found} bytes, not the {size} of a {pages}-page VM")
        else:
            unlink(self.name)
            shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600, size=size)
        self._map: mmap.mmap | None = mmap.mmap(shm.fd, size)
        shm.close_fd()
        self.mem = memoryview(self._map)
        self.u32 = self.mem.cast("I")
        if recover:
            if (self.u32[0], self.u32[1], self.u32[2]) != (MAGIC, VERSION, pages):
                self.close(unlink_it=False)
                raise ValueError(f"{self.name} does not hold the state of a {pages}-page apf-emu VM")
        else:
            self.u32[0], self.u32[1], self.u32[2] = MAGIC, VERSION, pages
        self._residency0 = self.residency_off >> 2
        self._state0 = self.state_off >> 2
        self._vcpu0 = self.vcpu_off >> 2

    # --- residency (the master EPT) --------------------------------------------------------------------------------
    def residency(self, gfn: int) -> int:
        return int(self.u32[self._residency0 + gfn])

    def set_residency(self, gfn: int, entry: int) -> None:
        self.u32[self._residency0 + gfn] = entry

    # --- pages ---------------------------------------------------------------------------------------------------
    def state(self, gfn: int) -> int:
        return int(self.u32[self._state0 + gfn])

    def _slot_off(self, gfn: int, slot: int) -> int:
        return self.slots_off + (gfn * 2 + slot) * PAGE_SIZE

    def write(self, gfn: int, generation: int, data: bytes | memoryview) -> None:
        """Store gfn's contents as of EPT `generation`: write the free slot, then commit with one store."""
        slot = 1 - (self.state(gfn) & 1)
        off = self._slot_off(gfn, slot)
        self.mem[off : off + PAGE_SIZE] = data
        self.u32[self._state0 + gfn] = (generation << 1) | slot

    def read(self, gfn: int) -> memoryview:
        off = self._slot_off(gfn, self.state(gfn) & 1)
        return self.mem[off : off + PAGE_SIZE]

    def holds(self, gfn: int, generation: int) -> bool:
        """Does the committed copy belong to EPT `generation` (i.e. the latest eviction finished)?"""
        return self.state(gfn) >> 1 == generation

    # --- vCPU registers ------------------------------------------------------------------------------------------
    def save_vcpu(self, vcpu: int, boot: int, msr_en: int, msr_int: int, apf_id: int, spiv: int,
                  msr_ve: int = 0) -> None:
        base = self._vcpu0 + vcpu * VCPU_WORDS
        u32 = self.u32
        u32[base + V_VALID] = 0  # a torn save is never restored
        u32[base + V_BOOT] = boot & 0xFFFFFFFF
        u32[base + V_EN_LO] = msr_en & 0xFFFFFFFF
        u32[base + V_EN_HI] = msr_en >> 32
        u32[base + V_INT] = msr_int
        u32[base + V_APF_ID] = apf_id
        u32[base + V_SPIV] = spiv
        u32[base + V_VE_LO] = msr_ve & 0xFFFFFFFF
        u32[base + V_VE_HI] = msr_ve >> 32
        u32[base + V_VALID] = 1

    def attach_guest(self, vcpu: int, pid: int) -> None:
        """A guest process (`pid`, 0 if the host cannot see it) is attached to vCPU: a host that takes over after a
        crash must assume that guest still runs on what the dead host had shown it."""
        base = self._vcpu0 + vcpu * VCPU_WORDS
        self.u32[base + V_PID] = pid
        self.u32[base + V_CONNECTED] = 1

    def detach_guest(self, vcpu: int) -> None:
        self.u32[self._vcpu0 + vcpu * VCPU_WORDS + V_CONNECTED] = 0

    def connected_guests(self) -> dict[int, int]:
        """vCPU -> pid (0: unknown) of every vCPU that had a guest attached when the state was last written."""
        out = {}
        for vcpu in range(MAX_VCPUS):
            base = self._vcpu0 + vcpu * VCPU_WORDS
            if self.u32[base + V_CONNECTED]:
                out[vcpu] = int(self.u32[base + V_PID])
        return out

    def save_apf_id(self, vcpu: int, apf_id: int) -> None:
        self.u32[self._vcpu0 + vcpu * VCPU_WORDS + V_APF_ID] = apf_id

    def apf_id(self, vcpu: int) -> int:
        """The vCPU's next token id as last saved, valid record or not: the word is written alone with each new id
        (save_apf_id) and never goes back, so a register save torn by a SIGKILL leaves it right."""
        return int(self.u32[self._vcpu0 + vcpu * VCPU_WORDS + V_APF_ID])

    def saved_vcpu(self, vcpu: int) -> SavedVcpu | None:
        base = self._vcpu0 + vcpu * VCPU_WORDS
        u32 = self.u32
        if not u32[base + V_VALID]:
            return None
        return SavedVcpu(int(u32[base + V_BOOT]), int(u32[base + V_EN_LO]) | int(u32[base + V_EN_HI]) << 32,
                         int(u32[base + V_INT]), int(u32[base + V_APF_ID]), int(u32[base + V_SPIV]),
                         int(u32[base + V_VE_LO]) | int(u32[base + V_VE_HI]) << 32)

    def forget_vcpu(self, vcpu: int) -> None:
        self.u32[self._vcpu0 + vcpu * VCPU_WORDS + V_VALID] = 0

    # --- lifetime ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.pages

    def close(self, *, unlink_it: bool) -> None:
        if self._map is None:
            return
        self.u32.release()
        self.mem.release()
        self._map.close()
        self._map = None
        if unlink_it:
            unlink(self.name)
