# The guest kernel of one vCPU: boot, the vCPU loop, the #PF handler and the page-ready interrupt handler, after
# arch/x86/kernel/kvm.c.
#
# - Boot (`kvm_guest_cpu_init`): if CPUID has KVM_FEATURE_ASYNC_PF_INT, wrmsr MSR_KVM_ASYNC_PF_INT = vector first,
#   then MSR_KVM_ASYNC_PF_EN = area | ENABLED | DELIVERY_AS_INT [| SEND_ALWAYS]. The area is this vCPU's 64-byte
#   slot in guest page 0.
# - The vCPU loop: the scheduler (kernel, interrupts off) picks a task; the task's access runs in user mode with
#   interrupts on, or inside an interrupts-off section; an access to a non-present page is a VM exit. Accesses go
#   to the task's own pages or, `--shared-ratio` of them, to this vCPU's slot of the pages all vCPUs share.
# - #PF (`__kvm_handle_async_pf`), entered with interrupts off (an interrupt gate): read and reset `flags`; 0 is a
#   genuine fault; PAGE_NOT_PRESENT puts the task to sleep on the token (CR2) in the sleep table, or finds the dummy
#   a faster page-ready left and retries at once.
# - Page-ready interrupt (`sysvec_kvm_asyncpf_interrupt`): read `token`, wake its sleeper (or leave a dummy), wake
#   everything on 0xffffffff, write 0 to `token`, wrmsr MSR_KVM_ASYNC_PF_ACK = 1.
# - Re-init (optional, `--apf-reinit-every`): disable and re-enable APF under load, as CPU offline/online does; the
#   host eats the outstanding completions and its wake-all makes every sleeping task retry.
# - Stop (SIGTERM/SIGINT or --duration): run no new accesses, keep taking page-ready interrupts until no task
#   sleeps (or the drain timeout), then disable APF as the reboot path does (`kvm_pv_disable_apf`) and leave.
#
# The vCPU is single-threaded and blocking. Interrupts reach it through guest_agent/transport.py and are taken or
# deferred by guest_agent/cpu.py; all kernel data (run queue, sleep table) is touched only with interrupts off or
# from the interrupt handler, as in Linux.
from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from shared import log as slog
from shared.abi import (
    KVM_APF_WAKE_ALL_TOKEN,
    KVM_FEATURE_ASYNC_PF_INT,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    async_pf_en_value,
)
from shared.apf_data import KVM_VCPU_PV_APF_DATA_SIZE, KvmVcpuPvApfData
from shared.config import EXIT_CRASH, EXIT_REBOOT, GuestOptions
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.views import GuestViews
from shared.wire import PROTOCOL_VERSION, Message

from .cpu import Cpu
from .memory import Access, GuestMemoryAccess, SlotCheck, shared_pages
from .sleep_table import DuplicateToken, SleepTable
from .transport import GuestError, Transport, open_transport
from .workload import GuestTask, RunQueue, count_quantum, task_pages

__all__ = ["GuestError", "GuestKernel"]

class GuestKernel:
    def __init__(self, config: GuestOptions) -> None:
        self.cfg = config
        self.log: Any = None
        self.sleep: SleepTable[GuestTask] = SleepTable()
        self.runq = RunQueue()
        self.apf_enabled = False
        self.stopping = False
        self.lifecycle: str | None = None  # "crash" or "reboot", requested by SIGUSR1 / SIGUSR2
        self.stop_at_boot = False
        self.exit_code = 0
        self.drain_deadline = math.inf
        self.counts = {"accesses": 0, "shared_accesses": 0, "data_checks": 0, "data_check_failures": 0,
                       "apf_waits": 0, "exits": 0, "interrupts": 0, "torn_pages": 0, "slots_mid_write": 0,
                       "count_work": 0, "count_ns": 0, "exit_ns": 0}
        self.shared_accept: dict[int, tuple[int, ...]] = {}  # shared gfn -> seqs this vCPU's slot may hold

    # --- plumbing ------------------------------------------------------------------------------------------------
    def run(self, stops_before_run: Sequence[int] = ()) -> None:
        """Boot, run, stop. `stops_before_run`: SIGTERM/SIGINT noted before this kernel's own handlers were in place
        (read once they are): the kernel then boots, so that the host sees a whole boot, and stops at once."""
        cfg = self.cfg
        old_handlers = {s: signal.signal(s, self._on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.stop_at_boot = bool(stops_before_run)
        old_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_lifecycle_signal)
        old_handlers[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, self._on_lifecycle_signal)
        self.transport: Transport = open_transport(cfg.transport, cfg.socket, cfg.connect_timeout,
                                                   cfg.reconnect_timeout)
        try:
            welcome, fds = self.transport.handshake(proto=PROTOCOL_VERSION, vm=cfg.vm, vcpu=cfg.vcpu, boot=cfg.boot,
                                                    kind=cfg.kind, pid=os.getpid())
            try:
                self.views = GuestViews(fds, welcome["pages"])
            except (ValueError, OSError) as exc:
                raise GuestError(f"cannot map what the host passed with welcome: {exc}") from None
            self.vcpu: int = welcome["vcpu"]
            self.boot: int = welcome["boot"]
            self.cpuid: int = welcome["cpuid"]
            if cfg.log_dir is not None or cfg.log_stdout:
                slog.configure(cfg.log_dir / f"guest-{self.vcpu}.jsonl" if cfg.log_dir else None,
                               stdout=cfg.log_stdout)
            self.log = slog.get_logger("guest", cfg.vm, vcpu=self.vcpu, boot=self.boot)
            self.transport.on_reconnect = self._on_reconnect
            self.transport.on_welcome = self._on_welcome
            self.transport.give_up = lambda: self.stopping
            ram = GuestRam.open(cfg.vm, RamLayout(welcome["pages"]))
            try:
                self.mem = GuestMemoryAccess(ram, self.views, welcome["vcpus"])
                self.apf = KvmVcpuPvApfData(ram.u32, self.vcpu * KVM_VCPU_PV_APF_DATA_SIZE)
                self.cpu = Cpu(self._interrupt, self.log)
                self.transport.attach(self.cpu, self.views.ctl.u32)
                shared = shared_pages(welcome["pages"])
                for tid in range(cfg.tasks):
                    pages = task_pages(welcome["pages"], welcome["vcpus"], self.vcpu, cfg.tasks, tid, shared.stop)
                    if pages:
                        rng = random.Random(f"{cfg.seed}/{self.vcpu}/{self.boot}/{tid}")
                        self.runq.add(GuestTask(tid, pages, rng, cfg.kernel_ratio, cfg.irq_off_ratio,
                                                shared=shared, shared_ratio=cfg.shared_ratio))
                for tid in range(cfg.tasks, cfg.tasks + cfg.counting_tasks):
                    self.runq.add(GuestTask(tid, [], random.Random(tid), counting=True))
                self._boot()
                self._vcpu_loop()
                if self.lifecycle == "crash":
                    self._crash()
                elif self.lifecycle == "reboot":
                    self._reboot()
                else:
                    self._shutdown()
            finally:
                self.mem.leave()
                self.apf.release()
                del self.mem
                ram.close()
        finally:
            self.transport.close()
            views = getattr(self, "views", None)
            if views is not None:
                views.close()
            for s, handler in old_handlers.items():
                signal.signal(s, handler)

    def _on_stop_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._request_stop()

    def _on_lifecycle_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.lifecycle is None:
            self.lifecycle = "crash" if signum == signal.SIGUSR1 else "reboot"

    def _on_welcome(self, welcome: Message, fds: list[int]) -> None:
        """A reconnect's welcome (a restarted host): its EPT and control block replace the old ones."""
        try:
            new = GuestViews(fds, welcome["pages"])
        except (ValueError, OSError) as exc:
            raise GuestError(f"cannot map what the host passed with welcome: {exc}") from None
        old, self.views = self.views, new
        self.mem.rebind(self.views)
        self.transport.attach_ctl(self.views.ctl.u32)
        old.close()

    def _on_reconnect(self, count: int, seconds: float) -> None:
        self.log.info("guest_reconnect", reconnects=count, seconds=round(seconds, 3))

    def _request_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout

    def wrmsr(self, msr: int, value: int) -> bool:
        with self.cpu.context("exit"):
            reply = self.transport.wrmsr(msr, value)
        ok = bool(reply["t"] == "msr_result" and reply["ok"])
        if not ok:
            self.log.error("guest_msr_gp", msr=hex(msr), value=value, error=reply.get("error") or reply.get("message"))
        return ok

    # --- boot and shutdown ---------------------------------------------------------------------------------------
    def _boot(self) -> None:
        apf = self.cfg.apf and (self.cfg.kind != "kdump" or self.cfg.kdump_apf)
        self.log.info("guest_boot", kind=self.cfg.kind, tasks=len(self.runq), vector=self.cfg.vector,
                      apf=apf, send_always=self.cfg.send_always, transport=self.cfg.transport,
                      shared_ratio=self.cfg.shared_ratio)
        self.cpu.enter("kernel")
        if not self.cfg.apf or (self.cfg.kind == "kdump" and not self.cfg.kdump_apf):
            return
        if not self.cpuid & KVM_FEATURE_ASYNC_PF_INT:  # kvm_guest_cpu_init checks the feature first
            self.log.warning("guest_no_apf", reason="host does not advertise KVM_FEATURE_ASYNC_PF_INT")
            return
        # Zero the area first. Until APF is on its page is ordinary guest memory that may be swapped out, so the
        # stores go through the EPT like any other access.
        self._kernel_store(self.apf.gpa, 0)
        self._kernel_store(self.apf.gpa + 4, 0)
        self._enable_apf()

    def _enable_apf(self) -> None:
        if self.wrmsr(MSR_KVM_ASYNC_PF_INT, self.cfg.vector):
            value = async_pf_en_value(self.apf.gpa, send_always=self.cfg.send_always)
            self.apf_enabled = self.wrmsr(MSR_KVM_ASYNC_PF_EN, value)

    def _disable_apf(self) -> None:
        """`kvm_pv_disable_apf`: does not wait for outstanding events."""
        if self.apf_enabled:
            self.apf_enabled = False
            self.wrmsr(MSR_KVM_ASYNC_PF_EN, 0)

    def _kernel_store(self, gpa: int, value: int) -> None:
        while (status := self.mem.store_u32(gpa, value)) is not Access.DONE:
            if status is Access.EXIT:
                with self.cpu.context("exit"):
                    self.transport.exit_mem(gpa, write=True, user=False, irq=False)

    def _crash(self) -> None:
        """panic() with a working crash path (`kvm_crash_shutdown`): disable APF without waiting for the events in
        flight, and go (to the kdump kernel the supervisor boots next). Sleeping tasks die with this kernel."""
        self.cpu.cli()
        self.cpu.enter("kernel")
        self.log.error("guest_crash", reason="panic (SIGUSR1)", sleepers=self.sleep.sleepers)
        self._disable_apf()
        self.exit_code = EXIT_CRASH

    def _reboot(self) -> None:
        """The reboot path (`kvm_pv_guest_cpu_reboot`): disable APF, no wait; the next boot is a normal kernel."""
        self.cpu.cli()
        self.cpu.enter("kernel")
        self.log.info("guest_reboot", sleepers=self.sleep.sleepers)
        self._disable_apf()
        self.exit_code = EXIT_REBOOT

    def _shutdown(self) -> None:
        self.cpu.cli()
        self.cpu.enter("kernel")
        self._disable_apf()
        self.log.info("guest_shutdown", sleepers=self.sleep.sleepers, dummies=self.sleep.dummies,
                      coalesced=self.cpu.coalesced, deferred=dict(self.cpu.deferred), **self.counts)

    # --- the vCPU ------------------------------------------------------------------------------------------------
    def _vcpu_loop(self) -> None:
        cpu, runq, transport = self.cpu, self.runq, self.transport
        stop_at = time.monotonic() + self.cfg.duration if self.cfg.duration is not None else math.inf
        reinit_every = self.cfg.apf_reinit_every
        next_reinit = time.monotonic() + reinit_every if reinit_every else math.inf
        if self.stop_at_boot:
            self._request_stop()
        while True:
            cpu.cli()
            cpu.enter("kernel")
            now = time.monotonic()
            if self.lifecycle is not None:
                return
            if now >= stop_at:
                self._request_stop()
            if self.stopping:
                if self.sleep.sleepers == 0:
                    return
                if now >= self.drain_deadline:
                    self.log.error("guest_drain_timeout", sleepers=self.sleep.sleepers)
                    return
                head = runq.peek()
                task = runq.pick() if head is not None and head.in_irq_off_section else None
            else:
                if now >= next_reinit and self.apf_enabled:
                    next_reinit = now + (reinit_every or math.inf)
                    self._reinit_apf()
                task = runq.pick()
            if task is None:
                cpu.enter("halt")
                cpu.sti()
                # (taking pending interrupts may have made a task runnable; while draining, none is picked)
                if (self.sleep.sleepers if self.stopping else not len(runq)):
                    transport.halt(min(self.drain_deadline, stop_at, next_reinit) - time.monotonic())
                continue
            self._run_task(task)

    def _run_task(self, task: GuestTask) -> None:
        cpu = self.cpu
        if task.counting:
            cpu.enter("user")
            cpu.sti()
            self.transport.poll()
            t0 = time.monotonic_ns()
            self.counts["count_work"] += count_quantum()
            self.counts["count_ns"] += time.monotonic_ns() - t0
            cpu.boundary()
            cpu.cli()
            cpu.enter("kernel")
            self.runq.put_back(task)
            return
        acc = task.next_access()
        if acc.irq:
            cpu.enter("user")
            cpu.sti()
            self.transport.poll()
        else:
            cpu.enter("irq_off")  # a spin_lock_irqsave section in kernel mode
        cpu.push("instruction")
        writer = (self.boot & 0xFFFF) << 16 | (self.vcpu & 0xFF) << 8 | (task.tid & 0xFF)
        accept = self.shared_accept if acc.shared else task.accept
        others = SlotCheck()
        if acc.shared:
            status, seq, ok, torn = self.mem.update_shared(acc.gfn, self.vcpu, accept.get(acc.gfn), writer, others)
        else:
            status, seq, ok, torn = self.mem.update_page(acc.gfn, accept.get(acc.gfn), writer)
        cpu.pop()
        if status is Access.EXIT:
            self.counts["exits"] += 1
            task.faulted = True
            cpu.push("exit")  # no interrupt between the faulting access and its exit, nor before an injected #PF
            t0 = time.monotonic_ns()
            try:
                reply = self.transport.exit_mem(acc.gfn * PAGE_SIZE, write=True, user=acc.user, irq=acc.irq)
            finally:
                cpu.pop()
            self.counts["exit_ns"] += time.monotonic_ns() - t0  # the vCPU was out of the guest (halted if sync)
            cpu.cli()
            cpu.enter("kernel")
            if reply["t"] == "inject_pf":
                self._page_fault(task, reply["cr2"], acc.user, acc.irq)
            elif reply["t"] == "resume":
                self.runq.put_back(task)
            else:
                self.log.error("guest_host_error", code=reply.get("code"), message=reply.get("message"))
                task.finish_access()
                self.runq.put_back(task)
            return
        cpu.boundary()  # the access retired: a pending interrupt may be taken here
        cpu.cli()
        cpu.enter("kernel")
        if status is Access.DONE:
            self.counts["accesses"] += 1
            self.counts["shared_accesses"] += acc.shared
            self.counts["data_checks"] += 1 + others.good + len(others.bad)
            self.counts["slots_mid_write"] += others.torn
            if not ok:
                self.counts["data_check_failures"] += 1
                self.log.error("guest_data_check", gfn=acc.gfn, ok=False, task=task.tid, shared=acc.shared,
                               expected=list(accept.get(acc.gfn, ())))
            elif torn:
                self.counts["torn_pages"] += 1
                self.log.info("guest_data_torn", gfn=acc.gfn, task=task.tid, shared=acc.shared)
            elif task.faulted:
                self.log.info("guest_data_check", gfn=acc.gfn, ok=True, task=task.tid, shared=acc.shared)
            for slot in others.bad:
                self.counts["data_check_failures"] += 1
                self.log.error("guest_data_check", gfn=acc.gfn, ok=False, task=task.tid, shared=True, slot=slot,
                               message="another vCPU's slot holds a complete copy that does not match its seq")
            accept[acc.gfn] = (seq,)
            task.finish_access()
        else:
            prev = accept.get(acc.gfn)
            if prev is not None:
                accept[acc.gfn] = (*prev, seq)  # our write may or may not have made it into the copy
        self.runq.put_back(task)

    def _reinit_apf(self) -> None:
        self.log.info("guest_apf_reinit", sleepers=self.sleep.sleepers)
        self._disable_apf()
        self._enable_apf()

    # --- #PF (entered with interrupts off) -----------------------------------------------------------------------
    def _page_fault(self, task: GuestTask, cr2: int, user: bool, irq: bool) -> None:
        self.cpu.enter("pf_entry")
        flags = self.apf.read_and_reset_flags()
        self.cpu.enter("pf")
        if flags == 0:
            self.log.error("guest_genuine_pf", cr2=cr2, task=task.tid)
            task.finish_access()
            self.runq.put_back(task)
            return
        if flags != KVM_PV_REASON_PAGE_NOT_PRESENT or not irq or (not user and not self.cfg.send_always):
            # Linux panics here ("Host injected async #PF in interrupt disabled region" / "in kernel mode").
            self.log.error("guest_panic", reason="bad async #PF", flags=flags, token=cr2, user=user, irq=irq)
            self.runq.put_back(task)
            return
        try:
            slept = self.sleep.queue_task(cr2, task)
        except DuplicateToken as exc:
            self.log.error("guest_panic", reason=str(exc), token=cr2)
            self.runq.put_back(task)
            return
        if not slept:
            self.log.info("guest_apf_dummy", token=cr2, action="consumed", task=task.tid)
            self.runq.put_back(task)
            return
        task.token = cr2
        self.counts["apf_waits"] += 1
        self.log.info("guest_apf_wait", token=cr2, task=task.tid)
        if not len(self.runq):
            self.log.info("guest_apf_halt", token=cr2)

    # --- page-ready interrupt (runs with interrupts off) ---------------------------------------------------------
    def _interrupt(self, vector: int) -> None:
        self.counts["interrupts"] += 1
        if vector != self.cfg.vector or not self.apf_enabled:
            self.log.warning("guest_spurious_interrupt", vector=vector, apf_enabled=self.apf_enabled)
            return
        token = self.apf.token
        if token == KVM_APF_WAKE_ALL_TOKEN:
            woken = self.sleep.wake_all()
            self.log.info("guest_apf_wake_all", count=len(woken))
            for task_token, task in woken:
                self.log.info("guest_apf_wake", token=task_token, task=task.tid, all=True)
                self._resume(task)
        elif token == 0:
            self.log.warning("guest_spurious_interrupt", vector=vector, reason="token slot empty")
            return
        else:
            sleeper, dummy_created = self.sleep.wake(token)
            if sleeper is not None:
                self.log.info("guest_apf_wake", token=token, task=sleeper.tid, all=False)
                self._resume(sleeper)
            else:
                self.log.info("guest_apf_dummy", token=token, action="created" if dummy_created else "removed")
        self.log.info("guest_apf_ack", token=token)
        self.apf.token = 0
        self.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1)

    def _resume(self, task: GuestTask) -> None:
        task.token = None
        if self.stopping:
            task.finish_access()  # draining: the task ends here
        else:
            self.runq.add(task)
