# The host's side of what it shares with guests besides RAM (the contract is shared/views.py): the published EPT,
# one per host instance, sealed so that no guest can write it, and one control block per vCPU connection, which only
# that guest receives.
#
# Both are memfds. The EPT is mapped read-write here first and then sealed with F_SEAL_FUTURE_WRITE (plus SHRINK,
# GROW and SEAL): the kernel keeps this mapping writable and refuses every later writable shared mapping, write(2)
# and mprotect(PROT_WRITE), for root too. A control block has no name and no other holder than the host and its
# guest, so no other guest can reach it. Each is passed with `welcome` (SCM_RIGHTS); the host keeps its own fds open
# only as long as it may still send them.
from __future__ import annotations

import fcntl
import os
from typing import Final

from shared.views import CTL_SIZE, MappedFd, ept_size

F_SEAL_FUTURE_WRITE: Final = 0x0010  # linux/fcntl.h; Python's fcntl module names it only from 3.13


class _Memfd:
    """A memfd the host maps read-write and keeps the descriptor of, to pass on."""

    def __init__(self, name: str, size: int) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            self._view = MappedFd(os.dup(self.fd), size, writable=True, what=name)
        except BaseException:
            os.close(self.fd)
            raise
        self.u32: memoryview = self._view.u32

    def close(self) -> None:
        self._view.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PublishedEpt(_Memfd):
    """The EPT guests read: u32 `(generation << 1) | present` per gfn, written only by host_daemon/memory.py."""

    def __init__(self, vm: str, pages: int) -> None:
        super().__init__(f"apf-emu-{vm}-ept", ept_size(pages))
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)


class ControlBlock(_Memfd):
    """One vCPU connection's control block: `in_access` (guest) and the signal transport's words (host)."""

    def __init__(self, vm: str, vcpu: int) -> None:
        super().__init__(f"apf-emu-{vm}-vcpu{vcpu}", CTL_SIZE)

    def forget_fd(self) -> None:
        """The guest has its copy: the host keeps only the mapping."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
