# The host's per-vCPU APF state machine: what KVM keeps in `vcpu->arch.apf` and `vcpu->async_pf`, and the functions
# that change it, each named after the KVM function it follows (arch/x86/kvm/x86.c and msrs.c, mmu/mmu.c,
# virt/kvm/async_pf.c, lapic.c). Sans I/O: it reads and writes the guest's `struct kvm_vcpu_pv_apf_data` (a view
# over guest RAM), logs KVM's tracepoints, and returns decisions; host_daemon/vcpu_conn.py does the sending, the
# page-ins, the waiting and the entries.
#
# The vCPU's life as KVM runs it, and as this module models it:
# - A VM exit (a request from the guest) ends with an *entry* (`entry`): the requests KVM_REQ_APF_HALT and
#   KVM_REQ_APF_READY are processed there, in vcpu_enter_guest's order (HALT first: the vCPU then blocks instead
#   of entering). A running vCPU is "kicked" into an entry by a completion only if no page-ready is pending
#   (`kvm_arch_async_page_present_queued`); otherwise a completion waits for the next exit or the ACK.
# - A fault on a page that is out (`on_fault`, after `__kvm_mmu_faultin_pfn`): with interrupts off
#   (`kvm_can_do_async_pf`) it is synchronous; otherwise `kvm_try_async_get_page` is traced, a gfn already being
#   paged in is a repeated fault (KVM_REQ_APF_HALT), and a new one becomes async work (`kvm_setup_async_pf`, at most
#   ASYNC_PF_PER_VCPU, else synchronous) whose not-present is injected as #PF if it can be delivered
#   (`kvm_can_deliver_async_pf`: APF on with DELIVERY_AS_INT, user mode or SEND_ALWAYS) and otherwise turned into
#   the artificial halt (KVM_REQ_APF_HALT). APF need not be enabled for the halt: it is KVM's non-PV "halt while
#   swapping in". A halted vCPU blocks until its done list is not empty (`kvm_vcpu_has_events`), then enters
#   again: interrupts (a page-ready of another token) are delivered, the guest retries the access, and either finds
#   the page or faults again (a repeated fault: halt again).
# - A page-in finished (`complete`, after `async_pf_execute`): the item joins the done list; only the first item of
#   an empty list raises KVM_REQ_APF_READY and perhaps a kick; `kvm_async_pf_completed` is traced after that.
# - Delivery (`check_completion`, `kvm_check_async_pf_completion`): while the done list is not empty and
#   `kvm_arch_can_dequeue_async_page_present` (APF off: always, the event is consumed; on: the LAPIC is enabled and
#   the token slot is 0), `kvm_arch_async_page_ready` prefaults the item's page (`prefault`: if it was evicted again,
#   the caller faults it in synchronously, then calls `page_ready`), and `kvm_arch_async_page_present` traces
#   `kvm_async_pf_ready` and injects the page-ready vector only for items whose not-present was injected (and
#   wake-alls), setting pageready_pending; it also ends the artificial halt.
# - MSRs: `kvm_pv_enable_async_pf` (reserved bits, DELIVERY_AS_PF_VMEXIT without the feature when the VMM enforces
#   PV CPUID, and an area outside guest RAM when enabling, are #GP before anything is stored; enabling queues a
#   wake-all only if the done list is empty (`kvm_async_pf_wakeup_all`); anything else clears the queue and the gfn
#   hash: `kvm_clear_async_pf_completion_queue` first waits for the page-ins in flight (cancel_work_sync), which
#   `flush` names, so the caller waits, completes them, then calls `clear_async_pf_completion_queue`),
#   `kvm_pv_enable_async_pf_int`
#   (bits 63:8 #GP), MSR_KVM_ASYNC_PF_ACK (bit 0: pageready_pending = false, then `kvm_check_async_pf_completion`),
#   `kvm_get_msr_common` (EN and INT read back as written, ACK reads 0), the x2APIC SPIV register
#   (`apic_set_spiv`: software-enables the LAPIC and, when enabled, raises KVM_REQ_APF_READY; reset value 0xff,
#   disabled).
# - Tokens: `alloc_apf_token`.
#
# The ABI's axis on the host: how a not-present is delivered is decided in `_async_page_not_present` (what it writes
# into guest memory) and named by `FaultDecision.exception` (the vector and CR2 the I/O layer injects). A delivery
# other than the #PF changes this module and, in the guest, guest_agent/apf.py (its handler) and
# guest_agent/kernel.py (`exception_handlers`, by vector): three files; the wire's `exception` already carries any
# vector.
#
# `pf`, the ABI before 5.8, follows 5.7's code where it differs: MSR_KVM_ASYNC_PF_EN has no DELIVERY_AS_INT (bits 5:3
# reserved) and there is no INT or ACK MSR; a not-present is queued as the pending exception (`exception`, KVM's
# vcpu->arch.exception, kvm_inject_page_fault); there are no KVM_REQ_APF_READY and no kick: vcpu_run calls
# `kvm_check_async_pf_completion` after every exit and every block, and it delivers while
# `kvm_arch_can_inject_async_page_present` (APF off: consume; on: `kvm_can_do_async_pf`, interrupts allowed and no
# exception pending); `kvm_arch_async_page_present` writes `reason` = 2 and queues a #PF with CR2 = token, unless
# `reason` still holds a not-present that is still pending (both are then cancelled, commit 9a6e7c39810e); a second
# #PF queued on a pending one is a double fault (`kvm_multiple_exception`). `--no-pending-check` and
# `--no-cancel-pending` take the two historical fixes out. One deliberate difference from 5.7: page-ready is
# injected only for injected not-presents (5.8's fix of bugzilla 208081, kept on every ABI; docs/PROTOCOL.md).
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from shared.abi import (
    APF_EMU_VE_INFO_ADDR_MASK,
    APF_EMU_VE_INFO_ENABLED,
    APF_EMU_VE_INFO_RESERVED,
    APIC_SPIV_APIC_ENABLED,
    APIC_SPIV_RESET,
    ASYNC_PF_PER_VCPU,
    DF_VECTOR,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_INT_VECTOR_MASK,
    KVM_ASYNC_PF_RESERVED,
    KVM_ASYNC_PF_RESERVED_PF,
    KVM_ASYNC_PF_SEND_ERROR,
    KVM_PV_REASON_PAGE_ERROR,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    MSR_APF_EMU_VE_INFO,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_NAMES,
    MSR_X2APIC_SPIV,
    PF_VECTOR,
    U32_MAX,
    U64_MAX,
    VE_VECTOR,
    AsyncPfEn,
    alloc_apf_token,
)
from shared.apf_data import KVM_VCPU_PV_APF_DATA_SIZE, KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE
from shared.ve_info import VE_INFO_SIZE, VeInfo

APF_HALT: Final = "KVM_REQ_APF_HALT"
APF_READY: Final = "KVM_REQ_APF_READY"


@dataclass(slots=True)
class AsyncPf:
    """One async page fault (`struct kvm_async_pf`): queued until its page-in is done, then on the done list."""

    token: int
    gfn: int
    gva: int  # work->cr2_or_gpa: the faulting gpa (KVM runs the guest under TDP)
    hva: int = 0  # work->addr: the host virtual address of the page
    wakeup_all: bool = False
    notpresent_injected: bool = False
    error: bool = False  # `int-error`: the page-in failed (work->error_code)


class Fault(Enum):
    SYNC = "sync"  # faulted in on the vCPU thread; the exit ends when the page is in
    INJECT = "inject"  # a not-present #PF is injected at the entry
    HALT = "halt"  # the artificial halt (KVM_REQ_APF_HALT)


@dataclass(frozen=True, slots=True)
class FaultDecision:
    kind: Fault
    item: AsyncPf | None = None  # new async work (INJECT, or HALT on a new gfn): its page-in must be started
    reason: str | None = None  # why it is not an injected APF
    exception: tuple[int, int] | None = None  # INJECT: (vector, cr2) of the exception that delivers the not-present


@dataclass(frozen=True, slots=True)
class MsrResult:
    ok: bool
    error: str | None = None
    value: int | None = None  # rdmsr
    vectors: tuple[int, ...] = ()  # interrupts to raise before the exit ends (the ACK's delivery)
    # APF turned off: kvm_clear_async_pf_completion_queue is due once these page-ins in flight have completed
    flush: tuple[AsyncPf, ...] | None = None


def _always_present(_gfn: int) -> bool:
    return True


def _no_save(_apf_id: int) -> None:
    pass


HLT_SPIN_REPORT = 1000  # HLTs in a row that return at once with nothing injected before `kvm_hlt_spin` is logged


@dataclass
class VcpuApf:
    vcpu_id: int
    ram_u32: memoryview
    ram_pages: int
    log: Any
    hva_base: int = 0  # where guest RAM is mapped in the host: kvm_async_pf_completed's `address`
    present: Callable[[int], bool] = _always_present  # the host's own residency of a gfn (for the prefault)
    enforce_pv_cpuid: bool = False  # KVM_CAP_ENFORCE_PV_FEATURE_CPUID, enabled by the VMM
    abi: str = "int"  # the APF design this host runs (shared/abis.py)
    msr_ve: int = 0  # `ve`: MSR_APF_EMU_VE_INFO, where the #VE information area is
    error_gfn: int | None = None  # `int-error`: vcpu->arch.apf.error_gfn, a gfn whose failed page-in went unreported
    no_pending_check: bool = False  # `pf`: kvm_arch_can_inject_async_page_present ignores a pending exception
    no_cancel_pending: bool = False  # `pf`: no cancel of a pending not-present by a page-ready (before 9a6e7c39810e)
    bugs: frozenset[str] = frozenset()  # historical KVM bugs put back (shared/bugs.py)
    # Where the VMM keeps vcpu->arch.apf.id across a host restart (the backing store): called with each new id before
    # its token is logged or injected, so that a host killed at any point never hands the token out again.
    save_apf_id: Callable[[int], None] = _no_save
    exception: tuple[int, int] | None = None  # `pf`: vcpu->arch.exception, queued for the next entry (vector, CR2)
    entry_irq: bool = False  # `pf`: whether the guest can take an exception at the entry being made (RFLAGS.IF)
    msr_en: int = 0  # vcpu->arch.apf.msr_en_val
    msr_int: int = 0  # vcpu->arch.apf.msr_int_val
    apf_id: int = 0  # vcpu->arch.apf.id, the next token id (alloc_apf_token)
    spiv: int = APIC_SPIV_RESET  # the LAPIC's spurious-interrupt vector register: bit 8 is the software enable
    pageready_pending: bool = False  # a page-ready was injected and not yet ACKed (kvm_vcpu_reset keeps it)
    halted: bool = False  # vcpu->arch.apf.halted: the artificial halt
    requests: set[str] = field(default_factory=set)
    queue: dict[int, AsyncPf] = field(default_factory=dict)  # every item not yet freed (token, or id of a wake-all)
    done: deque[AsyncPf] = field(default_factory=deque)  # vcpu->async_pf.done
    gfn_hash: set[int] = field(default_factory=set)  # vcpu->arch.apf.gfns: gfns being paged in asynchronously
    slot_token: int = 0  # the last token this host published in the slot (for `released`)
    reraise: bool = False  # restore found a published page-ready whose interrupt may have died with the old host
    prefault: AsyncPf | None = None  # dequeued, its page out again: to be faulted in before it is presented
    hlt_spins: int = 0  # HLTs in a row that returned at once with nothing injected
    _garbage_reported: bool = False

    # --- state ---------------------------------------------------------------------------------------------------
    @property
    def pv_enabled(self) -> bool:
        """`kvm_pv_async_pf_enabled`: ENABLED and DELIVERY_AS_INT. `pf` (5.7): ENABLED, with an area the gfn cache
        could be set up for (5.7 stores the MSR value before it looks at the address)."""
        return self._en_enabled(AsyncPfEn(self.msr_en))

    def _en_enabled(self, en: AsyncPfEn) -> bool:
        if self.abi == "pf":
            return en.enabled_bit and en.gpa + KVM_VCPU_PV_APF_DATA_SIZE <= self.ram_pages * PAGE_SIZE
        return en.apf_enabled

    @property
    def area(self) -> KvmVcpuPvApfData | None:
        """vcpu->arch.apf.data: the area the last enabling write named (None while APF is off)."""
        if not self.pv_enabled:
            return None
        return KvmVcpuPvApfData(self.ram_u32, AsyncPfEn(self.msr_en).gpa)

    @property
    def send_error(self) -> bool:
        """`int-error`: the guest asked for page-in errors with its page-ready (KVM_ASYNC_PF_SEND_ERROR)."""
        return self.abi == "int-error" and bool(self.msr_en & KVM_ASYNC_PF_SEND_ERROR)

    @property
    def _reserved(self) -> int:
        """Bits 5:4 of MSR_KVM_ASYNC_PF_EN, but bit 4 (SEND_ERROR) where the host offers error delivery; bits 5:3
        on `pf`."""
        if self.abi == "pf":
            return KVM_ASYNC_PF_RESERVED_PF
        return KVM_ASYNC_PF_RESERVED & ~KVM_ASYNC_PF_SEND_ERROR if self.abi == "int-error" else KVM_ASYNC_PF_RESERVED

    @property
    def ve_area(self) -> VeInfo | None:
        """`ve`: the #VE information area the guest placed (None while it has placed none, or on another ABI)."""
        if self.abi != "ve" or not self.msr_ve & APF_EMU_VE_INFO_ENABLED:
            return None
        return VeInfo(self.ram_u32, self.msr_ve & APF_EMU_VE_INFO_ADDR_MASK)

    def area_gfns(self) -> set[int]:
        """The pages the host writes for this vCPU (the areas in force): kept resident while in force."""
        gfns = set()
        if self.pv_enabled:
            gfns.add(AsyncPfEn(self.msr_en).gpa // PAGE_SIZE)
        ve = self.ve_area
        if ve is not None:
            gfns.add(ve.gpa // PAGE_SIZE)
        return gfns

    @property
    def lapic_enabled(self) -> bool:
        """`kvm_lapic_enabled`: the LAPIC is software-enabled (the in-kernel LAPIC is always present)."""
        return bool(self.spiv & APIC_SPIV_APIC_ENABLED)

    @property
    def vector(self) -> int:
        return self.msr_int & KVM_ASYNC_PF_INT_VECTOR_MASK

    @property
    def queued(self) -> int:
        """vcpu->async_pf.queued: items and wake-alls not yet freed (at most ASYNC_PF_PER_VCPU of the former)."""
        return len(self.queue)

    def has_events(self) -> bool:
        """`kvm_vcpu_has_events`, the part apf-emu models: the done list is not empty."""
        return bool(self.done)

    def hlt_returned(self, *, at_once: bool, injected: bool) -> None:
        """A guest HLT ended (`kvm_emulate_halt` -> `kvm_vcpu_block`). One that returned at once, because the done
        list is not empty (`kvm_vcpu_has_events`), and injected nothing, woke the vCPU for nothing; many in a row
        are a spinning vCPU (cloud-hypervisor #2277, libkrun PR 28), which KVM does not report: apf-emu logs
        `kvm_hlt_spin` at 1,000 such HLTs in a row and at every further power of ten."""
        if not at_once or injected:
            self.hlt_spins = 0
            return
        self.hlt_spins += 1
        n = self.hlt_spins
        if n >= HLT_SPIN_REPORT and n == 10 ** (len(str(n)) - 1):
            self.log.warning("kvm_hlt_spin", count=n, done=len(self.done),
                             message="HLT returns at once with nothing to deliver: the vCPU spins")

    # --- MSRs ----------------------------------------------------------------------------------------------------
    def area_gfn_enabled_by(self, msr: int, value: int) -> int | None:
        """The page of an area that writing `value` to `msr` would bring into use (APF turned on, or a #VE area
        placed), else None."""
        if msr == MSR_APF_EMU_VE_INFO:
            gpa = self._ve_area_of(value)
            return gpa // PAGE_SIZE if gpa is not None else None
        if msr != MSR_KVM_ASYNC_PF_EN or not 0 <= value <= U64_MAX:
            return None
        en = AsyncPfEn(value)
        if value & self._reserved or self._vmexit_refused(en) or not self._en_enabled(en):
            return None
        if en.gpa + KVM_VCPU_PV_APF_DATA_SIZE > self.ram_pages * PAGE_SIZE:
            return None
        return en.gpa // PAGE_SIZE

    def write_msr(self, msr: int, value: int) -> MsrResult:
        """`kvm_set_msr_common` for the MSRs apf-emu has."""
        if not 0 <= value <= U64_MAX:
            result = MsrResult(False, "value is not a u64")
        elif msr in (MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_ACK) and self.abi == "pf":
            result = MsrResult(False, "unknown MSR")  # 5.7 has neither: kvm_set_msr_common's default
        elif msr == MSR_KVM_ASYNC_PF_EN:
            result = self._enable_async_pf(value)
        elif msr == MSR_KVM_ASYNC_PF_INT:
            if value >> 8:  # kvm_pv_enable_async_pf_int
                result = MsrResult(False, "bits 63:8 of MSR_KVM_ASYNC_PF_INT are reserved")
            else:
                self.msr_int = value
                result = MsrResult(True)
        elif msr == MSR_KVM_ASYNC_PF_ACK:
            vectors: list[int] = []
            if value & 0x1:
                self.log.info("apf_ack", value=value)
                self.pageready_pending = False
                vectors = self.check_completion()
            result = MsrResult(True, vectors=tuple(vectors))
        elif msr == MSR_APF_EMU_VE_INFO and self.abi == "ve":
            result = self._set_ve_info(value)
        elif msr == MSR_X2APIC_SPIV:
            if value >> 32:
                result = MsrResult(False, "bits 63:32 of the x2APIC SPIV register are reserved")
            else:
                self._set_spiv(value & 0x3FF)
                result = MsrResult(True)
        else:
            result = MsrResult(False, "unknown MSR")
        if msr != MSR_KVM_ASYNC_PF_ACK or not result.ok:
            self.log.info("msr_write", msr=MSR_NAMES.get(msr, hex(msr) if isinstance(msr, int) else str(msr)),
                          value=value, ok=result.ok, error=result.error)
        return result

    def read_msr(self, msr: int) -> MsrResult:
        """`kvm_get_msr_common`: EN and INT read back as stored, ACK reads 0."""
        values = {MSR_KVM_ASYNC_PF_EN: self.msr_en, MSR_KVM_ASYNC_PF_INT: self.msr_int, MSR_KVM_ASYNC_PF_ACK: 0,
                  MSR_X2APIC_SPIV: self.spiv}
        if self.abi == "ve":
            values[MSR_APF_EMU_VE_INFO] = self.msr_ve
        if self.abi == "pf":
            del values[MSR_KVM_ASYNC_PF_INT], values[MSR_KVM_ASYNC_PF_ACK]
        if msr not in values:
            return MsrResult(False, "unknown MSR")
        return MsrResult(True, value=values[msr])

    def _enable_async_pf(self, value: int) -> MsrResult:
        """`kvm_pv_enable_async_pf`: everything that makes it #GP is checked before the value is stored (5.8+;
        5.7 stores the value before it looks at the area's address: `pf`)."""
        en = AsyncPfEn(value)
        if self.abi == "pf":
            return self._enable_async_pf_57(value)
        if value & self._reserved:
            return MsrResult(False, "bits 5:4 of MSR_KVM_ASYNC_PF_EN are reserved" if self.abi != "int-error" else
                             "bit 5 of MSR_KVM_ASYNC_PF_EN is reserved")
        if self._vmexit_refused(en):
            return MsrResult(False, "DELIVERY_AS_PF_VMEXIT without KVM_FEATURE_ASYNC_PF_VMEXIT")
        if en.apf_enabled and en.gpa + KVM_VCPU_PV_APF_DATA_SIZE > self.ram_pages * PAGE_SIZE:
            return MsrResult(False, f"APF area {en.gpa:#x} is outside guest RAM")  # kvm_gfn_to_hva_cache_init
        self.msr_en = value
        if en.apf_enabled:
            self._garbage_reported = False
            self._wakeup_all()
            return MsrResult(True)
        if "no-disable-eat" in self.bugs:
            return MsrResult(True)  # the completions stay queued, for whatever enables APF next
        # kvm_clear_async_pf_completion_queue: cancel_work_sync waits for every page-in that is running; each then
        # completes as usual (joins the done list, kvm_async_pf_completed) before the whole queue is freed.
        done = {id(item) for item in self.done}
        return MsrResult(True, flush=tuple(item for item in self.queue.values()
                                           if not item.wakeup_all and id(item) not in done))

    def _enable_async_pf_57(self, value: int) -> MsrResult:
        """5.7's `kvm_pv_enable_async_pf`: bits 5:3 reserved (#GP); the value is stored; turning APF off clears the
        queue; an area outside guest RAM is a #GP after the store (kvm_gfn_to_hva_cache_init), and APF stays off
        in effect (`pv_enabled`: the host cannot write it); else the wake-all."""
        en = AsyncPfEn(value)
        if value & KVM_ASYNC_PF_RESERVED_PF:
            return MsrResult(False, "bits 5:3 of MSR_KVM_ASYNC_PF_EN are reserved")
        if self._vmexit_refused(en):
            return MsrResult(False, "DELIVERY_AS_PF_VMEXIT without KVM_FEATURE_ASYNC_PF_VMEXIT")
        self.msr_en = value
        if not en.enabled_bit and "no-disable-eat" in self.bugs:
            return MsrResult(True)
        if not en.enabled_bit:
            done = {id(item) for item in self.done}
            return MsrResult(True, flush=tuple(item for item in self.queue.values()
                                               if not item.wakeup_all and id(item) not in done))
        if not self.pv_enabled:
            return MsrResult(False, f"APF area {en.gpa:#x} is outside guest RAM")
        self._garbage_reported = False
        self._wakeup_all()
        return MsrResult(True)

    def _vmexit_refused(self, en: AsyncPfEn) -> bool:
        """DELIVERY_AS_PF_VMEXIT without KVM_FEATURE_ASYNC_PF_VMEXIT is a #GP only when the VMM enforces PV CPUID
        (`guest_pv_has` is true for every feature otherwise)."""
        return en.delivery_as_pf_vmexit and self.enforce_pv_cpuid

    def clear_async_pf_completion_queue(self, reason: str) -> None:
        """`kvm_clear_async_pf_completion_queue` once the page-ins in flight are done, and
        `kvm_async_pf_hash_reset`: every outstanding event is eaten, never delivered."""
        for item in self.queue.values():
            if not item.wakeup_all:
                self.log.info("apf_ready_dropped", token=item.token, gfn=item.gfn, reason=reason)
        self.queue.clear()
        self.done.clear()
        self.prefault = None
        self.gfn_hash.clear()

    def _ve_area_of(self, value: int) -> int | None:
        """The gpa of the #VE area a valid enabling MSR_APF_EMU_VE_INFO value names, else None."""
        if self.abi != "ve" or not 0 <= value <= U64_MAX or value & APF_EMU_VE_INFO_RESERVED \
                or not value & APF_EMU_VE_INFO_ENABLED:
            return None
        gpa = value & APF_EMU_VE_INFO_ADDR_MASK
        return gpa if gpa + VE_INFO_SIZE <= self.ram_pages * PAGE_SIZE else None

    def _set_ve_info(self, value: int) -> MsrResult:
        """`ve` (apf-emu's design): bit 0 enables #VE delivery of not-presents into the 8-byte-aligned area at bits
        63:3; bits 2:1 are reserved; an area outside guest RAM is a #GP, checked before anything is stored."""
        if value & APF_EMU_VE_INFO_RESERVED:
            return MsrResult(False, "bits 2:1 of MSR_APF_EMU_VE_INFO are reserved")
        if value & APF_EMU_VE_INFO_ENABLED and self._ve_area_of(value) is None:
            return MsrResult(False, f"#VE information area {value & APF_EMU_VE_INFO_ADDR_MASK:#x} is outside guest "
                             "RAM")
        self.msr_ve = value
        return MsrResult(True)

    def _set_spiv(self, value: int) -> None:
        """`apic_set_spiv`: pending page-ready events are looked at again whenever the LAPIC is enabled."""
        self.spiv = value
        if self.lapic_enabled and "lapic-disabled" not in self.bugs:  # 2f15d027c05f added this
            self.requests.add(APF_READY)

    def _wakeup_all(self) -> None:
        """`kvm_async_pf_wakeup_all`: only if the done list is empty."""
        if self.done:
            self.log.info("apf_wakeup_all_skipped", done=len(self.done))
            return
        item = AsyncPf(KVM_APF_WAKE_ALL_TOKEN, -1, 0, wakeup_all=True)
        self.queue[id(item)] = item  # keyed apart so that it never collides with a token
        self.done.append(item)
        self._present_queued()  # first: the list was empty

    def restore(self, msr_en: int, msr_int: int, apf_id: int, spiv: int, msr_ve: int = 0) -> None:
        """Registers restored by a VMM after a host restart (KVM_SET_MSRS, KVM_SET_LAPIC): the enabling write
        queues a wake-all as `kvm_pv_enable_async_pf` does, which replaces the events in flight that died with
        the old host; an interrupt whose page-ready is still in the slot is raised again (the restored IRR)."""
        self.msr_int = msr_int
        self.apf_id = apf_id
        self._set_spiv(spiv)
        if self._ve_area_of(msr_ve) is not None:
            self.msr_ve = msr_ve
        self.msr_en = msr_en
        area = self.area
        if area is not None and self.area_gfn_enabled_by(MSR_KVM_ASYNC_PF_EN, msr_en) is not None:
            self.slot_token = area.token
            self.reraise = self.slot_token != 0
            self._wakeup_all()
        else:
            self.msr_en = 0
        self.log.info("vcpu_restore", msr_en=msr_en, msr_int=msr_int, apf_id=apf_id, spiv=spiv, msr_ve=self.msr_ve,
                      apf_enabled=self.pv_enabled, slot=self.slot_token)

    # --- faults --------------------------------------------------------------------------------------------------
    def on_fault(self, gfn: int, gva: int, *, user: bool, irq: bool, hva: int = 0) -> FaultDecision:
        """`__kvm_mmu_faultin_pfn` for a page that needs I/O: synchronous, injected, or the artificial halt."""
        if not irq:  # kvm_can_do_async_pf: "if interrupts are off we cannot even use an artificial halt state"
            self.log.info("apf_sync_fault", gfn=gfn, reason="irq_disabled")
            return FaultDecision(Fault.SYNC, reason="irq_disabled")
        if gfn == self.error_gfn:  # `int-error`, the RFC's kvm_can_do_async_pf(vcpu, gfn): an unreported failure
            self.log.info("apf_sync_fault", gfn=gfn, reason="error_gfn")
            return FaultDecision(Fault.SYNC, reason="error_gfn")
        self.log.info("kvm_try_async_get_page", gva=gva, gfn=gfn)
        if gfn in self.gfn_hash:  # kvm_find_async_pf_gfn
            self.log.info("kvm_async_pf_repeated_fault", gva=gva, gfn=gfn)
            self.requests.add(APF_HALT)
            return FaultDecision(Fault.HALT, reason="repeated_fault")
        # kvm_arch_setup_async_pf allocates the token before kvm_setup_async_pf looks at the queue: a refused
        # fault uses up an id too.
        self.apf_id, token = alloc_apf_token(self.apf_id, self.vcpu_id, zero_ok="token-zero" in self.bugs)
        self.save_apf_id(self.apf_id)
        if self.queued >= ASYNC_PF_PER_VCPU:  # kvm_setup_async_pf refuses
            self.log.info("apf_sync_fault", gfn=gfn, reason="queue_full")
            return FaultDecision(Fault.SYNC, reason="queue_full")
        item = AsyncPf(token, gfn, gva, hva)
        self.queue[token] = item
        exception, reason = self._async_page_not_present(item, user=user)
        item.notpresent_injected = exception is not None
        if exception is not None:
            return FaultDecision(Fault.INJECT, item, exception=exception)
        return FaultDecision(Fault.HALT, item, reason=reason)

    def _async_page_not_present(self, item: AsyncPf, *, user: bool) -> tuple[tuple[int, int] | None, str]:
        """`kvm_arch_async_page_not_present`: traced, hashed, and injected if it can be delivered; else the halt.
        Returns the exception that delivers it (vector, CR2), or None and why it is not delivered.

        `int`: #PF with CR2 = token after `flags` = PAGE_NOT_PRESENT. `ve` (apf-emu's design), once the guest has
        placed its #VE area: #VE (no CR2) after the area is filled and its busy word set; while the busy word is
        still set (the guest has not taken the last one) the vCPU halts instead, as a convertible EPT violation
        is an ordinary VM exit then."""
        deliver = self._can_deliver(user=user)
        reason = "apf_disabled" if not self.pv_enabled else "kernel_mode"
        ve = self.ve_area if deliver else None
        if ve is not None and ve.busy != 0:
            deliver, reason = False, "ve_busy"
        self.log.info("kvm_async_pf_not_present", token=item.token, gva=item.gva, gfn=item.gfn, injected=deliver,
                      **({"vector": VE_VECTOR} if ve is not None else {}))
        self.gfn_hash.add(item.gfn)  # kvm_add_async_pf_gfn
        area = self.area
        if deliver and ve is not None:
            ve.deliver(item.token, item.gva)
            return (VE_VECTOR, 0), ""
        if deliver and area is not None:
            area.flags = KVM_PV_REASON_PAGE_NOT_PRESENT  # apf_put_user_notpresent (5.7: apf_put_user): no read
            if self.abi == "pf":
                self.exception = (PF_VECTOR, item.token)  # kvm_inject_page_fault: pending until the entry
            return (PF_VECTOR, item.token), ""  # #PF, CR2 = token
        self.requests.add(APF_HALT)
        return None, reason

    def _can_deliver(self, *, user: bool) -> bool:
        """`kvm_can_deliver_async_pf`: APF on, and CPL other than 0 unless SEND_ALWAYS (the wire's `user` is CPL 3;
        paging is on and there is no nesting in apf-emu)."""
        return self.pv_enabled and (user or AsyncPfEn(self.msr_en).send_always)

    # --- completion and delivery ---------------------------------------------------------------------------------
    def complete(self, item: AsyncPf, *, error: bool = False) -> bool:
        """`async_pf_execute` after the page-in (`error`: it failed; the item is notified all the same): the item
        joins the done list. True if the vCPU is to be kicked (it enters, and the entry delivers)."""
        if self.queue.get(item.token) is not item:
            return False  # dropped meanwhile (APF disabled, vCPU reset): nothing to deliver
        item.error = error
        first = not self.done
        self.done.append(item)
        kick = self._present_queued() if first else False
        self.log.info("kvm_async_pf_completed", address=item.hva, gva=item.gva, token=item.token, gfn=item.gfn)
        return kick

    def _present_queued(self) -> bool:
        """`kvm_arch_async_page_present_queued`: KVM_REQ_APF_READY, and a kick unless a page-ready is pending. `pf`
        (5.7) has neither: async_pf_execute only wakes a vCPU that blocks (swake_up_one); a running one finds the
        item at its next exit."""
        if self.abi == "pf":
            return False
        self.requests.add(APF_READY)
        return not self.pageready_pending

    def entry(self, *, irq: bool = False) -> list[int]:
        """`vcpu_enter_guest`'s APF requests, in its order. Returns the vectors injected; `halted` says whether
        the vCPU blocks instead of entering. `pf`: 5.7's vcpu_run loop, KVM_REQ_APF_HALT and then
        `kvm_check_async_pf_completion` after every iteration; `irq` says whether the guest has interrupts on, and
        what is to be injected is `take_exception`'s."""
        if self.abi == "pf":
            if APF_HALT in self.requests:
                self.requests.discard(APF_HALT)
                self.halted = True
            self.entry_irq = irq
            self.check_completion()
            return []
        if APF_HALT in self.requests:
            self.requests.discard(APF_HALT)
            self.halted = True
            return []
        if APF_READY in self.requests:
            self.requests.discard(APF_READY)
            return self.check_completion()
        return []

    def take_exception(self) -> tuple[int, int] | None:
        """`pf`: the exception the entry injects (vector, CR2), if any; it is then no longer pending."""
        exception, self.exception = self.exception, None
        return exception

    def unhalt(self) -> None:
        """`vcpu_block` woke up (the done list is not empty): the vCPU is runnable again."""
        self.halted = False

    def check_completion(self) -> list[int]:
        """`kvm_check_async_pf_completion`. Returns the vectors injected (at most one while APF is on). Stops at an
        item whose page `kvm_arch_async_page_ready` must fault in again (`prefault`): the caller does, then calls
        `page_ready`."""
        vectors: list[int] = []
        if self.prefault is not None:
            return vectors  # the vCPU is still in this loop (the I/O layer never re-enters it: its vCPU thread lock)
        while self.done and self._can_dequeue():
            item = self.done.popleft()
            if not item.wakeup_all and not self.present(item.gfn):
                # kvm_arch_async_page_ready: kvm_mmu_do_page_fault(prefetch) maps the page before the page-ready;
                # it was evicted since its page-in, and a prefetch fault never goes async: it is synchronous.
                self.prefault = item
                break
            vector = self._dequeued(item)
            if vector is not None:
                vectors.append(vector)
        return vectors

    def page_ready(self) -> list[int]:
        """The prefault of `prefault` is done (its page is in): present it, and go on with
        `kvm_check_async_pf_completion`."""
        item, self.prefault = self.prefault, None
        assert item is not None, "page_ready without a prefault"
        self.log.info("apf_sync_fault", gfn=item.gfn, reason="prefault", token=item.token)
        vector = self._dequeued(item)
        return ([vector] if vector is not None else []) + self.check_completion()

    def _dequeued(self, item: AsyncPf) -> int | None:
        del self.queue[id(item) if item.wakeup_all else item.token]  # list_del(&work->queue), queued--
        return self._async_page_present(item)

    def _can_dequeue(self) -> bool:
        """`kvm_arch_can_dequeue_async_page_present`: APF off: yes (the event is consumed); on: the LAPIC is
        enabled and the token slot is free (`apf_pageready_slot_free`). `pf`: 5.7's
        `kvm_arch_can_inject_async_page_present`: APF off: yes; on: `kvm_can_do_async_pf`, interrupts allowed and
        no exception pending (`--no-pending-check`: interrupts allowed)."""
        if self.abi == "pf":
            if not AsyncPfEn(self.msr_en).enabled_bit:
                return "no-disable-eat" not in self.bugs
            return self.entry_irq and (self.exception is None or self.no_pending_check or self.no_cancel_pending)
        area = self.area
        if area is None:
            return "no-disable-eat" not in self.bugs  # the bug keeps them for the next enable
        if not self.lapic_enabled and "lapic-disabled" not in self.bugs:  # 2f15d027c05f
            return False
        slot = area.token
        if slot != 0 and slot != self.slot_token and not self._garbage_reported:
            self._garbage_reported = True
            self.log.warning("apf_slot_busy", slot=slot, message="token slot holds a value the host never delivered")
        return slot == 0

    def _async_page_present(self, item: AsyncPf) -> int | None:
        """`kvm_arch_async_page_present`: traced always; injected only for an injected not-present or a wake-all,
        with APF on. Ends the artificial halt."""
        if not item.wakeup_all:
            self.gfn_hash.discard(item.gfn)  # kvm_del_async_pf_gfn
        area = self.area
        # bz208081 (before Vitaly Kuznetsov's 2020 fix): every item of an enabled APF got its page-ready.
        inject = (item.wakeup_all or item.notpresent_injected or "bz208081" in self.bugs) and area is not None
        # Logged before the store that publishes it, so that its mono_ns precedes anything the guest logs after
        # reading the slot. `released`: the token this host had published and has now found cleared (the host's
        # own view of the guest's release, which is all the checker has for a guest that does not log).
        report_error = item.error and inject and self.send_error
        vector = PF_VECTOR if self.abi == "pf" else self.vector
        self.log.info("kvm_async_pf_ready", token=item.token, gva=item.gva, gfn=item.gfn, injected=inject,
                      vector=vector if inject else None, released=(self.slot_token or None) if inject else None,
                      **({"error": item.error, "error_reported": report_error} if self.abi == "int-error" else {}))
        if self.abi == "int-error" and item.error and not report_error:
            self.error_gfn = item.gfn  # the RFC: the next fault on it is synchronous, and its failure exits
        self.halted = False
        if self.abi == "pf":
            if inject and area is not None:
                self._page_ready_pf(item, area)
            return None
        if not inject or area is None:
            return None
        area.token = self.slot_token = item.token & U32_MAX  # apf_put_user_ready: the token, then ready_flags
        if self.abi == "int-error":
            area.ready_flags = KVM_PV_REASON_PAGE_ERROR if report_error else 0
        self.pageready_pending = True
        if not self.lapic_enabled:  # "lapic-disabled": __apic_accept_irq drops a fixed interrupt on a disabled LAPIC
            self.log.warning("apf_irq_dropped", token=item.token, vector=self.vector,
                             message="page-ready interrupt dropped: the LAPIC is software-disabled")
            return None
        return self.vector

    def _page_ready_pf(self, item: AsyncPf, area: KvmVcpuPvApfData) -> None:
        """5.7's `kvm_arch_async_page_present` after the trace: `reason` still PAGE_NOT_PRESENT with that #PF still
        pending cancels both (reason = 0, the pending exception dropped; whichever token it was); else `reason` =
        PAGE_READY and a #PF with CR2 = token (~0 for the wake-all) is queued."""
        token = KVM_APF_WAKE_ALL_TOKEN if item.wakeup_all else item.token
        reason = area.flags  # apf_get_user
        pending = self.exception
        if reason == KVM_PV_REASON_PAGE_NOT_PRESENT and pending is not None and pending[0] == PF_VECTOR \
                and not self.no_cancel_pending:
            area.flags = 0
            self.exception = None
            self.log.warning("apf_cancel", token=token, cancelled=pending[1],
                             message="a page-ready met a pending not-present: both dropped (9a6e7c39810e)")
            return
        if reason != 0:
            self.log.warning("reason_overwritten", token=token, old=reason,
                             message="reason written over a value the guest has not read")
        area.flags = KVM_PV_REASON_PAGE_READY
        self._multiple_exception(PF_VECTOR, token)

    def _multiple_exception(self, vector: int, cr2: int) -> None:
        """`kvm_multiple_exception` for the #PFs `pf` queues: nothing pending, queued; a #PF pending (a page-fault
        class exception, then one that is not benign), a double fault; a #DF pending, a triple fault (the VM
        shuts down: apf-emu's guest sees the #DF again and is already panicking)."""
        pending = self.exception
        if pending is None:
            self.exception = (vector, cr2)
            return
        self.log.error("kvm_multiple_exception", prev=pending[0], prev_cr2=pending[1], nr=vector, cr2=cr2,
                       result="triple_fault" if pending[0] == DF_VECTOR else "double_fault")
        self.exception = (DF_VECTOR, 0)

    def outstanding(self) -> list[AsyncPf]:
        """The events not yet freed (wake-alls aside): what a vCPU that is not reset keeps (a kexec)."""
        return [item for item in self.queue.values() if not item.wakeup_all]

    def adopt(self, items: list[AsyncPf]) -> None:
        """`no-disable-eat`: a kexec kept the vCPU, and with it the events the crashed kernel left; they are done
        (their page-ins ended with the old kernel's connection), and go out once APF is on again."""
        for item in items:
            self.queue[item.token] = item
            self.done.append(item)
            self.log.info("apf_carried", token=item.token, gfn=item.gfn,
                          message="kept across the kexec: no-disable-eat")

    def reset(self, reason: str) -> None:
        """`kvm_vcpu_reset` (and destroy): MSRs cleared, queue eaten, gfn hash reset, halt ended; pageready_pending
        is not reset. The page-ins in flight are not waited for here (the guest is gone)."""
        self.clear_async_pf_completion_queue(reason)
        self.msr_en = self.msr_int = self.msr_ve = 0
        self.error_gfn = None
        self.exception = None
        self.halted = False
        self.requests.clear()
        self.spiv = APIC_SPIV_RESET  # kvm_lapic_reset: apic_set_spiv(apic, 0xff), software-disabled
