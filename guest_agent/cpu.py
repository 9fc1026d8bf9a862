# The guest vCPU's interrupt state: RFLAGS.IF, the pending vectors (the local APIC's IRR), and what the vCPU is
# doing, so that an interrupt is taken exactly where a real CPU would take it and deferred everywhere else.
#
# An interrupt may be raised at any moment: with the signal transport from a signal handler, which Python runs
# between any two bytecodes of the guest, and with the socket transport whenever the guest reads a frame. It is
# taken at once only if IF is set and the vCPU is at an instruction boundary in code that runs with interrupts on
# (user mode, or halted); otherwise it stays pending and is taken when that becomes true again (`sti`, the end of an
# instruction, the end of a VM exit). A vector raised again while pending is coalesced, as in the IRR.
#
# Every deferral is logged as `guest_irq_pending` with the context stack (e.g. "kernel/pf_entry",
# "irq_handler/exit"): that is how a run shows which interleavings really happened.
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Contexts in which an interrupt is taken at once (given IF=1).
_OPEN = frozenset({"user", "kernel_irq_on", "hotplug", "halt"})


class Cpu:
    def __init__(self, on_interrupt: Callable[[int], None], log: Any) -> None:
        self.on_interrupt = on_interrupt
        self.log = log
        self.if_flag = False
        self.pending: deque[int] = deque()
        self.stack: list[str] = ["boot"]
        self.deferred: Counter[str] = Counter()
        self.coalesced = 0
        self.probe: Callable[[], str | None] | None = None  # extra context the transport knows (a #PF in flight)

    # --- raising -------------------------------------------------------------------------------------------------
    def raise_irq(self, vector: int) -> None:
        """A vector arrived. May run from a signal handler at any bytecode."""
        if vector in self.pending:
            self.coalesced += 1
            return
        self.pending.append(vector)
        if self.if_flag and self.stack[-1] in _OPEN:
            self.take_interrupts()
            return
        context = "/".join(self.stack[-3:])
        extra = self.probe() if self.probe is not None else None
        if extra:
            context = f"{context}/{extra}"
        if not self.if_flag and self.stack[-1] in _OPEN:
            context += "/if=0"
        self.deferred[context] += 1
        self.log.info("guest_irq_pending", vector=vector, context=context)

    def take_interrupts(self) -> None:
        """Deliver pending vectors while IF is set: each handler runs with IF clear (an interrupt gate)."""
        while self.pending and self.if_flag:
            vector = self.pending.popleft()
            self.if_flag = False
            self.stack.append("irq_handler")
            try:
                self.on_interrupt(vector)
            finally:
                self.stack.pop()
                self.if_flag = True

    # --- state ---------------------------------------------------------------------------------------------------
    def cli(self) -> None:
        self.if_flag = False

    def sti(self) -> None:
        self.if_flag = True
        if self.pending and self.stack[-1] in _OPEN:
            self.take_interrupts()

    def boundary(self) -> None:
        """An instruction boundary in the current context."""
        if self.pending and self.if_flag and self.stack[-1] in _OPEN:
            self.take_interrupts()

    def push(self, name: str) -> None:
        self.stack.append(name)

    def pop(self) -> None:
        """Leave the innermost context without taking interrupts (e.g. an exit that injects an exception)."""
        self.stack.pop()

    @contextmanager
    def context(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
        self.boundary()

    def enter(self, name: str) -> None:
        """Switch the innermost context (e.g. kernel -> user on return to a task)."""
        self.stack[-1] = name
        self.boundary()
