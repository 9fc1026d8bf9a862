# The guest's APF sleep table (arch/x86/kernel/kvm.c: `async_pf_sleepers`, kvm_async_pf_queue_task,
# kvm_async_pf_task_wake, apf_task_wake_one, apf_task_wake_all).
#
# One node per token: a sleeping task, or a *dummy* when the page-ready arrived before the task's not-present was
# handled. Linux keeps one table of 256 hash buckets for all CPUs, each node recording its cpu; one vCPU process
# needs only a dict, and every node is this vCPU's (a token names its vCPU, and the page-ready of a token goes to
# that vCPU). The rules, as Linux has them:
# - queue_task(token): any node found for the token is taken for a dummy ("wake up was delivered ahead of PF"):
#   it is unhashed and freed and the task does not sleep. If that node was another task's (a host that handed the
#   token out twice), Linux kfree()s that task's on-stack node, which corrupts memory; at best the task sleeps for
#   good (`hlist_del` poisons its link, so it never sees itself unhashed, and a later wake of the token only
#   inserts a dummy), which is what this table models. (A patch that
#   leaves such a node alone, Yasuoka 2025, is not merged.) Otherwise the task adds a node and sleeps until it is
#   unhashed.
# - wake(token): with a node, unhash it (apf_task_wake_one: wakes a sleeper; a dummy just goes, and is never
#   freed); with none, insert a dummy. Token 0 is no exception: a wake of 0 inserts a dummy that no not-present
#   will ever consume.
# - wake_all(): unhash every node of this CPU, sleepers and dummies alike (token 0xffffffff, and CPU offline);
#   the dummies are not freed either.
# `int-error` (Vivek Goyal's RFC): a wake can carry a page-in error; a dummy keeps it (`n->is_err`), and the #PF
# that consumes such a dummy learns it (DUMMY_ERROR), as a woken sleeper does from `wake`'s caller.
# A dummy whose not-present never comes is a leak (bugzilla 208081): `dummies` must be empty at shutdown. A dummy
# unhashed by a second wake or a wake-all leaks its memory in Linux (apf_task_wake_one does not kfree it):
# `leaked` counts those.
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Queued(Enum):
    """What kvm_async_pf_queue_task did with a task's token."""

    SLEEP = "sleep"  # a node was added: the task sleeps
    DUMMY = "dummy"  # the page-ready came first: its dummy was deleted, the task goes on
    DUMMY_ERROR = "dummy_error"  # the same, and that page-ready reported a page-in error (`int-error`)
    FREED_SLEEPER = "freed_sleeper"  # another task's node was taken for a dummy: freed; that task sleeps for good


@dataclass
class SleepTable(Generic[T]):
    _nodes: dict[int, T | None] = field(default_factory=dict)  # token -> sleeping task, or None for a dummy
    lost: list[T] = field(default_factory=list)  # tasks whose node another task's #PF freed: asleep for good
    _error_dummies: set[int] = field(default_factory=set)  # tokens whose dummy carries a page-in error
    leaked: int = 0  # dummies unhashed but never freed (by a second wake or a wake-all)

    def queue_task(self, token: int, task: T) -> Queued:
        """`kvm_async_pf_queue_task`: whatever node `_find_apf_task` finds is deleted as a dummy."""
        if token in self._nodes:
            found = self._nodes.pop(token)
            if found is None:
                if token in self._error_dummies:
                    self._error_dummies.discard(token)
                    return Queued.DUMMY_ERROR
                return Queued.DUMMY
            self.lost.append(found)
            return Queued.FREED_SLEEPER
        self._nodes[token] = task
        return Queued.SLEEP

    def wake(self, token: int, *, error: bool = False) -> tuple[T | None, bool]:
        """`kvm_async_pf_task_wake` for one token (`error`: the page-ready reported a page-in error). Returns (the
        task woken or None, whether a dummy was inserted); (None, False) means a dummy was found and removed."""
        if token not in self._nodes:
            self._nodes[token] = None
            if error:
                self._error_dummies.add(token)
            return None, True
        task = self._nodes.pop(token)
        if task is None:
            self.leaked += 1
            self._error_dummies.discard(token)
        return task, False

    def wake_all(self) -> tuple[list[tuple[int, T]], int]:
        """`apf_task_wake_all`: unhash every node. Returns the (token, task) pairs that slept and the number of
        dummies that went."""
        woken = [(token, task) for token, task in self._nodes.items() if task is not None]
        dummies = len(self._nodes) - len(woken)
        self.leaked += dummies
        self._nodes.clear()
        self._error_dummies.clear()
        return woken, dummies

    def holds(self, token: int, task: T) -> bool:
        """`hlist_unhashed(&n.link)` is false: `task`'s node for `token` is still in the table (5.7's halted wait
        loops on it)."""
        return token in self._nodes and self._nodes[token] is task

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
