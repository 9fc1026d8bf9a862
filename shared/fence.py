# A full memory barrier between two processes that share memory, for the one place where apf-emu needs store-load
# ordering: the TLB-shootdown handshake (host_daemon/memory.py, guest_agent/memory.py). It is Dekker's pattern:
#
#     guest                               host
#     store in_access = gfn + 1           store EPT[gfn] = not present
#     FENCE                               FENCE
#     load EPT[gfn]                       load in_access of every vCPU
#
# Without the fences x86-TSO lets each load pass the store before it (the store sits in the store buffer), and both
# sides could see the other's old value: the guest would use a page the host is copying out. With them, at least
# one side sees the other's store.
#
# Python has no fence instruction, but any x86 instruction with a LOCK prefix is a full barrier, and acquiring and
# releasing a `threading.Lock` executes two of them (CPython's lock is a POSIX semaphore or, since 3.13, a PyMutex:
# `sem_trywait`/`sem_post` or a compare-and-exchange, i.e. `lock cmpxchg` and `lock xadd`). That is what
# `full_fence()` does, for about 0.1 us, a small fraction of one guest access. This holds on x86-64, the
# architecture of the ABI apf-emu emulates; on weaker architectures an uncontended acquire/release pair is not a
# full barrier, and the guest's second line of defence (it re-reads the EPT entry after each access and retries if
# the generation changed) is what remains.
from __future__ import annotations

import threading
from typing import Final

_LOCK: Final = threading.Lock()


def full_fence() -> None:
    """A full memory barrier (x86-64): no load after it is performed before a store before it is visible."""
    _LOCK.acquire()
    _LOCK.release()
