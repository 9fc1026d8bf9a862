# The guest's APF sleep table (arch/x86/kernel/kvm.c: kvm_async_pf_queue_task, kvm_async_pf_task_wake,
# apf_task_wake_all).
#
# One node per token: a sleeping task, or a *dummy* when the page-ready arrived before the task's not-present was
# handled. Linux hashes tokens into 256 buckets under spinlocks; one vCPU process needs only a dict. The rules:
# - queue_task(token): a dummy for this token means the wake came first: delete it and do not sleep;
#   otherwise add a node and sleep until it is removed.
# - wake(token): remove and wake the node; with no node, insert a dummy. A wake that finds a dummy removes it, as
#   apf_task_wake_one does with any node it finds.
# - wake_all(): remove every node, sleepers and dummies alike (token 0xffffffff).
# A dummy whose not-present never comes is a leak (bugzilla 208081): `dummies` must be empty at shutdown.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class DuplicateToken(Exception):
    """A task tried to sleep on a token another task is already sleeping on: the host reused a live token."""


@dataclass
class SleepTable(Generic[T]):
    _nodes: dict[int, T | None] = field(default_factory=dict)  # token -> sleeping task, or None for a dummy

    def queue_task(self, token: int, task: T) -> bool:
        """True if `task` now sleeps on `token`; False if a dummy was waiting (the wake came first)."""
        if token in self._nodes:
            if self._nodes[token] is None:
                del self._nodes[token]
                return False
            raise DuplicateToken(f"token {token:#x} already has a sleeper")
        self._nodes[token] = task
        return True

    def wake(self, token: int) -> tuple[T | None, bool]:
        """Wake the sleeper on `token`. Returns (task or None, dummy_created)."""
        if token not in self._nodes:
            self._nodes[token] = None
            return None, True
        return self._nodes.pop(token), False

    def wake_all(self) -> list[tuple[int, T]]:
        """Remove every node; return the (token, task) pairs that were sleeping."""
        woken = [(token, task) for token, task in self._nodes.items() if task is not None]
        self._nodes.clear()
        return woken

    @property
    def sleepers(self) -> int:
        return sum(1 for task in self._nodes.values() if task is not None)

    @property
    def dummies(self) -> int:
        return sum(1 for task in self._nodes.values() if task is None)

    def __len__(self) -> int:
        return len(self._nodes)
