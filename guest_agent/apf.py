# The guest kernel's APF code of one vCPU, as Linux 5.8+ has it in arch/x86/kernel/kvm.c: the per-CPU state
# (`apf_reason`, and whether APF is on: `async_pf_enabled` since 6.7, `apf_reason.enabled` before), the sleep
# table, the #PF path (`kvm_read_and_reset_apf_flags`, `__kvm_handle_async_pf`, `kvm_async_pf_task_wait_schedule`),
# the page-ready interrupt (`sysvec_kvm_asyncpf_interrupt`) and the boot, offline and shutdown paths
# (`kvm_guest_cpu_init`, `kvm_pv_disable_apf`, `kvm_guest_cpu_offline`). Each method is named after the function it
# follows.
#
# Sans I/O: it reads and writes the APF area in guest RAM (as Linux's per-CPU variable) and logs, but a wrmsr is
# the caller's (guest_agent/kernel.py does it as a VM exit): methods that write MSRs take the `wrmsr` to use and call
# it exactly where Linux does, so that the order (token read, wake, slot cleared, ACK) is Linux's. Scheduling is the
# caller's too: the #PF path says whether the task sleeps, the interrupt and wake-all paths return the tasks they
# woke. Nothing here is a choice of apf-emu's; where Linux panics, `Panic` says so and the caller runs its panic path.
#
# `pf` is the guest of Linux 5.7 (arch/x86/kernel/kvm.c of that release): `kvm_guest_cpu_init` without the INT
# MSR, and `do_async_page_fault`'s switch on `kvm_read_and_reset_pf_reason` (0: an ordinary #PF, 1: the task waits,
# 2: a wake), with 5.7's `kvm_async_pf_task_wait` (no panics; a fault in kernel mode halts the CPU until its node
# is unhashed, n.halted). When the reason is read is the kernel's business (guest_agent/kernel.py): that is where
# the race of the seed thread lives.
#
# A not-present delivery other than the #PF (an ABI variant, shared/abis.py) plugs in here, beside
# `handle_async_pf`: the kernel dispatches exceptions by vector (guest_agent/kernel.py) to this module. `ve` is one:
# `handle_ve` is apf-emu's design of a guest that takes not-presents as #VE (it follows `__kvm_handle_async_pf` in
# everything but how the token arrives).
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from shared.abi import (
    APF_EMU_VE_INFO_ENABLED,
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_ASYNC_PF_SEND_ERROR,
    KVM_FEATURE_ASYNC_PF,
    KVM_FEATURE_ASYNC_PF_ERROR,
    KVM_FEATURE_ASYNC_PF_INT,
    KVM_FEATURE_ASYNC_PF_VE,
    KVM_FEATURE_ASYNC_PF_VMEXIT,
    KVM_PV_REASON_PAGE_ERROR,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    MSR_APF_EMU_VE_INFO,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.ve_info import EXIT_REASON_EPT_VIOLATION, VE_BUSY, VeInfo

from .sleep_table import Queued, SleepTable

VE_AREA_OFFSET = 16  # `ve`: the guest keeps its #VE information area in the unused padding of its APF area slot


class Task(Protocol):
    @property
    def tid(self) -> int: ...


T = TypeVar("T", bound=Task)
WrMsr = Callable[[int, int], None]  # wrmsrq: a #GP is the caller's to log; Linux goes on either way


class Pf(Enum):
    """What `__kvm_handle_async_pf` made of a #PF."""

    GENUINE = "genuine"  # flags were 0: not an async #PF; the kernel's own #PF handling (exc_page_fault) goes on
    SLEEP = "sleep"  # the task sleeps on the token until a page-ready (or a wake-all) unhashes its node
    NO_SLEEP = "no_sleep"  # kvm_async_pf_queue_task found a node: the task returns and retries the access
    WARN = "warn"  # flags other than PAGE_NOT_PRESENT: WARN_ONCE, and return
    ERROR = "error"  # `int-error`: the page-ready came first and reported a page-in error: SIGBUS to the task
    HALT = "halt"  # `pf`: a not-present in kernel mode: the CPU halts (sti; hlt) until the node is unhashed
    WAKE = "wake"  # `pf`: reason 2, a page-ready: kvm_async_pf_task_wake


class Panic(Exception):
    """Linux panics here: the caller runs its panic path (the crash kernel, if one is loaded)."""


@dataclass(frozen=True, slots=True)
class Woken(Generic[T]):
    token: int
    task: T
    error: bool = False  # `int-error`: its page-in failed and the page-ready said so: SIGBUS (handle_async_pf_error)


class GuestApf(Generic[T]):
    def __init__(self, area: KvmVcpuPvApfData, log: Any, abi: str = "int") -> None:
        self.area = area  # this CPU's `apf_reason`
        self.log = log
        self.abi = abi
        self.enabled = False  # this CPU's `async_pf_enabled`
        self.ve: VeInfo | None = None  # `ve`: the #VE information area, once placed
        self.send_error = False  # `int-error`: KVM_ASYNC_PF_SEND_ERROR was set (the host offered it)
        self.sleepers: SleepTable[T] = SleepTable()
        self._warned = False

    # --- boot, offline, shutdown ---------------------------------------------------------------------------------
    def guest_cpu_init(self, wrmsr: WrMsr, *, cpuid: int, vector: int, kvmapf: bool = True,
                       send_always: bool = False) -> bool:
        """`kvm_guest_cpu_init`: with KVM_FEATURE_ASYNC_PF_INT (and no `no-kvmapf`), MSR_KVM_ASYNC_PF_INT first,
        then MSR_KVM_ASYNC_PF_EN; `async_pf_enabled` is set whatever the host answered (wrmsrq's #GP is only
        logged). The area is not zeroed, not even on re-online. `send_always` sets KVM_ASYNC_PF_SEND_ALWAYS as
        guests before 5.8 did; Linux 5.8+ never sets it. Returns whether APF was set up."""
        if self.abi == "pf":
            return self._guest_cpu_init_57(wrmsr, cpuid=cpuid, kvmapf=kvmapf, send_always=send_always)
        if not (cpuid & KVM_FEATURE_ASYNC_PF_INT and kvmapf):
            return False
        value = async_pf_en_value(self.area.gpa, send_always=send_always)
        self.send_error = self.abi == "int-error" and bool(cpuid & KVM_FEATURE_ASYNC_PF_ERROR)
        if self.send_error:  # the RFC's kvm_guest_cpu_init
            value |= KVM_ASYNC_PF_SEND_ERROR
        if cpuid & KVM_FEATURE_ASYNC_PF_VMEXIT:
            value |= 1 << 2  # KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT
        wrmsr(MSR_KVM_ASYNC_PF_INT, vector)
        if self.abi == "ve" and cpuid & KVM_FEATURE_ASYNC_PF_VE:
            # `ve` (apf-emu's design): the #VE area is placed before APF is on, as the vector is; without the
            # feature the kernel keeps taking not-presents as #PF.
            self.ve = VeInfo(self.area.ram, self.area.gpa + VE_AREA_OFFSET)
            self.ve.busy = 0
            wrmsr(MSR_APF_EMU_VE_INFO, self.ve.gpa | APF_EMU_VE_INFO_ENABLED)
        wrmsr(MSR_KVM_ASYNC_PF_EN, value)
        self.enabled = True
        return True

    def _guest_cpu_init_57(self, wrmsr: WrMsr, *, cpuid: int, kvmapf: bool, send_always: bool) -> bool:
        """5.7's `kvm_guest_cpu_init`: with KVM_FEATURE_ASYNC_PF, MSR_KVM_ASYNC_PF_EN = the area | ENABLED
        (| SEND_ALWAYS under CONFIG_PREEMPTION, | DELIVERY_AS_PF_VMEXIT with its feature), then
        `apf_reason.enabled` = 1."""
        if not (cpuid & KVM_FEATURE_ASYNC_PF and kvmapf):
            return False
        value = async_pf_en_value(self.area.gpa, send_always=send_always, delivery_as_int=False)
        if cpuid & KVM_FEATURE_ASYNC_PF_VMEXIT:
            value |= 1 << 2  # KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT
        wrmsr(MSR_KVM_ASYNC_PF_EN, value)
        self.enabled = True
        return True

    def pv_disable_apf(self, wrmsr: WrMsr) -> None:
        """`kvm_pv_disable_apf`: MSR_KVM_ASYNC_PF_EN = 0 if enabled; outstanding events are not waited for."""
        if not self.enabled:
            return
        wrmsr(MSR_KVM_ASYNC_PF_EN, 0)
        self.enabled = False

    def guest_cpu_offline(self, wrmsr: WrMsr, *, shutdown: bool) -> list[Woken[T]]:
        """`kvm_guest_cpu_offline`: disable APF; unless shutting down (reboot, crash), wake every sleeper of this CPU
        at once (`apf_task_wake_all`), without waiting for the host. Returns the tasks woken."""
        self.pv_disable_apf(wrmsr)
        if shutdown:
            return []
        return self._wake_all(reason="offline")

    # --- #PF ----------------------------------------------------------------------------------------------------
    def read_and_reset_flags(self) -> int:
        """`kvm_read_and_reset_apf_flags`: 0 while APF is off on this CPU."""
        if not self.enabled:
            return 0
        return self.area.read_and_reset_flags()

    def handle_async_pf(self, flags: int, token: int, task: T, *, user: bool, irq: bool) -> Pf:
        """`__kvm_handle_async_pf` with the flags read at the #PF's entry and CR2 as the token. Raises Panic where
        Linux panics: interrupts off ("in interrupt disabled region"), kernel mode ("in kernel mode", whatever
        SEND_ALWAYS says)."""
        if not flags:
            return Pf.GENUINE
        if not irq:
            raise Panic("Host injected async #PF in interrupt disabled region")
        if flags & KVM_PV_REASON_PAGE_NOT_PRESENT:
            if not user:
                raise Panic("Host injected async #PF in kernel mode")
            return self._task_wait_schedule(token, task)
        self._warn_once("guest_apf_warn", flags=flags, token=token, message=f"Unexpected async PF flags: {flags:x}")
        return Pf.WARN

    def do_async_page_fault(self, reason: int, address: int, task: T, *, user: bool) -> tuple[Pf, list[Woken[T]]]:
        """`pf`: 5.7's `do_async_page_fault` after `kvm_read_and_reset_pf_reason` gave `reason`; `address` is CR2
        as the entry read it. 1: `kvm_async_pf_task_wait((u32)address, !user_mode(regs))`; 2:
        `kvm_async_pf_task_wake((u32)address)`; anything else: `do_page_fault` (GENUINE, the kernel's)."""
        token = address & 0xFFFF_FFFF
        if reason == KVM_PV_REASON_PAGE_NOT_PRESENT:
            result = self._task_wait_schedule(token, task)
            return (Pf.HALT if result is Pf.SLEEP and not user else result), []
        if reason == KVM_PV_REASON_PAGE_READY:
            return Pf.WAKE, self._task_wake(token)
        return Pf.GENUINE, []

    def handle_ve(self, task: T, *, user: bool, irq: bool) -> tuple[Pf, int]:
        """`ve`: the #VE handler of a not-present (apf-emu's design, after `__kvm_handle_async_pf`): read the area,
        write 0 to its busy word before anything that could fault again, then as a not-present #PF: panic with
        interrupts off or in kernel mode, else sleep on the token. A #VE with the busy word clear, or of another
        exit reason, is not an APF: WARN_ONCE. Returns what became of it and the token."""
        ve = self.ve
        if ve is None or ve.busy != VE_BUSY or ve.exit_reason != EXIT_REASON_EPT_VIOLATION:
            self._warn_once("guest_apf_warn", message="unexpected #VE", busy=None if ve is None else ve.busy)
            return Pf.WARN, 0
        token = ve.guest_linear_address & 0xFFFF_FFFF
        ve.busy = 0
        if not irq:
            raise Panic("Host injected async #VE in interrupt disabled region")
        if not user:
            raise Panic("Host injected async #VE in kernel mode")
        return self._task_wait_schedule(token, task), token

    def _warn_once(self, event: str, **fields: Any) -> None:
        if not self._warned:
            self._warned = True
            self.log.warning(event, **fields)

    def _task_wait_schedule(self, token: int, task: T) -> Pf:
        """`kvm_async_pf_task_wait_schedule`: queue the task, or do not sleep at all."""
        queued = self.sleepers.queue_task(token, task)
        if queued is Queued.SLEEP:
            return Pf.SLEEP
        if queued is Queued.DUMMY_ERROR:
            self.log.info("guest_apf_dummy", token=token, action="consumed", error=True)
            return Pf.ERROR
        if queued is Queued.DUMMY:
            self.log.info("guest_apf_dummy", token=token, action="consumed")
        else:
            lost = self.sleepers.lost[-1]
            self.log.error("guest_apf_node_freed", token=token, task=lost.tid,
                           message=f"task {lost.tid} slept on this token: Linux frees its on-stack node, and it "
                           "sleeps for good")
        return Pf.NO_SLEEP

    # --- page-ready ---------------------------------------------------------------------------------------------
    def asyncpf_interrupt(self, wrmsr: WrMsr) -> list[Woken[T]] | None:
        """`sysvec_kvm_asyncpf_interrupt`: if APF is on, wake the token in the slot (whatever it holds, 0 too), write
        0 to the slot, ACK. With APF off it does nothing at all (None): the slot keeps what the host wrote."""
        if not self.enabled:
            return None
        token = self.area.token
        # `int-error` (the RFC's kvm_async_pf_intr): ready_flags is read after the token and never cleared (the
        # host writes it with every token)
        error = self.send_error and bool(self.area.ready_flags & KVM_PV_REASON_PAGE_ERROR)
        woken = self._task_wake(token, error=error)
        self.log.info("guest_apf_ack", token=token)  # before the store that releases the slot (docs/LOGGING.md)
        self.area.token = 0
        wrmsr(MSR_KVM_ASYNC_PF_ACK, 1)
        return woken

    def _task_wake(self, token: int, *, error: bool = False) -> list[Woken[T]]:
        """`kvm_async_pf_task_wake` (with the RFC's `is_err`)."""
        if token == KVM_APF_WAKE_ALL_TOKEN:
            return self._wake_all(reason="wake_all")
        task, dummy_created = self.sleepers.wake(token, error=error)
        extra = {"error": True} if error else {}
        if task is not None:
            self.log.info("guest_apf_wake", token=token, task=task.tid, all=False, **extra)
            return [Woken(token, task, error)]
        self.log.info("guest_apf_dummy", token=token, action="created" if dummy_created else "removed", **extra)
        return []

    def _wake_all(self, *, reason: str) -> list[Woken[T]]:
        """`apf_task_wake_all`: every node of this CPU, sleepers and dummies."""
        woken, dummies = self.sleepers.wake_all()
        self.log.info("guest_apf_wake_all", count=len(woken), dummies=dummies, reason=reason)
        for token, task in woken:
            self.log.info("guest_apf_wake", token=token, task=task.tid, all=True)
        return [Woken(token, task) for token, task in woken]
