# One guest agent's connection: the vCPU "thread" that runs the state machine of host_daemon/vcpu.py against the
# wire, the page-ins of host_daemon/pager.py and the guest's APF area.
#
# Every request from the guest is a VM exit and gets exactly one reply (its result, an `error`, or for an APF the
# #PF itself); before the reply the vCPU *enters* (`_enter`): the requests KVM_REQ_APF_HALT / KVM_REQ_APF_READY are
# processed as vcpu_enter_guest does, and the interrupts they inject are raised before the reply, so that they are
# pending when the guest resumes. A completion kicks a running vCPU (one not in an exit) into an entry only when the
# state machine says so (no page-ready pending); otherwise it waits for the guest's next exit or its ACK. The
# artificial halt blocks the exit until the vCPU has events (a completed page-in), then enters, raises what that
# delivers and resumes the guest, which retries its access (and may halt again).
#
# The vCPU thread (`_thread`) is one lock: an exit with its entry, and a kick's entry, never overlap, since both can
# wait (a prefault's synchronous page-in at delivery, `kvm_arch_async_page_ready`; the page-ins in flight that turning
# APF off waits for, `kvm_clear_async_pf_completion_queue`). Meanwhile the guest's next exit waits for its reply,
# as a vCPU thread busy in KVM does not run the guest. A free lock is taken without a trip through trio's scheduler
# (`VcpuThread`): every exit takes it, and the cycle's cost is what bench/ measures.
#
# On the `pf` ABI (5.7) what an entry injects is a pending exception (the not-present #PF, a page-ready #PF, or the
# double fault of both), taken from the state machine after the entry and sent as the exit's reply in place of
# `resume`; 5.7 kicks no running vCPU, so the guest's own exits (`exit_timer`, its timer tick; `exit_hlt`, its idle
# HLT) are where page-readies reach a vCPU that does not fault.
#
# How an exception or an interrupt reaches the guest is the notifier's business (host_daemon/transports/). A bad
# frame is answered with an `error` and logged; only a fatal one (oversized or truncated frame, a second hello)
# closes the connection, and nothing here can take the daemon or other vCPUs down. The connection owns the vCPU's
# control block (host_daemon/guest_views.py): when it ends, the memory model stops looking at the block and the
# vCPU holds no page any more.
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, Protocol

import trio

from shared.abi import MSR_KVM_ASYNC_PF_ACK
from shared.channel import MessageChannel
from shared.config import HostOptions
from shared.guest_ram import PAGE_SIZE
from shared.wire import (
    ErrorReply,
    ExitHlt,
    ExitMem,
    ExitTimer,
    Hello,
    Message,
    MsrRead,
    MsrResult,
    MsrWrite,
    Resume,
    WireError,
)

from .backing_store import SavedVcpu
from .guest_views import ControlBlock
from .memory import GuestMemory
from .pager import PageIn, Pager
from .transports import Notifier
from .vcpu import AsyncPf, Fault, VcpuApf


class VmContext(Protocol):
    """What a connection needs of its VM (host_daemon/daemon.py's Vm): its memory, its page-ins, the nursery that
    page-ins run in, who holds which vCPU, and whether the daemon is ending."""

    memory: GuestMemory
    pager: Pager
    nursery: trio.Nursery
    vcpus: dict[int, VcpuConnection]
    config: HostOptions
    # What kvm_vcpu_reset leaves of a vCPU for its next boot on this host: pageready_pending.
    pageready_pending: dict[int, bool]
    handed_over: bool  # a snapshot was taken: nothing more is delivered, the VM is the snapshot's
    carried: dict[int, list[AsyncPf]]  # `no-disable-eat`: vCPU -> the events a kdump kernel will find

    @property
    def stopping(self) -> bool: ...


MAX_HLT_US = 3_600_000_000  # an hour: the longest a guest's HLT may ask to wait for its own timer


class VcpuThread:
    """A trio.Lock whose `async with` takes it at once when it is free (no scheduler pass: nothing else can run
    between the look and the take; a cancelled task still gets Cancelled) and waits in the lock's fair queue
    otherwise."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # as trio.Lock.acquire: a cancelled task does not take it
        if self._lock.locked():
            await self._lock.acquire()
        else:
            self._lock.acquire_nowait()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class VcpuConnection:
    def __init__(self, vm: VmContext, chan: MessageChannel, notifier: Notifier, ctl: ControlBlock, vcpu_id: int,
                 boot: int, log: Any, peer_pid: int) -> None:
        self.vm = vm
        self.peer_pid = peer_pid  # as the kernel saw it at connect; 0 if not visible (another PID namespace)
        self.chan = chan
        self.notifier = notifier
        self.ctl = ctl
        self.vcpu_id = vcpu_id
        self.boot = boot
        self.log = log
        self.apf = VcpuApf(vcpu_id, vm.memory.ram.u32, vm.memory.ram.layout.pages, log, vm.memory.ram.hva_base,
                           present=vm.memory.present, enforce_pv_cpuid=vm.config.enforce_pv_cpuid, abi=vm.config.abi,
                           no_pending_check=vm.config.no_pending_check, no_cancel_pending=vm.config.no_cancel_pending,
                           bugs=vm.config.bugs,
                           save_apf_id=partial(vm.memory.backing.save_apf_id, vcpu_id),
                           pageready_pending=vm.pageready_pending.get(vcpu_id, False))
        self.pinned: set[int] = set()  # the pages of the areas in force, each pinned once
        self.scope = trio.CancelScope()
        self.done = trio.Event()  # set once the connection is reset and its end logged
        self.in_exit = False  # the guest is in a VM exit (a request is being handled): entries happen at its end
        self._events = trio.Event()  # set when the done list gains an item: wakes a halted vCPU
        self._completions = trio.Event()  # set while a completion may be applied (see _complete_when)
        self._completions.set()
        self._thread = VcpuThread()  # the vCPU thread: exits (with their entries) and kicks' entries
        self._entries = 0  # entries so far: a kick that waited for the thread is moot if one happened meanwhile
        self._page_ins: dict[int, PageIn] = {}  # token -> its page-in, until its completion
        self._raised = 0  # interrupts raised so far: a HLT that returns with none raised may be a spin
        self._raised_at_exit_end = 0  # _raised when the last exit's reply had gone (later ones: kicks)

    async def start(self, saved: SavedVcpu | None) -> None:
        """Continue the vCPU's token ids across boots; restore its registers if this boot is the one saved."""
        if saved is not None and saved.boot == self.boot:
            self.apf.restore(saved.msr_en, saved.msr_int, saved.apf_id, saved.spiv, saved.msr_ve)
            await self._sync_pin()
        else:
            self.apf.apf_id = self.vm.memory.backing.apf_id(self.vcpu_id)  # 0 in a new VM's store
            self._save()

    def save_registers(self) -> None:
        """Write the vCPU's registers into the backing store now (a snapshot takes them with it)."""
        self._save()

    def _save(self) -> None:
        self.vm.memory.backing.save_vcpu(self.vcpu_id, self.boot, self.apf.msr_en, self.apf.msr_int,
                                         self.apf.apf_id, self.apf.spiv, self.apf.msr_ve)

    async def first_entry(self) -> None:
        """The vCPU's first entry, made before `welcome` is sent: what it injects (a restored vCPU's wake-all, and
        the re-raised interrupt of a page-ready still in the slot) is pending when the guest resumes, as a restored
        LAPIC's IRR is at the first KVM_RUN. The guest finds it before it runs a single access."""
        async with self._thread:
            if self.apf.reraise:  # the restored IRR: a page-ready still in the slot
                self.apf.reraise = False
                await self.notifier.interrupt(self.apf.vector)
            await self._enter()

    async def serve(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._message_loop()
                finally:
                    nursery.cancel_scope.cancel()

    async def _message_loop(self) -> None:
        while True:
            try:
                msg = await self.chan.receive()
            except WireError as exc:
                await self.reject(exc)
                if exc.fatal:
                    return
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if msg is None:
                return
            async with self._thread:
                if self.vm.handed_over:
                    return  # paused in a snapshot: an exit read just before the pause belongs to the restored VM
                self._exit_begins()
                try:
                    await self._dispatch(msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the guest went away while we answered
                finally:
                    self._exit_ends()
            if self.chan.buffered:  # exits read in one go: let completions, other vCPUs and signals in between
                await trio.lowlevel.checkpoint()

    async def reject(self, exc: WireError) -> None:
        self.log.error("wire_error", code=exc.code, message=exc.message, fatal=exc.fatal)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.chan.send(ErrorReply(exc.code, exc.message, exc.fatal))

    async def _dispatch(self, msg: Message) -> None:
        match msg:
            case MsrWrite(msr=msr, value=value):
                await self._msr_write(msr, value)
            case MsrRead(msr=msr):
                result = self.apf.read_msr(msr)
                await self._enter()
                await self.chan.send(MsrResult(msr, result.ok, result.error, result.value))
            case ExitMem(gpa=gpa, user=user, irq=irq):
                await self._exit_mem(gpa, user=user, irq=irq)
            case ExitTimer(irq=irq):
                await self._enter(irq=irq)
                await self._resume_or_exception(Resume(0))
            case ExitHlt(timeout_us=timeout_us):
                if not 0 <= timeout_us <= MAX_HLT_US:
                    await self.reject(WireError("bad_field", f"exit_hlt: timeout_us {timeout_us} is outside "
                                                f"0..{MAX_HLT_US}"))
                    return
                await self._hlt(timeout_us)
            case Hello():  # a second hello: the guest lost track of its connection; nothing it says counts now
                await self.reject(WireError("unexpected", "a second hello on one connection", fatal=True))
                raise trio.ClosedResourceError("second hello")

    # --- exits and entries ---------------------------------------------------------------------------------------
    def _exit_begins(self) -> None:
        self.in_exit = True
        self._completions = trio.Event()

    def _exit_ends(self) -> None:
        self.in_exit = False
        self._raised_at_exit_end = self._raised
        self._completions.set()

    # --- entries -------------------------------------------------------------------------------------------------
    async def _raise(self, vectors: list[int] | tuple[int, ...]) -> None:
        for vector in vectors:
            self._raised += 1
            await self.notifier.interrupt(vector)

    async def _enter(self, *, irq: bool = False) -> None:
        """The vCPU enters the guest (vcpu_enter_guest): pending APF requests are processed and what they inject
        is raised. A halt requested by a fault is handled by `_halt`, not here. `irq`: the guest's RFLAGS.IF at
        this entry (`pf` delivers page-ready only then; MSR exits come from code with interrupts off)."""
        if self.vm.handed_over:
            return  # the vCPU is paused in a snapshot: it never enters again on this host
        self._entries += 1
        await self._deliver(self.apf.entry(irq=irq))

    async def _resume_or_exception(self, reply: Message) -> None:
        """The exit's reply: the exception the entry injects (`pf`), else `reply`."""
        exception = self.apf.take_exception()
        if exception is not None:
            await self.notifier.inject_exception(*exception)
        else:
            await self.chan.send(reply)

    async def _hlt(self, timeout_us: int) -> None:
        """HLT with interrupts on: kvm_vcpu_halt, vcpu_block until kvm_vcpu_has_events (a completed page-in) or the
        guest's own timer; then the entry, which on `pf` may inject a page-ready #PF. A HLT that returns at once
        and injects nothing is counted (`hlt_returned`): the vCPU spins when it keeps happening."""
        # kvm_vcpu_has_events also counts an interrupt pending in the LAPIC: one a kick raised since the last exit
        # ended may still be on its way to the guest, which halted without it (it then takes it and looks again).
        irq_pending = self._raised > self._raised_at_exit_end
        at_once = irq_pending or self.apf.has_events()
        raised = self._raised
        if not at_once:
            self._completions.set()
            with trio.move_on_after(timeout_us / 1e6 if timeout_us else math.inf):
                while not self.apf.has_events():
                    self._events = trio.Event()
                    await self._events.wait()
            self._completions = trio.Event()
        await self._enter(irq=True)
        self.apf.hlt_returned(at_once=at_once,
                              injected=irq_pending or self._raised > raised or self.apf.exception is not None)
        await self._resume_or_exception(Resume(0))

    async def _deliver(self, vectors: list[int] | tuple[int, ...]) -> None:
        """Raise what kvm_check_async_pf_completion injected; where it stopped at an item whose page was evicted
        again, fault the page in on the vCPU thread (`kvm_arch_async_page_ready`'s prefetch fault is synchronous)
        and let it go on."""
        await self._raise(vectors)
        while (item := self.apf.prefault) is not None:
            await self.vm.pager.fault_in(item.gfn, self.vm.nursery)
            await self._raise(self.apf.page_ready())

    async def _halt(self, reason: str | None, *, irq: bool = True) -> None:
        """The artificial halt: block until the vCPU has events, then enter; repeat while it halts again. While
        blocked the vCPU is not in an exit that an entry ends: completions land at once."""
        self.log.info("apf_halt", reason=reason)
        start = trio.current_time()
        while True:
            await self._enter(irq=irq)
            if not self.apf.halted:
                break
            self._completions.set()
            while not self.apf.has_events():  # vcpu_block until kvm_vcpu_has_events
                self._events = trio.Event()
                await self._events.wait()
            self._completions = trio.Event()
            self.apf.unhalt()
        self.log.info("apf_halt_end", us=round((trio.current_time() - start) * 1e6))

    # --- MSRs ----------------------------------------------------------------------------------------------------
    async def _msr_write(self, msr: int, value: int) -> None:
        target = self.apf.area_gfn_enabled_by(msr, value)
        if target is not None:
            # The host writes the area, so its page must be resident before APF is on and stay so while it is
            # (KVM's put_user would fault it in): fault it in and pin it before the write takes effect.
            await self._pin(target)
        result = self.apf.write_msr(msr, value)
        if result.flush is not None:  # APF off: kvm_clear_async_pf_completion_queue waits for the page-ins running
            await self._flush(result.flush)
            self.apf.clear_async_pf_completion_queue("apf_disabled")
        await self._sync_pin()
        if target is not None:
            self.vm.memory.unpin(target)
        if result.ok and msr != MSR_KVM_ASYNC_PF_ACK:
            self._save()
        await self._deliver(result.vectors)  # the ACK's own kvm_check_async_pf_completion
        await self._enter()
        await self.chan.send(MsrResult(msr, result.ok, result.error))

    async def _flush(self, items: tuple[AsyncPf, ...]) -> None:
        """cancel_work_sync for each page-in in flight: wait until it is done; it completes as any other does
        (async_pf_execute: the done list, `kvm_async_pf_completed`), on the vCPU thread's behalf, since this exit
        holds the completions that wait for its end."""

        async def flush_one(item: AsyncPf, page_in: PageIn) -> None:
            await page_in.wait()
            self.apf.complete(item, error=page_in.failed)

        async with trio.open_nursery() as nursery:
            for item in items:
                page_in = self._page_ins.get(item.token)
                if page_in is not None:
                    nursery.start_soon(flush_one, item, page_in)

    async def _pin(self, gfn: int) -> None:
        await self.vm.pager.fault_in(gfn, self.vm.nursery)
        self.vm.memory.pin(gfn)

    async def _sync_pin(self) -> None:
        """Keep one pin on each page of the areas in force (none while APF is off and no #VE area is placed)."""
        wanted = self.apf.area_gfns()
        for gfn in wanted - self.pinned:
            await self._pin(gfn)
        for gfn in self.pinned - wanted:
            self.vm.memory.unpin(gfn)
        self.pinned = wanted

    # --- faults --------------------------------------------------------------------------------------------------
    async def _exit_mem(self, gpa: int, *, user: bool, irq: bool) -> None:
        gfn = gpa // PAGE_SIZE
        memory = self.vm.memory
        if not 0 <= gpa < memory.ram.layout.ram_size:
            await self.reject(WireError("bad_address", f"gpa {gpa:#x} is outside guest RAM"))
            return
        if memory.present(gfn):  # raced with a page-in, or the guest's view was old: just re-enter
            await self._enter(irq=irq)
            await self._resume_or_exception(Resume(gpa))
            return
        decision = self.apf.on_fault(gfn, gpa, user=user, irq=irq, hva=memory.ram.hva_base + gfn * PAGE_SIZE)
        if decision.item is not None:
            page_in = self.vm.pager.start_page_in(gfn, self.vm.nursery)
            self._page_ins[decision.item.token] = page_in
            self._nursery.start_soon(self._complete_when, decision.item, page_in)
        if decision.kind is Fault.SYNC:
            if not await self.vm.pager.fault_in(gfn, self.vm.nursery):  # on the vCPU thread, interrupts off
                # The page cannot be had: KVM_RUN fails with -EFAULT and the VMM sees it (the RFC's "exit to user
                # space"). apf-emu's VMM reports it to the guest as a memory failure of that access.
                self.log.error("apf_error_exit", gfn=gfn, gpa=gpa, reason=decision.reason)
                await self._enter(irq=irq)
                await self.chan.send(ErrorReply("page_error", f"gpa {gpa:#x}: the page cannot be read in", False))
                return
            await self._enter(irq=irq)
            await self._resume_or_exception(Resume(gpa))
        elif decision.kind is Fault.INJECT:
            assert decision.exception is not None
            await self._enter(irq=irq)
            if self.apf.abi == "pf":  # the pending #PF, or what a page-ready made of it (cancel, #DF)
                await self._resume_or_exception(Resume(gpa))
            else:
                await self.notifier.inject_exception(*decision.exception)
        else:
            await self._halt(decision.reason, irq=irq)
            await self._resume_or_exception(Resume(gpa))

    async def _complete_when(self, item: AsyncPf, page_in: PageIn) -> None:
        """async_pf_execute once the page is in. A completion that comes while the vCPU is in an exit is applied
        when the exit's reply has gone: in KVM the entry that ends the exit sees every request made before it, and
        here the entry (the reply) cannot be made atomic with the check that precedes it; for the guest the two
        orders are the same (a page-in may finish at any moment)."""
        if not page_in.is_set():  # (a page-in of latency 0 is often done already: no scheduler pass for nothing)
            await page_in.wait()  # the page may be evicted again before it is delivered: the prefault brings it back
        while not self._completions.is_set():
            await self._completions.wait()
        if self.vm.handed_over:
            return  # after a snapshot: the completion belongs to no VM any more (the restore's wake-all covers it)
        self._page_ins.pop(item.token, None)
        kick = self.apf.complete(item, error=page_in.failed)
        self._events.set()  # __kvm_vcpu_wake_up: a halted vCPU looks at its events
        if kick and not self.in_exit:
            entries = self._entries
            async with self._thread:
                if self._entries == entries:  # else the vCPU entered meanwhile: that entry saw the request
                    await self._enter()  # the kick of a running vCPU: it exits and enters at once

    def reset(self, reason: str, *, handover: bool = False) -> None:
        """The vCPU is gone: drop its APF state, as KVM does on vCPU reset or destroy. `handover`: the vCPU is not
        reset but paused in a snapshot, and its state ends with this host, as with a host that is killed: nothing
        is eaten or logged (the restoring host's wake-all replaces the events in flight)."""
        if not handover:
            if "no-disable-eat" in self.apf.bugs:
                self.vm.carried[self.vcpu_id] = self.apf.outstanding()
            self.apf.reset(reason)
            self.vm.pageready_pending[self.vcpu_id] = self.apf.pageready_pending
        self.notifier.close()
        for gfn in self.pinned:
            self.vm.memory.unpin(gfn)
        self.pinned = set()
        self.vm.memory.detach(self.vcpu_id, self.ctl.u32)
        if not self.vm.stopping and self.vm.vcpus.get(self.vcpu_id) in (None, self):
            # The guest went away. When the host is the one ending (SIGTERM, or a failure that leaves the state for
            # --recover), its guests may well live on: a recovering host must wait for them (the recovery window).
            self.vm.memory.backing.detach_guest(self.vcpu_id)
        self.ctl.close()
