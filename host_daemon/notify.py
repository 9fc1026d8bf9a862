# How the host gets into a guest: #PF injection and interrupts, over the connection's transport.
#
# - socket: `inject_pf {cr2}` and `interrupt {vector}` frames on the vCPU's connection.
# - signal: the payload goes to shared memory first (CR2 and pf_seq, or the vector's raise counter, in the vCPU's
#   control block: shared/guest_ram.py), then a real-time signal (shared/signals.py) is sent through a pidfd opened
#   at the handshake for the PID the kernel vouched for (SO_PEERCRED). A pidfd names one process for good: a guest
#   that died and whose PID was reused is never signalled; sending to it fails with ProcessLookupError, which is
#   ignored (the connection's end will reset the vCPU).
from __future__ import annotations

import os
import signal

import trio

from shared.channel import MessageChannel
from shared.guest_ram import CTL_CR2, CTL_IRR, CTL_PF_SEQ, GuestRam
from shared.signals import SIG_PF, vector_signal

U32 = 0xFFFF_FFFF


class SocketNotifier:
    transport = "socket"

    def __init__(self, chan: MessageChannel) -> None:
        self.chan = chan

    async def inject_pf(self, cr2: int) -> None:
        await self.chan.send("inject_pf", cr2=cr2)

    async def interrupt(self, vector: int) -> None:
        try:
            await self.chan.send("interrupt", vector=vector)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def close(self) -> None:
        return None


class SignalNotifier:
    transport = "signal"

    def __init__(self, ram: GuestRam, vcpu: int, pid: int) -> None:
        self.pidfd = os.pidfd_open(pid)
        self.u32 = ram.u32
        self._cr2 = ram.layout.ctl_index(vcpu, CTL_CR2)
        self._pf_seq = ram.layout.ctl_index(vcpu, CTL_PF_SEQ)
        self._irr0 = ram.layout.ctl_index(vcpu, CTL_IRR)

    def _signal(self, signum: int) -> None:
        if self.pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    async def inject_pf(self, cr2: int) -> None:
        self.u32[self._cr2] = cr2
        self.u32[self._pf_seq] = (self.u32[self._pf_seq] + 1) & U32
        self._signal(SIG_PF)

    async def interrupt(self, vector: int) -> None:
        ix = self._irr0 + vector
        self.u32[ix] = (self.u32[ix] + 1) & U32
        self._signal(vector_signal(vector))

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


Notifier = SocketNotifier | SignalNotifier
