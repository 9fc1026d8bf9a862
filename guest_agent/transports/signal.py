# The signal transport, guest side: exceptions and interrupts are POSIX real-time signals (shared/signals.py); the
# exception's vector and CR2, and the raise counter of each vector, are in the vCPU's control block
# (shared/views.py), written before the signal. A Python signal handler runs between any two bytecodes of the guest,
# so an interrupt really can arrive anywhere; the Cpu decides whether it is taken or stays pending. The host only
# signals the PID that connected (checked with SO_PEERCRED) through a pidfd, so a recycled PID is never signalled.
# An exception becomes the same typed message as a socket frame (shared/wire.py InjectException).
from __future__ import annotations

import select
import signal
import socket
from pathlib import Path
from types import FrameType

from shared.signals import SIG_PF, interrupt_signals, signal_vectors
from shared.views import CTL_CR2, CTL_EXC_VECTOR, CTL_IRR, CTL_PF_SEQ
from shared.wire import InjectException

from ..cpu import Cpu
from .base import ExitReply
from .base import Transport as Base


class Transport(Base):
    name = "signal"

    def __init__(self, path: Path, connect_timeout: float, reconnect_timeout: float = 30.0) -> None:
        # Handlers first: the default action of a real-time signal is to terminate, and a restored vCPU is
        # signalled before the host sends `welcome` (its first entry). Until `attach`, a vector signal only leaves
        # its counter raised; attach_ctl looks at every counter.
        self.irr: IrrReader | None = None
        signal.signal(SIG_PF, _ignore)  # the self-pipe wakes the exit wait; pf_seq says what happened
        for signum in interrupt_signals():
            signal.signal(signum, self._on_vector_signal)
        super().__init__(path, connect_timeout, reconnect_timeout)

    def attach(self, cpu: Cpu, ctl: memoryview) -> None:
        super().attach(cpu, ctl)
        cpu.probe = self._probe
        self.attach_ctl(ctl)

    def attach_ctl(self, ctl: memoryview) -> None:
        """A control block fresh from the host: every counter starts at 0, so a raise that came before we looked
        (a restored vCPU's wake-all) shows as a counter above 0. Runs with no vector signal able to see a half-made
        IrrReader: the handler reads `self.irr` once."""
        self.u32 = ctl
        self._pf_seen = 0
        self.irr = IrrReader(ctl, CTL_IRR, baseline=0)
        # A signal that came before this block was attached was read against the old one: look at every vector.
        for signum in interrupt_signals():
            self._on_vector_signal(signum, None)

    def _probe(self) -> str | None:
        # An exception injected but not yet taken: an interrupt arriving now arrived "between the #PF and reading
        # flags".
        return "pf_injected" if self.u32[CTL_PF_SEQ] != self._pf_seen else None

    def _on_vector_signal(self, signum: int, _frame: FrameType | None) -> None:
        irr, cpu = self.irr, self.cpu
        if irr is None or cpu is None:
            return
        for vector in irr.raised(signum):
            cpu.raise_irq(vector)

    def _exit_reply(self) -> ExitReply:
        while True:
            seq = self.u32[CTL_PF_SEQ]
            if seq != self._pf_seen:  # the reply was an exception (signal): vector and CR2 were written first
                self._pf_seen = seq
                return InjectException(int(self.u32[CTL_EXC_VECTOR]), int(self.u32[CTL_CR2]))
            if self.frames:
                reply: ExitReply = super()._exit_reply()
                return reply
            readable, _, _ = select.select([self.sock, self._wake_r], [], [])
            self._drain_wakeup()
            if self.sock in readable:
                self._fill(block=True)

    def _poll(self) -> int:
        if self.frames or _readable(self.sock):
            self._fill(block=False)  # only an end of connection (or a protocol error) can be there
        return 0  # interrupts arrive by signal

    def close(self) -> None:
        for signum in [SIG_PF, *interrupt_signals()]:
            signal.signal(signum, signal.SIG_IGN)
        super().close()


class IrrReader:
    """Which vectors a vector signal stands for: those whose raise counter moved since the last look.

    However many signals were merged into one handler call, each raised vector is seen; a vector raised several
    times while pending is seen once, as the IRR holds one bit per vector.
    """

    def __init__(self, u32: memoryview, irr0: int, baseline: int | None = None) -> None:
        """`baseline`: the value every counter had when we started looking (None: whatever they hold now)."""
        self.u32 = u32
        self.irr0 = irr0
        self.seen = list(u32[irr0 : irr0 + 256]) if baseline is None else [baseline] * 256

    def raised(self, signum: int) -> list[int]:
        out = []
        for vector in signal_vectors(signum):
            count = self.u32[self.irr0 + vector]
            if count != self.seen[vector]:
                self.seen[vector] = count
                out.append(vector)
        return out


def _readable(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    return None
