# The guest's interrupt model: taken at once only with IF set at an open boundary; otherwise pending, in order,
# coalesced per vector, and taken when IF comes back; handlers never nest.
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from guest_agent.cpu import Cpu
from tests.conftest import EventLog


def make_cpu() -> tuple[Cpu, list[tuple[int, bool, str]]]:
    taken: list[tuple[int, bool, str]] = []
    log = EventLog()
    cpu: Cpu

    def handler(vector: int) -> None:
        taken.append((vector, cpu.if_flag, cpu.stack[-1]))

    cpu = Cpu(handler, log)
    return cpu, taken


def test_taken_at_once_in_user_mode_with_if_set():
    cpu, taken = make_cpu()
    cpu.enter("user")
    cpu.sti()
    cpu.raise_irq(0xF3)
    assert taken == [(0xF3, False, "irq_handler")]  # handlers run with IF clear (interrupt gate)
    assert cpu.if_flag


def test_pending_while_interrupts_are_off_then_taken_on_sti():
    cpu, taken = make_cpu()
    cpu.enter("irq_off")
    cpu.raise_irq(0xF3)
    cpu.raise_irq(0xF3)  # coalesced
    cpu.raise_irq(0xEC)
    assert taken == [] and cpu.coalesced == 1
    assert cpu.deferred == {"irq_off": 2}
    cpu.enter("user")
    cpu.sti()
    assert [v for v, _, _ in taken] == [0xF3, 0xEC]


def test_never_inside_an_exit_or_an_instruction_even_with_if_set():
    cpu, taken = make_cpu()
    cpu.enter("user")
    cpu.sti()
    cpu.push("exit")
    cpu.raise_irq(0xF3)
    cpu.pop()  # an exit that injects an exception does not take interrupts on the way out
    assert taken == []
    with cpu.context("instruction"):
        cpu.raise_irq(0xEC)
        assert taken == []
    assert [v for v, _, _ in taken] == [0xF3, 0xEC]  # taken at the boundary after the instruction


def test_a_vector_raised_inside_a_handler_waits_for_it_to_finish():
    taken: list[int] = []
    cpu: Cpu

    def handler(vector: int) -> None:
        taken.append(vector)
        if vector == 1:
            cpu.raise_irq(2)  # e.g. the host's next page-ready, raised during the ACK
            assert taken == [1]

    cpu = Cpu(handler, EventLog())
    cpu.enter("halt")
    cpu.sti()
    cpu.raise_irq(1)
    assert taken == [1, 2]
    assert list(cpu.deferred) == ["halt/irq_handler"]


@given(st.lists(st.tuples(st.sampled_from(["raise", "cli", "sti", "user", "kernel", "irq_off"]),
                          st.integers(0, 3)), max_size=60))
def test_every_raised_vector_is_taken_once_interrupts_are_on(ops):
    cpu, taken = make_cpu()
    raised = []
    for op, vector in ops:
        if op == "raise":
            if vector not in cpu.pending:
                raised.append(vector)
            cpu.raise_irq(vector)
        elif op == "cli":
            cpu.cli()
        elif op == "sti":
            cpu.sti()
        else:
            cpu.enter(op)
        if cpu.if_flag and cpu.stack[-1] in ("user", "halt"):
            assert not cpu.pending  # nothing waits when it could be taken
    cpu.enter("user")
    cpu.sti()
    assert [v for v, _, _ in taken] == raised
    assert all(not if_on for _, if_on, _ in taken)
