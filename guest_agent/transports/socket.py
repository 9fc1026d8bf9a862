# The socket transport, guest side: exceptions and interrupts are frames on the vCPU's own connection. An
# `interrupt` frame raises its vector on the Cpu wherever it is read (while waiting for a reply it then stays pending
# until the exit ends; between instructions `poll` reads them without blocking); an `exception` frame is the reply
# of an EPT-violation exit.
from __future__ import annotations

from shared.wire import Interrupt

from .base import Transport as Base


class Transport(Base):
    name = "socket"

    def _interrupt_frame(self, msg: Interrupt) -> None:
        assert self.cpu is not None
        self.cpu.raise_irq(msg.vector)
