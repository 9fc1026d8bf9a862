# The `ve` ABI's #VE information area (shared/ve_info.py): the SDM's layout, filled before its busy word.
from __future__ import annotations

import pytest

from shared.ve_info import EXIT_REASON_EPT_VIOLATION, VE_BUSY, VE_INFO_SIZE, VeInfo


class Recording:
    """A u32 view that records the order of the words written."""

    def __init__(self, words: int) -> None:
        self.words = [0] * words
        self.writes: list[int] = []

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int) -> int:
        return self.words[i]

    def __setitem__(self, i: int, v: int) -> None:
        self.words[i] = v
        self.writes.append(i)


def test_deliver_fills_the_area_then_sets_the_busy_word():
    ram = Recording(64)
    ve = VeInfo(ram, 16)  # type: ignore[arg-type]
    ve.deliver(0x41003, 0x5_0000_1234)
    assert (ve.exit_reason, ve.busy, ve.exit_qualification, ve.guest_linear_address,
            ve.guest_physical_address, ve.eptp_index) == (EXIT_REASON_EPT_VIOLATION, VE_BUSY, 0, 0x41003,
                                                           0x5_0000_1234, 0)
    assert ram.writes[-1] == 16 // 4 + 1  # the busy word, last
    assert VE_INFO_SIZE == 40


@pytest.mark.parametrize("gpa", [4, 256 - 39, -8])
def test_a_misplaced_area_is_refused(gpa):
    with pytest.raises(ValueError):
        VeInfo(memoryview(bytearray(256)).cast("I"), gpa)
