# The guest's APF sleep table (arch/x86/kernel/kvm.c: `async_pf_sleepers`, kvm_async_pf_queue_task,
# kvm_async_pf_task_wake, apf_task_wake_one, apf_task_wake_all).
#
# One node per token: a sleeping task, or a *dummy* when the page-ready arrived before the task's not-present was
# handled. Linux hashes tokens into 256 buckets under spinlocks; one vCPU process needs only a dict, and every node
# is this vCPU's (a token names its vCPU, and the page-ready of a token goes to that vCPU). The rules, as Linux has
# them:
# - queue_task(token): a dummy for this token means the wake came first: delete it, do not sleep; a node of
#   another task is "not to be touched": do not sleep either (the task retries its access); otherwise add a node
#   and sleep until it is unhashed.
# - wake(token): with a node, unhash it (apf_task_wake_one: wakes a sleeper; a dummy just goes); with none, insert a
#   dummy. Token 0 is no exception: a wake of 0 inserts a dummy that no not-present will ever consume.
# - wake_all(): unhash every node of this CPU, sleepers and dummies alike (token 0xffffffff, and CPU offline).
# A dummy whose not-present never comes is a leak (bugzilla 208081): `dummies` must be empty at shutdown.
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Queued(Enum):
    """What kvm_async_pf_queue_task did with a task's token."""

    SLEEP = "sleep"  # a node was added: the task sleeps
    DUMMY = "dummy"  # the page-ready came first: its dummy was deleted, the task goes on
    BUSY = "busy"  # another task sleeps on this token: not touched, the task goes on (and retries)


@dataclass
class SleepTable(Generic[T]):
    _nodes: dict[int, T | None] = field(default_factory=dict)  # token -> sleeping task, or None for a dummy

    def queue_task(self, token: int, task: T) -> Queued:
        """`kvm_async_pf_queue_task`."""
        if token in self._nodes:
            if self._nodes[token] is None:
                del self._nodes[token]
                return Queued.DUMMY
            return Queued.BUSY
        self._nodes[token] = task
        return Queued.SLEEP

    def wake(self, token: int) -> tuple[T | None, bool]:
        """`kvm_async_pf_task_wake` for one token. Returns (the task woken or None, whether a dummy was inserted);
        (None, False) means a dummy was found and removed."""
        if token not in self._nodes:
            self._nodes[token] = None
            return None, True
        return self._nodes.pop(token), False

    def wake_all(self) -> tuple[list[tuple[int, T]], int]:
        """`apf_task_wake_all`: unhash every node. Returns the (token, task) pairs that slept and the number of
        dummies that went."""
        woken = [(token, task) for token, task in self._nodes.items() if task is not None]
        dummies = len(self._nodes) - len(woken)
        self._nodes.clear()
        return woken, dummies

    def tokens(self) -> list[int]:
        return list(self._nodes)

    def dummy_tokens(self) -> list[int]:
        return [token for token, task in self._nodes.items() if task is None]

    @property
    def sleepers(self) -> int:
        return sum(1 for task in self._nodes.values() if task is not None)

    @property
    def dummies(self) -> int:
        return sum(1 for task in self._nodes.values() if task is None)

    def __len__(self) -> int:
        return len(self._nodes)
