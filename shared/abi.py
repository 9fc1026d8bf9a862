# The KVM async page fault ABI, x86, interrupt-based delivery (Linux 5.8+).
#
# This module owns the numbers both sides agree on: MSR numbers and bits, the `flags` reasons, the token format and
# the per-vCPU limit. Names match the kernel's (arch/x86/include/uapi/asm/kvm_para.h, arch/x86/kvm/x86.c) so that a
# reader can grep the kernel for any of them. Nothing here does I/O.
from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# --- MSRs (Documentation/virt/kvm/x86/msr.rst) -------------------------------------------------------------------
MSR_KVM_ASYNC_PF_EN: Final = 0x4B564D02
MSR_KVM_ASYNC_PF_INT: Final = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK: Final = 0x4B564D07

# apf-emu's own, for its `ve` ABI (shared/abis.py): where the #VE information area of this vCPU is. In KVM's range
# (0x4b564d00-0x4b564dff), above every MSR KVM defines.
MSR_APF_EMU_VE_INFO: Final = 0x4B564DF0
APF_EMU_VE_INFO_ENABLED: Final = 1 << 0
APF_EMU_VE_INFO_RESERVED: Final = 0x6  # bits 2:1
APF_EMU_VE_INFO_ADDR_MASK: Final = ~0x7 & 0xFFFF_FFFF_FFFF_FFFF  # bits 63:3: the 8-byte-aligned area

MSR_NAMES: Final = {
    MSR_KVM_ASYNC_PF_EN: "MSR_KVM_ASYNC_PF_EN",
    MSR_KVM_ASYNC_PF_INT: "MSR_KVM_ASYNC_PF_INT",
    MSR_KVM_ASYNC_PF_ACK: "MSR_KVM_ASYNC_PF_ACK",
    MSR_APF_EMU_VE_INFO: "MSR_APF_EMU_VE_INFO",
    0x80F: "APIC_SPIV",
}

# MSR_KVM_ASYNC_PF_EN bits
KVM_ASYNC_PF_ENABLED: Final = 1 << 0
KVM_ASYNC_PF_SEND_ALWAYS: Final = 1 << 1
KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT: Final = 1 << 2
KVM_ASYNC_PF_DELIVERY_AS_INT: Final = 1 << 3
KVM_ASYNC_PF_RESERVED: Final = 0x30  # bits 5:4
KVM_ASYNC_PF_RESERVED_PF: Final = 0x38  # `pf` (5.7's kvm_pv_enable_async_pf): bits 5:3, DELIVERY_AS_INT among them
KVM_ASYNC_PF_SEND_ERROR: Final = 1 << 4  # `int-error` (Vivek Goyal's RFC, June 2020): bit 4 is no longer reserved
KVM_ASYNC_PF_ADDR_MASK: Final = ~0x3F & 0xFFFF_FFFF_FFFF_FFFF  # bits 63:6

# MSR_KVM_ASYNC_PF_INT: vector in bits 7:0, bits 63:8 must be zero.
KVM_ASYNC_PF_INT_VECTOR_MASK: Final = 0xFF

# The vector Linux programs (HYPERVISOR_CALLBACK_VECTOR) and kvm-unit-tests uses.
HYPERVISOR_CALLBACK_VECTOR: Final = 0xF3

# --- the local APIC's software enable (arch/x86/kvm/lapic.c apic_set_spiv) -----------------------------------------
# Page-ready is delivered only while the LAPIC is software-enabled (kvm_arch_can_dequeue_async_page_present). A
# guest enables it by writing the spurious-interrupt vector register with bit 8; apf-emu's vCPUs are in x2APIC mode,
# where that register is MSR 0x80f. After reset it holds 0xff: disabled.
MSR_X2APIC_SPIV: Final = 0x80F
APIC_SPIV_APIC_ENABLED: Final = 1 << 8
APIC_SPIV_RESET: Final = 0xFF
SPURIOUS_APIC_VECTOR: Final = 0xFF  # the spurious vector Linux programs with the enable bit

# --- CPUID 0x40000001 EAX feature bits that apf-emu's "host" advertises -------------------------------------------
KVM_FEATURE_ASYNC_PF: Final = 1 << 4
KVM_FEATURE_ASYNC_PF_VMEXIT: Final = 1 << 10  # not advertised: apf-emu has no nested guests
KVM_FEATURE_ASYNC_PF_INT: Final = 1 << 14
APF_EMU_CPUID_FEATURES: Final = KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_INT  # the `int` ABI's
KVM_FEATURE_ASYNC_PF_VE: Final = 1 << 29  # apf-emu's, not KVM's: not-present as #VE (shared/abis.py)
KVM_FEATURE_ASYNC_PF_ERROR: Final = 1 << 15  # Vivek Goyal's RFC: page-ready can report a failed page-in

# --- exception vectors --------------------------------------------------------------------------------------------
DF_VECTOR: Final = 8  # #DF: kvm_multiple_exception's verdict on a #PF queued while a #PF is pending
PF_VECTOR: Final = 14  # #PF
VE_VECTOR: Final = 20  # #VE, the virtualization exception (a fault, no error code)

# --- struct kvm_vcpu_pv_apf_data.flags (`reason` of the pre-5.8 ABI, `pf`: the same u32 at offset 0) --------------
KVM_PV_REASON_PAGE_NOT_PRESENT: Final = 1
KVM_PV_REASON_PAGE_READY: Final = 2  # `pf` only (the pre-5.8 ABI): page-ready as #PF, CR2 = token
# `int-error`: struct kvm_vcpu_pv_apf_data.ready_flags (@8), written by the host with every token
KVM_PV_REASON_PAGE_ERROR: Final = 1

# --- tokens (arch/x86/kvm/mmu/mmu.c kvm_arch_setup_async_pf) ------------------------------------------------------
ASYNC_PF_PER_VCPU: Final = 64
TOKEN_VCPU_BITS: Final = 12
TOKEN_VCPU_MASK: Final = (1 << TOKEN_VCPU_BITS) - 1
TOKEN_ID_LIMIT: Final = 1 << (32 - TOKEN_VCPU_BITS)  # ids repeat in tokens after this many (u32 arithmetic)
KVM_APF_WAKE_ALL_TOKEN: Final = 0xFFFF_FFFF  # `work->arch.token = ~0` in kvm_async_pf_wakeup_all
MAX_VCPUS: Final = 64  # apf-emu's own limit: one 64-byte APF area slot per vCPU in the guest's kernel page

U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF


def make_token(apf_id: int, vcpu_id: int) -> int:
    """``(id << 12) | vcpu_id``, truncated to u32 like the kernel's."""
    return ((apf_id << TOKEN_VCPU_BITS) | (vcpu_id & TOKEN_VCPU_MASK)) & U32_MAX


def token_vcpu(token: int) -> int:
    return token & TOKEN_VCPU_MASK


def token_id(token: int) -> int:
    return token >> TOKEN_VCPU_BITS


def alloc_apf_token(apf_id: int, vcpu_id: int, *, zero_ok: bool = False) -> tuple[int, int]:
    """`alloc_apf_token` (arch/x86/kvm/mmu/mmu.c): `apf_id` is vcpu->arch.apf.id, the next id to use. Returns
    (the new id, the token). If `id << 12` is 0 as a u32 (the first call, and every 2^20 calls) the id becomes 1,
    so that no token is 0, the value that also means "slot free" (Liang Zhang's 2022 fix). `zero_ok`: the code
    before that fix (`(vcpu->arch.apf.id++ << 12) | vcpu->vcpu_id`), whose first token on vCPU 0 is 0."""
    if not zero_ok and (apf_id << TOKEN_VCPU_BITS) & U32_MAX == 0:
        apf_id = 1
    token = ((apf_id << TOKEN_VCPU_BITS) | vcpu_id) & U32_MAX
    return (apf_id + 1) & U32_MAX, token


def token_is_well_formed(token: int, vcpu_id: int) -> bool:
    """A page-fault token: u32, nonzero, not wake-all, naming this vCPU in its low 12 bits."""
    return (
        0 < token < KVM_APF_WAKE_ALL_TOKEN and token_vcpu(token) == vcpu_id & TOKEN_VCPU_MASK
    )


# --- MSR_KVM_ASYNC_PF_EN decoding --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AsyncPfEn:
    """A decoded MSR_KVM_ASYNC_PF_EN value."""

    raw: int

    @property
    def enabled_bit(self) -> bool:
        return bool(self.raw & KVM_ASYNC_PF_ENABLED)

    @property
    def send_always(self) -> bool:
        return bool(self.raw & KVM_ASYNC_PF_SEND_ALWAYS)

    @property
    def delivery_as_pf_vmexit(self) -> bool:
        return bool(self.raw & KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT)

    @property
    def delivery_as_int(self) -> bool:
        return bool(self.raw & KVM_ASYNC_PF_DELIVERY_AS_INT)

    @property
    def gpa(self) -> int:
        return self.raw & KVM_ASYNC_PF_ADDR_MASK

    @property
    def apf_enabled(self) -> bool:
        """`kvm_pv_async_pf_enabled`: APF is on only with both ENABLED and DELIVERY_AS_INT (5.9+ hosts)."""
        mask = KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
        return (self.raw & mask) == mask


def async_pf_en_value(
    gpa: int, *, enabled: bool = True, send_always: bool = False, delivery_as_int: bool = True
) -> int:
    """The value a guest writes to MSR_KVM_ASYNC_PF_EN (gpa must be 64-byte aligned)."""
    if gpa & 0x3F:
        raise ValueError(f"APF area address {gpa:#x} is not 64-byte aligned")
    value = gpa
    if enabled:
        value |= KVM_ASYNC_PF_ENABLED
    if send_always:
        value |= KVM_ASYNC_PF_SEND_ALWAYS
    if delivery_as_int:
        value |= KVM_ASYNC_PF_DELIVERY_AS_INT
    return value
