# The guest sleep table under arbitrary interleavings of #PF (queue_task), page-ready (wake) and wake-all.
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guest_agent.sleep_table import Queued, SleepTable


@given(st.permutations([("wait", t) for t in range(8)] + [("wake", t) for t in range(8)]))
def test_each_token_waited_and_woken_once_leaves_nothing_in_any_order(ops):
    """Whatever arrives first, #PF or page-ready, the node is gone afterwards: no dummy leaks, nobody sleeps."""
    table: SleepTable[str] = SleepTable()
    asleep = set()
    for op, token in ops:
        if op == "wait":
            if table.queue_task(token, f"task{token}") is Queued.SLEEP:
                asleep.add(token)
        else:
            task, _dummy = table.wake(token)
            if task is not None:
                asleep.discard(token)
    assert len(table) == 0 and not asleep


def test_a_ready_without_its_not_present_leaks_a_dummy():
    """bugzilla 208081: the host sent page-ready for a fault it had handled synchronously."""
    table: SleepTable[str] = SleepTable()
    assert table.wake(0x1000) == (None, True)
    assert table.dummies == 1


def test_wake_all_clears_sleepers_and_dummies():
    table: SleepTable[str] = SleepTable()
    table.queue_task(1, "a")
    table.queue_task(2, "b")
    table.wake(3)
    woken, dummies = table.wake_all()
    assert sorted(woken) == [(1, "a"), (2, "b")] and dummies == 1
    assert len(table) == 0


def test_kvm_async_pf_queue_task_takes_any_node_for_a_dummy():
    """kvm_async_pf_queue_task: whatever `_find_apf_task` finds is deleted as a dummy ("wake up was delivered ahead
    of PF"), even another task's node: Linux frees it and that task sleeps for good (a later wake of the token
    finds no node and inserts a dummy)."""
    table: SleepTable[str] = SleepTable()
    assert table.queue_task(1, "a") is Queued.SLEEP
    assert table.queue_task(1, "b") is Queued.FREED_SLEEPER
    assert table.lost == ["a"] and len(table) == 0
    assert table.wake(1) == (None, True)  # "a" is not woken: the wake only makes a dummy
    assert table.dummy_tokens() == [1]


def test_apf_task_wake_one_unhashes_a_dummy_without_freeing_it():
    """apf_task_wake_one only unhashes: a dummy removed by a second wake or by a wake-all is leaked memory."""
    table: SleepTable[str] = SleepTable()
    table.wake(1)
    assert table.wake(1) == (None, False) and table.leaked == 1
    table.wake(2)
    table.queue_task(3, "c")
    assert table.wake_all() == ([(3, "c")], 1) and table.leaked == 2
    table.wake(4)
    assert table.queue_task(4, "d") is Queued.DUMMY and table.leaked == 2  # consumed: kfree()d


def test_kvm_async_pf_task_wake_of_token_0_leaves_a_dummy():
    """kvm_async_pf_task_wake has no special case for 0: an empty slot's interrupt inserts a dummy for token 0,
    which no not-present consumes (alloc_apf_token never makes 0); only a wake-all removes it."""
    table: SleepTable[str] = SleepTable()
    assert table.wake(0) == (None, True)
    assert table.dummy_tokens() == [0]
    assert table.wake_all() == ([], 1)


class SleepTableMachine(RuleBasedStateMachine):
    """Tokens are issued once; each token's #PF and page-ready come in either order; wake-all may come anytime."""

    def __init__(self) -> None:
        super().__init__()
        self.table: SleepTable[int] = SleepTable()
        self.next_token = 1
        self.pending_pf: set[int] = set()
        self.pending_ready: set[int] = set()
        self.sleeping: set[int] = set()
        self.dummies: set[int] = set()

    @rule()
    def issue(self) -> None:
        self.pending_pf.add(self.next_token)
        self.pending_ready.add(self.next_token)
        self.next_token += 1

    @precondition(lambda self: self.pending_pf)
    @rule(data=st.data())
    def page_fault(self, data) -> None:
        token = data.draw(st.sampled_from(sorted(self.pending_pf)))
        self.pending_pf.discard(token)
        slept = self.table.queue_task(token, token) is Queued.SLEEP
        assert slept == (token not in self.dummies)
        if slept:
            self.sleeping.add(token)
        else:
            self.dummies.discard(token)

    @precondition(lambda self: self.pending_ready)
    @rule(data=st.data())
    def page_ready(self, data) -> None:
        token = data.draw(st.sampled_from(sorted(self.pending_ready)))
        self.pending_ready.discard(token)
        task, dummy = self.table.wake(token)
        if token in self.sleeping:
            assert task == token and not dummy
            self.sleeping.discard(token)
        else:
            assert task is None and dummy
            self.dummies.add(token)

    @rule()
    def wake_all(self) -> None:
        woken = {t for t, _task in self.table.wake_all()[0]}
        assert woken == self.sleeping
        self.sleeping.clear()
        self.dummies.clear()

    @invariant()
    def table_matches_model(self) -> None:
        assert self.table.sleepers == len(self.sleeping)
        assert self.table.dummies == len(self.dummies)

    def teardown(self) -> None:
        # Deliver everything still due, #PFs first; the table must still agree with the model.
        for token in sorted(self.pending_pf):
            self.page_fault_now(token)
        for token in sorted(self.pending_ready):
            task, _ = self.table.wake(token)
            if token in self.sleeping:
                assert task == token
                self.sleeping.discard(token)
            else:
                self.dummies.add(token)
        self.table_matches_model()

    def page_fault_now(self, token: int) -> None:
        self.pending_pf.discard(token)
        if self.table.queue_task(token, token) is Queued.SLEEP:
            self.sleeping.add(token)
        else:
            self.dummies.discard(token)


def test_wake_all_between_a_ready_and_its_not_present_strands_the_task():
    """Why the host sends wake-all only when enabling APF, before any token of the new enable exists: a wake-all
    that consumed the dummy of an early page-ready leaves the later #PF's task asleep for good."""
    table: SleepTable[str] = SleepTable()
    table.wake(0x1000)  # page-ready first: dummy
    table.wake_all()  # drops the dummy
    assert table.queue_task(0x1000, "t") is Queued.SLEEP  # the #PF now sleeps, and no wake will come
    assert table.sleepers == 1


TestSleepTableMachine = SleepTableMachine.TestCase
