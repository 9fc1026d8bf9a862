# The virtualization-exception information area of apf-emu's `ve` ABI (shared/abis.py), a typed view over guest RAM
# like shared/apf_data.py. Its layout is the SDM's (Vol. 3C 25.5.6.1; KVM's struct vmx_ve_information):
#
#     u32 exit_reason;            @0   48: EPT violation
#     u32 busy;                   @4   0xffffffff once delivered; no further #VE until the guest writes 0
#     u64 exit_qualification;     @8   0 (apf-emu records no access type)
#     u64 guest_linear_address;   @16  the APF token (under TDP the host has no linear address: apf-emu's choice)
#     u64 guest_physical_address; @24  the faulting guest-physical address
#     u16 eptp_index;             @32  0
#
# The host writes every field, then `busy` (hardware fills the area, then sets the busy word and delivers #VE); the
# guest reads them and writes `busy` = 0 before anything that could fault again. The host reads only `busy`, only to
# decide whether it may deliver, so garbage there can only hold back this vCPU's own #VEs (the host halts it instead).
from __future__ import annotations

from typing import Final

VE_INFO_SIZE: Final = 40
EXIT_REASON_EPT_VIOLATION: Final = 48
VE_BUSY: Final = 0xFFFF_FFFF


class VeInfo:
    """The area of one vCPU at guest-physical `gpa` (8-byte aligned) of a u32 view of guest RAM."""

    __slots__ = ("_u32", "_w", "gpa")

    def __init__(self, u32: memoryview, gpa: int) -> None:
        if gpa % 8:
            raise ValueError(f"#VE information area at {gpa:#x} is not 8-byte aligned")
        if gpa < 0 or gpa + VE_INFO_SIZE > len(u32) * 4:
            raise ValueError(f"#VE information area at {gpa:#x} is outside guest RAM")
        self.gpa = gpa
        self._u32 = u32
        self._w = gpa // 4

    def _u64(self, word: int) -> int:
        return int(self._u32[self._w + word]) | int(self._u32[self._w + word + 1]) << 32

    def _set_u64(self, word: int, value: int) -> None:
        self._u32[self._w + word] = value & 0xFFFF_FFFF
        self._u32[self._w + word + 1] = (value >> 32) & 0xFFFF_FFFF

    @property
    def exit_reason(self) -> int:
        return int(self._u32[self._w])

    @property
    def busy(self) -> int:
        return int(self._u32[self._w + 1])

    @busy.setter
    def busy(self, value: int) -> None:
        self._u32[self._w + 1] = value

    @property
    def exit_qualification(self) -> int:
        return self._u64(2)

    @property
    def guest_linear_address(self) -> int:
        return self._u64(4)

    @property
    def guest_physical_address(self) -> int:
        return self._u64(6)

    @property
    def eptp_index(self) -> int:
        return int(self._u32[self._w + 8]) & 0xFFFF

    def deliver(self, token: int, gpa: int) -> None:
        """The host's side of a #VE: every field, then the busy word."""
        self._u32[self._w] = EXIT_REASON_EPT_VIOLATION
        self._set_u64(2, 0)
        self._set_u64(4, token)
        self._set_u64(6, gpa)
        self._u32[self._w + 8] = (int(self._u32[self._w + 8]) & 0xFFFF_0000)  # eptp_index 0, the rest untouched
        self.busy = VE_BUSY

    def release(self) -> None:
        self._u32 = memoryview(b"")
