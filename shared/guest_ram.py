# Guest RAM: one POSIX shared-memory object per VM, `/apf-emu-<vm>-ram`, exactly `pages * PAGE_SIZE` bytes of
# guest-physical memory (gpa == offset). The APF areas live in it, where each guest put them. Every guest maps all of
# it read-write, as every vCPU of a real VM can write all of its RAM: nothing the host relies on lives here (the
# emulated EPT and each vCPU's control block are separate objects, shared/views.py, and the host's own residency
# state is in its private backing store, host_daemon/backing_store.py).
#
# The object is created by the host (O_CREX, mode 0600) and unlinked by the host at shutdown; guests only open it.
# Owning the mmap and the memoryviews over it in one place lets `close()` release them in the right order (an mmap
# with live exports refuses to close).
from __future__ import annotations

import contextlib
import ctypes
import mmap
import re
from dataclasses import dataclass
from typing import Final

import posix_ipc

PAGE_SIZE: Final = 4096
MAX_PAGES: Final = 1 << 20

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


def vm_state_left(vm: str) -> bool:
    """Whether a host of this VM left its guest RAM and swap behind (it was killed, or failed): what --recover takes
    over."""
    for name in vm_shm_names(vm):
        try:
            posix_ipc.SharedMemory(name, 0).close_fd()
        except posix_ipc.ExistentialError:
            return False
    return True


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class RamLayout:
    pages: int
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        if self.page_size != PAGE_SIZE:
            raise ValueError(f"page size must be {PAGE_SIZE}")
        if not 2 <= self.pages <= MAX_PAGES:
            raise ValueError(f"guest RAM must have 2 to {MAX_PAGES} pages")

    @property
    def ram_size(self) -> int:
        return self.pages * self.page_size


class GuestRam:
    """A mapping of a VM's guest RAM object. Use `create` (host) or `open` (guest)."""

    def __init__(self, name: str, layout: RamLayout, shm: posix_ipc.SharedMemory, *, owner: bool) -> None:
        self.name = name
        self.layout = layout
        self.owner = owner
        self._map: mmap.mmap | None = mmap.mmap(shm.fd, layout.ram_size)
        shm.close_fd()
        self.mem: memoryview = memoryview(self._map)
        self.u32: memoryview = self.mem.cast("I")
        probe = ctypes.c_char.from_buffer(self._map)
        self.hva_base: int = ctypes.addressof(probe)  # where this process maps gpa 0 (KVM's hva of guest RAM)
        del probe  # ctypes holds an export of the mapping while it lives

    @classmethod
    def create(cls, vm: str, layout: RamLayout) -> GuestRam:
        """Create the VM's guest RAM, replacing a stale object left by a killed host (posix_ipc USAGE: Mr. Messy)."""
        name = shm_name(vm)
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(name)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=layout.ram_size)
        return cls(name, layout, shm, owner=True)

    @classmethod
    def open(cls, vm: str, layout: RamLayout) -> GuestRam:
        name = shm_name(vm)
        shm = posix_ipc.SharedMemory(name, 0)
        found = shm.size
        if found < layout.ram_size:
            shm.close_fd()
            raise ValueError(f"{name} is {found} bytes, smaller than the announced layout ({layout.ram_size})")
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
