# The signal transport's mapping: which POSIX real-time signal stands for #PF injection and for each interrupt
# vector. Signals carry no payload; what they announce is in shared memory (shared/guest_ram.py, the vCPU's control
# block, and the APF area), written by the host before it sends the signal, as hardware writes memory before it
# raises an interrupt.
#
# Linux delivers pending real-time signals lowest number first. So:
#   SIG_PF = SIGRTMIN                          #PF: an exception is delivered before any interrupt
#   vector v -> SIGRTMIN + 1 + (15 - v // 16)  the APIC priority class (v >> 4): a higher class gets a lower
#                                              signal number, so it is delivered first, as the local APIC would
# Vectors of one class share a signal; the per-vector raise counters in the control block tell them apart, and a
# counter (not a flag) means a raise can never be lost to a read-modify-write race. Several signals of one number
# may reach the guest as one (Python runs a handler once per batch): the guest therefore reads the counters and
# never counts signals.
from __future__ import annotations

import signal
from typing import Final

SIGNALS_NEEDED: Final = 17
SIG_PF: Final = int(signal.SIGRTMIN)


def vector_signal(vector: int) -> int:
    if not 0 <= vector <= 255:
        raise ValueError(f"vector {vector} is not 0..255")
    return SIG_PF + 1 + (15 - (vector >> 4))


def signal_vectors(signum: int) -> range:
    """The vectors that `signum` may stand for."""
    cls = 15 - (signum - SIG_PF - 1)
    if not 0 <= cls <= 15:
        raise ValueError(f"signal {signum} carries no interrupt vectors")
    return range(cls * 16, cls * 16 + 16)


def interrupt_signals() -> list[int]:
    return [SIG_PF + 1 + i for i in range(16)]


if int(signal.SIGRTMAX) < SIG_PF + SIGNALS_NEEDED - 1:  # pragma: no cover - every Linux libc has 30+
    raise ImportError("this system has too few real-time signals for apf-emu's signal transport")
