# The signal transport, host side: the payload goes to the vCPU's control block first (shared/views.py: CR2, the
# exception vector and pf_seq; or the vector's raise counter), then a POSIX real-time signal (shared/signals.py) is
# sent through a pidfd opened at the handshake for the PID the kernel vouched for (SO_PEERCRED), as hardware writes
# memory before it raises an interrupt. A pidfd names one process for good: a guest that died and whose PID was
# reused is never signalled; sending to it fails with ProcessLookupError, which is ignored (the connection's end
# will reset the vCPU). The counters are the host's own: it writes them into the block and never reads them back,
# so whatever the guest writes there reaches only itself.
from __future__ import annotations

import contextlib
import os
import signal

from shared.channel import MessageChannel
from shared.signals import SIG_PF, vector_signal
from shared.views import CTL_CR2, CTL_EXC_VECTOR, CTL_IRR, CTL_PF_SEQ

U32 = 0xFFFF_FFFF


class Notifier:
    transport = "signal"

    def __init__(self, chan: MessageChannel, ctl: memoryview, pid: int) -> None:
        self.pidfd = os.pidfd_open(pid)
        self.u32: memoryview | None = ctl
        self._pf_seq = 0
        self._irr = [0] * 256

    def _signal(self, signum: int) -> None:
        if self.pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signum)

    async def inject_exception(self, vector: int, cr2: int) -> None:
        if self.u32 is None:
            return
        self.u32[CTL_CR2] = cr2
        self.u32[CTL_EXC_VECTOR] = vector
        self._pf_seq = (self._pf_seq + 1) & U32
        self.u32[CTL_PF_SEQ] = self._pf_seq
        self._signal(SIG_PF)

    async def interrupt(self, vector: int) -> None:
        if self.u32 is None:
            return
        count = self._irr[vector] = (self._irr[vector] + 1) & U32
        self.u32[CTL_IRR + vector] = count
        self._signal(vector_signal(vector))

    def close(self) -> None:
        self.u32 = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
