# Guest tasks and the round-robin scheduler of one vCPU.
#
# A task owns a fixed set of pages (the same set in every boot, so a rebooted guest finds its data) and, step by
# step, picks one, verifies it holds what the task last wrote, and writes the next version. A share of the accesses
# (`shared_ratio`) goes instead to the pages every vCPU shares (guest_agent/memory.py, shared_pages), as kernel data
# and page cache are shared in a real guest: that is what makes one vCPU's stop or crash matter to the others'
# data, and the host's eviction rules with it. Each access is made in
# a mode: user mode with interrupts on (most), kernel mode (no APF unless SEND_ALWAYS), or inside a short
# interrupts-off section (never APF: the host must fault synchronously, and a pending page-ready waits).
# A counting task (Natapov's "counter threads") touches no memory: it only burns CPU in user mode, so it is the work
# a vCPU can do while another task waits for a page, and the measure of what APF gains.
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PageAccess:
    gfn: int
    user: bool
    irq: bool
    shared: bool = False


@dataclass
class GuestTask:
    tid: int
    pages: list[int]
    rng: random.Random
    kernel_ratio: float = 0.1
    irq_off_ratio: float = 0.05
    accept: dict[int, tuple[int, ...]] = field(default_factory=dict)  # gfn -> seqs the page may hold
    current: PageAccess | None = None  # the access in progress (retried after a fault)
    faulted: bool = False  # the current access needed a VM exit
    irq_off_left: int = 0  # accesses left in an interrupts-off section
    token: int | None = None  # the token this task sleeps on
    counting: bool = False  # a counting task: no pages, COUNT_QUANTUM increments per turn
    shared: range = range(0)  # the pages every vCPU shares
    shared_ratio: float = 0.0
    mapped: set[int] = field(default_factory=set)  # the gfns this task's page table maps (demand paging)

    def next_access(self) -> PageAccess:
        if self.current is None:
            shared = bool(self.shared) and self.rng.random() < self.shared_ratio
            gfn = self.rng.choice(self.shared if shared else self.pages)
            if self.irq_off_left == 0 and self.rng.random() < self.irq_off_ratio:
                self.irq_off_left = self.rng.randint(1, 3)
            if self.irq_off_left:
                self.irq_off_left -= 1
                self.current = PageAccess(gfn, user=False, irq=False, shared=shared)
            else:
                self.current = PageAccess(gfn, user=self.rng.random() >= self.kernel_ratio, irq=True, shared=shared)
            self.faulted = False
        return self.current

    @property
    def in_irq_off_section(self) -> bool:
        return self.irq_off_left > 0 or (self.current is not None and not self.current.irq)

    def finish_access(self) -> None:
        self.current = None
        self.faulted = False


COUNT_QUANTUM = 2000  # increments per turn of a counting task: about as much CPU as one page access


def count_quantum() -> int:
    n = 0
    for _ in range(COUNT_QUANTUM):
        n += 1
    return n


def task_pages(pages: int, vcpus: int, vcpu: int, tasks: int, tid: int, first: int = 1) -> list[int]:
    """The gfns task `tid` of `vcpu` owns, from gfn `first` on (gfn 0 holds the APF areas; the shared pages come
    next, so callers pass the end of shared_pages())."""
    return [g for g in range(first, pages) if (g - first) % vcpus == vcpu and ((g - first) // vcpus) % tasks == tid]


class RunQueue:
    """Round robin, except that a task inside an interrupts-off section keeps the CPU."""

    def __init__(self) -> None:
        self._q: deque[GuestTask] = deque()

    def add(self, task: GuestTask) -> None:
        self._q.append(task)

    def pick(self) -> GuestTask | None:
        return self._q.popleft() if self._q else None

    def peek(self) -> GuestTask | None:
        return self._q[0] if self._q else None

    def put_back(self, task: GuestTask) -> None:
        if task.in_irq_off_section:
            self._q.appendleft(task)
        else:
            self._q.append(task)

    def __len__(self) -> int:
        return len(self._q)
