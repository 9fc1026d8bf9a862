# `struct kvm_vcpu_pv_apf_data` (arch/x86/include/uapi/asm/kvm_para.h) as a typed view over guest memory.
#
#     struct kvm_vcpu_pv_apf_data {
#         __u32 flags;    /* offset 0: host writes KVM_PV_REASON_PAGE_NOT_PRESENT, guest resets to 0 in its #PF */
#         __u32 token;    /* offset 4: host writes the page-ready token, guest writes 0 then ACKs */
#         __u8 pad[56];
#     };                  /* 64 bytes, 64-byte aligned */
#
# From 5.8 until the 2023 cleanup (6.7) the uapi struct also had `__u32 enabled` at offset 64, the guest's own
# bookkeeping, which KVM never touched (68 bytes, still 64-byte aligned); Linux now keeps that flag in a per-CPU
# variable (`async_pf_enabled`). KVM reads and writes only the first 64 bytes either way.
#
# Each field has exactly one writer per transition (host: 0 -> nonzero, guest: nonzero -> 0), and every access is
# one aligned 32-bit load or store through a memoryview cast to "I" (CPython copies 4 aligned bytes with one
# memcpy, a single mov on x86-64). That is all the atomicity the protocol needs, as in the kernel, where both sides
# use plain READ_ONCE/WRITE_ONCE-style accesses on this page.
from __future__ import annotations

from typing import Final

KVM_VCPU_PV_APF_DATA_SIZE: Final = 64
FLAGS_OFFSET: Final = 0
TOKEN_OFFSET: Final = 4
READY_FLAGS_OFFSET: Final = 8  # `int-error` only (Vivek Goyal's RFC): u32 ready_flags, in the padding otherwise


class KvmVcpuPvApfData:
    """The APF area of one vCPU, at guest-physical address `gpa` of a u32 view of guest RAM."""

    __slots__ = ("_flags_ix", "_ready_flags_ix", "_token_ix", "_u32", "gpa")

    def __init__(self, u32: memoryview, gpa: int) -> None:
        if gpa % KVM_VCPU_PV_APF_DATA_SIZE:
            raise ValueError(f"kvm_vcpu_pv_apf_data at {gpa:#x} is not 64-byte aligned")
        if gpa < 0 or (gpa + KVM_VCPU_PV_APF_DATA_SIZE) > len(u32) * 4:
            raise ValueError(f"kvm_vcpu_pv_apf_data at {gpa:#x} is outside guest RAM")
        self.gpa = gpa
        self._u32 = u32
        self._flags_ix = (gpa + FLAGS_OFFSET) // 4
        self._token_ix = (gpa + TOKEN_OFFSET) // 4
        self._ready_flags_ix = (gpa + READY_FLAGS_OFFSET) // 4

    @property
    def flags(self) -> int:
        return int(self._u32[self._flags_ix])

    @flags.setter
    def flags(self, value: int) -> None:
        self._u32[self._flags_ix] = value

    @property
    def token(self) -> int:
        return int(self._u32[self._token_ix])

    @token.setter
    def token(self, value: int) -> None:
        self._u32[self._token_ix] = value

    @property
    def ready_flags(self) -> int:
        return int(self._u32[self._ready_flags_ix])

    @ready_flags.setter
    def ready_flags(self, value: int) -> None:
        self._u32[self._ready_flags_ix] = value

    @property
    def ram(self) -> memoryview:
        """The u32 view of guest RAM this area lies in (for other areas of the same vCPU)."""
        return self._u32

    def read_and_reset_flags(self) -> int:
        """`kvm_read_and_reset_apf_flags`: the guest's #PF entry reads `flags` and writes 0."""
        flags = self.flags
        self.flags = 0
        return flags

    def release(self) -> None:
        """Drop the reference to guest RAM so that the mapping can be closed."""
        self._u32 = memoryview(b"")
