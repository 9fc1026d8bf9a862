# The host's per-vCPU APF state machine: what KVM keeps in `vcpu->arch.apf` and `vcpu->async_pf`.
#
# Sans I/O: it reads and writes the guest's `struct kvm_vcpu_pv_apf_data` (a view over guest RAM), logs KVM's
# tracepoints, and returns decisions; the connection handler (host_daemon/vcpu_conn.py) does the sending, the
# page-ins and the waiting. That keeps every protocol rule in this one file and lets tests drive it with hypothesis.
#
# Rules, with the kernel function each follows (arch/x86/kvm/x86.c unless said otherwise):
# - MSR_KVM_ASYNC_PF_EN (`kvm_pv_enable_async_pf`): reserved bits 5:4, DELIVERY_AS_PF_VMEXIT (not advertised) or an
#   area outside guest RAM -> #GP. APF is on only with ENABLED and DELIVERY_AS_INT (`kvm_pv_async_pf_enabled`).
#   Writing a value that is not "on" drops every outstanding item (`kvm_clear_async_pf_completion_queue`): their
#   page-ready events are eaten and logged as apf_ready_dropped. Turning it on queues a wake-all
#   (`kvm_async_pf_wakeup_all`). Deviation: KVM stores the value before validating the address; we store only
#   values that were accepted.
# - MSR_KVM_ASYNC_PF_INT (`kvm_pv_enable_async_pf_int`): bits 63:8 -> #GP.
# - MSR_KVM_ASYNC_PF_ACK: value 1 re-scans the done queue; other values are ignored.
# - A fault on a non-resident gfn becomes an APF only if interrupts are on (`kvm_can_do_async_pf`), the gfn is not
#   already being paged in for this vCPU (else `kvm_async_pf_repeated_fault`), fewer than ASYNC_PF_PER_VCPU items
#   are queued (`kvm_setup_async_pf`), APF is on, the guest is in user mode or asked for SEND_ALWAYS
#   (`kvm_can_deliver_async_pf`) and no wake-all is waiting for the token slot. `flags` is written, never read
#   (`apf_put_user_notpresent`): a value the guest left there refuses nothing. Otherwise
#   it is a synchronous fault: the vCPU stays halted until the page is in, and it gets no page-ready later
#   (bugzilla 208081). The wake-all rule is apf-emu's: until the guest has ACKed a wake-all, no new token is
#   handed out. KVM injects the wake-all of an enable on the next entry, before the guest can fault; but after a
#   host restore (or a re-enable with a page-ready still unread) it may wait for the slot or sit pending in the
#   guest, and a not-present injected meanwhile would have its task woken by the wake-all and its own page-ready
#   leave a dummy behind. The chaos harness found exactly that.
# - Page-ready (`kvm_check_async_pf_completion`): the first done item goes out only when the `token` slot is 0; the
#   host writes the token and raises the programmed vector. Wake-all items are always delivered; items whose
#   not-present was not injected never are.
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shared.abi import (
    ASYNC_PF_PER_VCPU,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_INT_VECTOR_MASK,
    KVM_ASYNC_PF_RESERVED,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_NAMES,
    U64_MAX,
    AsyncPfEn,
    make_token,
    next_apf_id,
)
from shared.apf_data import KVM_VCPU_PV_APF_DATA_SIZE, KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE


@dataclass(slots=True)
class AsyncPf:
    """One outstanding async page fault (`struct kvm_async_pf`)."""

    token: int
    gfn: int
    wakeup_all: bool = False
    notpresent_injected: bool = True
    done: bool = False


@dataclass(frozen=True, slots=True)
class MsrResult:
    ok: bool
    error: str | None = None
    rescan: bool = False  # the caller should run check_completion (ACK, enable)


@dataclass(frozen=True, slots=True)
class FaultDecision:
    apf: AsyncPf | None  # None: handle synchronously
    reason: str | None = None


@dataclass
class VcpuApf:
    vcpu_id: int
    ram_u32: memoryview
    ram_pages: int
    log: Any
    msr_en: int = 0
    msr_int: int = 0
    apf_id: int = 0
    area: KvmVcpuPvApfData | None = None
    queue: dict[int, AsyncPf] = field(default_factory=dict)  # token -> item, all not yet delivered or dropped
    done: deque[AsyncPf] = field(default_factory=deque)
    gfn_hash: set[int] = field(default_factory=set)  # gfns being paged in asynchronously for this vCPU
    slot_token: int = 0  # the last token the host wrote into the `token` slot
    reraise: bool = False  # restore found a published page-ready whose interrupt may have been lost
    wakeup_all_unacked: bool = False
    _garbage_reported: bool = False

    # --- state ---------------------------------------------------------------------------------------------------
    @property
    def apf_enabled(self) -> bool:
        return self.area is not None and AsyncPfEn(self.msr_en).apf_enabled

    @property
    def vector(self) -> int:
        return self.msr_int & KVM_ASYNC_PF_INT_VECTOR_MASK

    @property
    def queued(self) -> int:
        return len(self.queue)

    # --- MSRs ----------------------------------------------------------------------------------------------------
    def area_gfn_enabled_by(self, msr: int, value: int) -> int | None:
        """The page of the APF area if writing `value` to `msr` would turn APF on, else None."""
        if msr != MSR_KVM_ASYNC_PF_EN or not 0 <= value <= U64_MAX:
            return None
        en = AsyncPfEn(value)
        if value & KVM_ASYNC_PF_RESERVED or en.delivery_as_pf_vmexit or not en.apf_enabled:
            return None
        if en.gpa + KVM_VCPU_PV_APF_DATA_SIZE > self.ram_pages * PAGE_SIZE:
            return None
        return en.gpa // PAGE_SIZE

    def write_msr(self, msr: int, value: int) -> MsrResult:
        if not 0 <= value <= U64_MAX:
            result = MsrResult(False, "value is not a u64")
        elif msr == MSR_KVM_ASYNC_PF_EN:
            result = self._write_en(value)
        elif msr == MSR_KVM_ASYNC_PF_INT:
            if value & ~KVM_ASYNC_PF_INT_VECTOR_MASK:
                result = MsrResult(False, "bits 63:8 of MSR_KVM_ASYNC_PF_INT are reserved")
            else:
                self.msr_int = value
                result = MsrResult(True)
        elif msr == MSR_KVM_ASYNC_PF_ACK:
            result = MsrResult(True, rescan=value == 1)
            if value == 1:
                self.wakeup_all_unacked = False
                self.log.info("apf_ack")
        else:
            result = MsrResult(False, "unknown MSR")
        if msr != MSR_KVM_ASYNC_PF_ACK or not result.ok:
            self.log.info(
                "msr_write", msr=MSR_NAMES.get(msr, hex(msr) if isinstance(msr, int) else str(msr)),
                value=value, ok=result.ok, error=result.error,
            )
        return result

    def _write_en(self, value: int) -> MsrResult:
        en = AsyncPfEn(value)
        if value & KVM_ASYNC_PF_RESERVED:
            return MsrResult(False, "bits 5:4 of MSR_KVM_ASYNC_PF_EN are reserved")
        if en.delivery_as_pf_vmexit:
            return MsrResult(False, "DELIVERY_AS_PF_VMEXIT without KVM_FEATURE_ASYNC_PF_VMEXIT")
        if not en.apf_enabled:
            # Also ENABLED without DELIVERY_AS_INT: accepted, but APF stays off (5.9+ hosts).
            self.msr_en = value
            self.area = None
            self.drop_all("apf_disabled")
            return MsrResult(True)
        gpa = en.gpa
        if gpa + KVM_VCPU_PV_APF_DATA_SIZE > self.ram_pages * PAGE_SIZE:
            return MsrResult(False, f"APF area {gpa:#x} is outside guest RAM")
        self.msr_en = value
        self.area = KvmVcpuPvApfData(self.ram_u32, gpa)
        self._garbage_reported = False
        self._queue_wakeup_all()
        return MsrResult(True, rescan=True)

    def restore(self, msr_en: int, msr_int: int, apf_id: int) -> None:
        """Load registers saved before a host restart (as a VMM restores MSR_KVM_ASYNC_PF_EN/_INT after a
        snapshot or live update). The events in flight died with the old host: a wake-all replaces them, so every
        task sleeping on one of their tokens retries."""
        self.msr_int = msr_int
        self.apf_id = apf_id
        en = AsyncPfEn(msr_en)
        self.msr_en = msr_en
        if en.apf_enabled and en.gpa + KVM_VCPU_PV_APF_DATA_SIZE <= self.ram_pages * PAGE_SIZE:
            self.area = KvmVcpuPvApfData(self.ram_u32, en.gpa)
            self.slot_token = self.area.token  # whatever the old host delivered last is not garbage
            # A page-ready the old host published may have lost its interrupt with it (the LAPIC state a VMM
            # restores): raise the vector again. A guest that already took it finds the slot empty.
            self.reraise = self.slot_token != 0
            self._queue_wakeup_all()
        self.log.info("vcpu_restore", msr_en=msr_en, msr_int=msr_int, apf_id=apf_id, apf_enabled=self.apf_enabled,
                      slot=self.slot_token)

    @property
    def wakeup_all_queued(self) -> bool:
        """A wake-all not yet consumed by the guest: queued, or delivered and not yet ACKed."""
        return self.wakeup_all_unacked or any(item.wakeup_all for item in self.done)

    def _queue_wakeup_all(self) -> None:
        item = AsyncPf(KVM_APF_WAKE_ALL_TOKEN, -1, wakeup_all=True, done=True)
        self.queue[id(item)] = item  # not a real token: keyed apart so it never collides with one
        self.done.append(item)

    # --- not present ---------------------------------------------------------------------------------------------
    def on_fault(self, gfn: int, *, user: bool, irq: bool) -> FaultDecision:
        """A guest access hit non-resident gfn. Decide APF or synchronous, and for APF inject the not-present."""
        if not irq:
            reason = "irq_disabled"
        elif gfn in self.gfn_hash:
            self.log.info("kvm_async_pf_repeated_fault", gfn=gfn)
            reason = "repeated_fault"
        elif self.queued >= ASYNC_PF_PER_VCPU:
            reason = "queue_full"
        elif not self.apf_enabled:
            reason = "apf_disabled"
        elif self.wakeup_all_queued:
            # No new token may exist before the guest has seen the wake-all: a wake-all that overtook a fresh
            # not-present would wake its task early and leave a dummy for its page-ready (bugzilla 208081's leak).
            reason = "wake_all_pending"
        elif not user and not AsyncPfEn(self.msr_en).send_always:
            reason = "kernel_mode"
        else:
            return FaultDecision(self._inject_not_present(gfn))
        self.log.info("apf_sync_fault", gfn=gfn, reason=reason)
        return FaultDecision(None, reason)

    def _inject_not_present(self, gfn: int) -> AsyncPf:
        assert self.area is not None
        self.apf_id = next_apf_id(self.apf_id, self.vcpu_id)
        token = make_token(self.apf_id, self.vcpu_id)
        item = AsyncPf(token, gfn)
        self.queue[token] = item
        self.gfn_hash.add(gfn)
        self.log.info("kvm_async_pf_not_present", token=token, gfn=gfn)
        self.area.flags = KVM_PV_REASON_PAGE_NOT_PRESENT  # apf_put_user_notpresent: a plain store, no read
        return item

    # --- page ready ----------------------------------------------------------------------------------------------
    def complete(self, item: AsyncPf) -> bool:
        """The page-in behind `item` finished. True if the caller should run check_completion."""
        if self.queue.get(item.token) is not item:
            return False  # dropped meanwhile (APF disabled, vCPU reset): nothing to deliver
        item.done = True
        self.done.append(item)
        self.log.info("kvm_async_pf_completed", token=item.token, gfn=item.gfn)
        return True

    def check_completion(self) -> int | None:
        """Deliver at most one page-ready. Returns the vector to raise, or None."""
        while self.done:
            if self.apf_enabled:
                assert self.area is not None
                slot = self.area.token
                if slot != 0:
                    if slot != self.slot_token and not self._garbage_reported:
                        self._garbage_reported = True
                        self.log.warning("apf_slot_busy", slot=slot,
                                         message="token slot holds a value the host never delivered")
                    return None
            item = self.done.popleft()
            self._forget(item)
            if not self.apf_enabled or not (item.notpresent_injected or item.wakeup_all):
                self.log.info("apf_ready_dropped", token=item.token, gfn=item.gfn, reason="apf_disabled")
                continue
            assert self.area is not None
            # Logged before the store that publishes it, so that its mono_ns precedes anything the guest logs
            # after reading the slot. The same holds for not-present below. `released`: the token this host had
            # published and has now found cleared (the host's own view of the guest's release, which is all the
            # checker has for a guest that does not log).
            self.log.info("kvm_async_pf_ready", token=item.token, gfn=item.gfn, vector=self.vector,
                          released=self.slot_token or None)
            self.area.token = self.slot_token = item.token  # apf_put_user_ready
            self.wakeup_all_unacked = item.wakeup_all
            return self.vector
        return None

    def _forget(self, item: AsyncPf) -> None:
        key = id(item) if item.wakeup_all else item.token
        self.queue.pop(key, None)
        self.gfn_hash.discard(item.gfn)

    def drop_all(self, reason: str) -> None:
        """`kvm_clear_async_pf_completion_queue`: outstanding events are eaten, never delivered."""
        for item in list(self.queue.values()):
            if not item.wakeup_all:
                self.log.info("apf_ready_dropped", token=item.token, gfn=item.gfn, reason=reason)
        self.queue.clear()
        self.done.clear()
        self.gfn_hash.clear()
        self.wakeup_all_unacked = False
