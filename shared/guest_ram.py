# Guest RAM: one POSIX shared-memory object per VM, and the layout both sides compute from (pages, page size).
#
#   [0, pages * PAGE_SIZE)    guest-physical RAM. gpa == offset. The APF areas live here, where the guest put them.
#   [ept_offset, ...)         the emulated EPT: one u32 per gfn, `(generation << 1) | present`, written by the host
#                             only. A guest access to a gfn whose entry is not present is the VM exit.
#   [vcpu_ctl_offset, ...)    one 2 KiB block per vCPU slot (VcpuCtl below):
#                             u32 `in_access` (guest) = gfn + 1 while the guest is inside an access, else 0: what the
#                             host's TLB shootdown waits on before it copies a page out (host_daemon/memory.py);
#                             and, for the signal transport, what a signal cannot carry (host-written): `cr2` and
#                             `pf_seq` of the last injected #PF, and one raise counter per interrupt vector.
#
# The object is created by the host (O_CREX, mode 0600) and unlinked by the host at shutdown; guests only open it.
# Owning the mmap and the memoryviews over it in one place lets `close()` release them in the right order (an mmap
# with live exports refuses to close).
from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from typing import Final

import posix_ipc

from .abi import MAX_VCPUS

PAGE_SIZE: Final = 4096
VCPU_CTL_SIZE: Final = 2048
# u32 word offsets inside a vCPU's control block
CTL_IN_ACCESS: Final = 0  # guest: gfn + 1 while inside an access
CTL_CR2: Final = 1  # host: CR2 of the last #PF injected by signal
CTL_PF_SEQ: Final = 2  # host: incremented after CTL_CR2 is written, before the #PF signal
CTL_IRR: Final = 16  # host: 256 counters, one per vector, incremented before the vector's signal
EPT_PRESENT: Final = 1

_VM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")


def check_vm_id(vm: str) -> str:
    if not _VM_ID.match(vm):
        raise ValueError(f"VM id {vm!r} must be 1-48 characters of [A-Za-z0-9_.-]")
    return vm


def shm_name(vm: str) -> str:
    """The POSIX shm name of a VM's guest RAM (appears as /dev/shm/apf-emu-<vm>-ram)."""
    return f"/apf-emu-{check_vm_id(vm)}-ram"


def swap_name(vm: str) -> str:
    """The POSIX shm name of a VM's backing store, which the host daemon owns (host_daemon/backing_store.py)."""
    return f"/apf-emu-{check_vm_id(vm)}-swap"


def vm_shm_names(vm: str) -> tuple[str, str]:
    """Every shm object a VM has: what a supervisor removes after a host that could not clean up."""
    return shm_name(vm), swap_name(vm)


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class RamLayout:
    pages: int
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        if self.page_size != PAGE_SIZE:
            raise ValueError(f"page size must be {PAGE_SIZE}")
        if not 2 <= self.pages <= 1 << 20:
            raise ValueError("guest RAM must have 2 to 1048576 pages")

    @property
    def ram_size(self) -> int:
        return self.pages * self.page_size

    @property
    def ept_offset(self) -> int:
        return self.ram_size

    @property
    def vcpu_ctl_offset(self) -> int:
        return self.ept_offset + page_align(self.pages * 4)

    @property
    def total_size(self) -> int:
        return self.vcpu_ctl_offset + page_align(MAX_VCPUS * VCPU_CTL_SIZE)

    def ept_index(self, gfn: int) -> int:
        """Index of gfn's EPT entry in a u32 view of the whole object."""
        return (self.ept_offset >> 2) + gfn

    def ctl_index(self, vcpu: int, word: int = 0) -> int:
        """Index in a u32 view of the whole object of `word` of vCPU's control block."""
        return ((self.vcpu_ctl_offset + vcpu * VCPU_CTL_SIZE) >> 2) + word

    def in_access_index(self, vcpu: int) -> int:
        return self.ctl_index(vcpu, CTL_IN_ACCESS)


class GuestRam:
    """A mapping of a VM's guest RAM object. Use `create` (host) or `open` (guest)."""

    def __init__(self, name: str, layout: RamLayout, shm: posix_ipc.SharedMemory, *, owner: bool) -> None:
        self.name = name
        self.layout = layout
        self.owner = owner
        self._map: mmap.mmap | None = mmap.mmap(shm.fd, layout.total_size)
        shm.close_fd()
        self.mem: memoryview = memoryview(self._map)
        self.u32: memoryview = self.mem.cast("I")

    @classmethod
    def create(cls, vm: str, layout: RamLayout) -> GuestRam:
        """Create the VM's guest RAM, replacing a stale object left by a killed host (posix_ipc USAGE: Mr. Messy)."""
        name = shm_name(vm)
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=layout.total_size)
        return cls(name, layout, shm, owner=True)

    @classmethod
    def open(cls, vm: str, layout: RamLayout) -> GuestRam:
        name = shm_name(vm)
        shm = posix_ipc.SharedMemory(name, 0)
        found = shm.size
        if found < layout.total_size:
            shm.close_fd()
            raise ValueError(f"{name} is {found} bytes, smaller than the announced layout ({layout.total_size})")
        return cls(name, layout, shm, owner=False)

    def page(self, gfn: int) -> memoryview:
        off = gfn * PAGE_SIZE
        return self.mem[off : off + PAGE_SIZE]

    def close(self) -> None:
        """Release the views and the mapping; the owner also unlinks the name. Idempotent."""
        self._release(unlink_it=self.owner)

    def close_keep(self) -> None:
        """Release the mapping but leave the object for a successor (a host that will --recover)."""
        self._release(unlink_it=False)

    def _release(self, *, unlink_it: bool) -> None:
        if self._map is None:
            return
        self.u32.release()
        self.mem.release()
        self._map.close()
        self._map = None
        if unlink_it:
            unlink(self.name)


def unlink(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False
