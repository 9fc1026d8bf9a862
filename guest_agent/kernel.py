# The guest kernel of one vCPU: boot, the vCPU loop, exception and interrupt dispatch, shutdown. Its APF code is
# guest_agent/apf.py (Linux's arch/x86/kernel/kvm.c, sans I/O); this module gives it its MSR accesses (VM exits),
# schedules the tasks it puts to sleep and wakes, and runs the workload.
#
# - Boot: the kernel's per-CPU data starts zeroed (the APF area too: stores through the EPT, as any memory); the
#   boot CPU (vCPU 0, or the CPU a crash kernel boots on) runs `kvm_guest_cpu_init` before setup_local_APIC
#   software-enables the LAPIC (the x2APIC SPIV register, bit 8), a secondary CPU the other way round.
# - The vCPU loop: the scheduler (kernel, interrupts off) picks a task; the task's access runs in user mode with
#   interrupts on, in kernel mode with interrupts on (`--kernel-ratio`), or inside an interrupts-off section; an
#   access to a non-present page is a VM exit. Accesses go to the task's own pages or, `--shared-ratio` of them, to
#   this vCPU's slot of the pages all vCPUs share. With nothing to run the vCPU idles with `safe_halt` (sti; hlt):
#   an interrupt ends the halt.
# - Exceptions are dispatched by vector (EXCEPTION_HANDLERS): #PF goes to `exc_page_fault`, which reads the APF
#   flags and hands the fault to `__kvm_handle_async_pf`; where Linux panics, the kernel runs its panic path.
# - Demand paging (every ABI): each task's user pages are mapped in its page table on first touch; a touch of a page
#   it does not map is a genuine #PF, taken without any exit, that maps it (`handle_mm_fault`); `--guest-unmap-ratio`
#   unmaps one again now and then (reclaim). A #PF entry may itself touch kernel memory this CPU does not map yet
#   (`--entry-fault-ratio`, 5.7's vmalloc fault): a nested genuine #PF. Linux 5.8+ reads CR2 and the APF flags
#   before anything of the entry runs, so that nested #PF reads flags 0 and is harmless; 5.7 (`pf`) reads `reason`
#   after it, and the nested #PF takes the outer's reason (the race of the seed thread, `guest_pf_race`).
# - Idle: with nothing to run and no interrupt pending, the HLT exit (`exit_hlt`, at most HLT_SLICE long): the host
#   blocks the vCPU until it has an event, as KVM's kvm_emulate_halt does.
# - `pf` (5.7): there is no page-ready interrupt, page-ready is a #PF that only an entry injects, so the vCPU also
#   exits on its timer tick (`exit_timer`, every TICK seconds while it runs with interrupts on); a not-present in
#   kernel mode halts the CPU in `kvm_async_pf_task_wait` until its node is unhashed; #DF (a host without the
#   historical fixes) panics.
# - Interrupts: HYPERVISOR_CALLBACK_VECTOR (or --vector) runs `sysvec_kvm_asyncpf_interrupt` if APF was set up
#   (Linux installs the handler only then); any other vector is spurious.
# - Re-init (optional, `--apf-reinit-every`): CPU offline and online, as cpuhp runs kvm_cpu_down_prepare and
#   kvm_cpu_online: with interrupts saved off, `kvm_guest_cpu_offline(false)` (APF disabled, every local sleeper
#   woken); interrupts back on (what is pending is taken, with APF off); then `kvm_guest_cpu_init` again.
# - Stop (SIGTERM/SIGINT or --duration): run no new accesses, keep taking page-ready interrupts until no task
#   sleeps (or the drain timeout), then disable APF as the reboot path does (`kvm_pv_disable_apf`) and leave. A
#   panic (SIGUSR1, or a condition on which Linux panics) runs the crash path, `kvm_crash_shutdown`
#   (kvm_guest_cpu_offline(true): APF disabled, nobody woken), and exits 70; SIGUSR2 reboots (exit 71).
#
# The vCPU is single-threaded and blocking. Interrupts reach it through guest_agent/transports/ and are taken or
# deferred by guest_agent/cpu.py; all kernel data (run queue, sleep table) is touched only with interrupts off or
# from the interrupt handler, as in Linux.
from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from shared import log as slog
from shared.abi import (
    APIC_SPIV_APIC_ENABLED,
    DF_VECTOR,
    KVM_FEATURE_ASYNC_PF,
    KVM_FEATURE_ASYNC_PF_INT,
    MSR_NAMES,
    MSR_X2APIC_SPIV,
    SPURIOUS_APIC_VECTOR,
    VE_VECTOR,
)
from shared.apf_data import KVM_VCPU_PV_APF_DATA_SIZE, KvmVcpuPvApfData
from shared.config import EXIT_CRASH, EXIT_REBOOT, GuestOptions
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.logfile import log_path
from shared.views import GuestViews
from shared.wire import PF_VECTOR, PROTOCOL_VERSION, ErrorReply, Hello, InjectException, MsrResult, Resume, Welcome

from .apf import GuestApf, Panic, Pf, Woken
from .cpu import Cpu
from .memory import Access, GuestMemoryAccess, SlotCheck, shared_pages
from .transports import GuestError, Transport, open_transport
from .workload import GuestTask, PageAccess, RunQueue, count_quantum, task_pages

__all__ = ["GuestError", "GuestKernel"]

# The guest's virtual address space (x86-64 Linux's layout): a task's user page gfn is at USER_BASE + gfn * 4 KiB;
# the vmalloc area starts at VMALLOC_START. A token is a u32: never a user address, so a token taken for an address
# faults as a bad one (SIGSEGV, or an oops in the kernel).
USER_BASE = 0x7F00_0000_0000
VMALLOC_START = 0xFFFF_C900_0000_0000
VMALLOC_PAGES = 4096
ENTRY_STACK_OFFSET = 0xF48  # where in its page the entry's touch lands (a vmapped stack slot): never a token's low bits
TICK = 0.004  # `pf`: the guest's timer tick (HZ=250), an exit at which a page-ready #PF can be injected
HLT_SLICE = 0.05  # the longest an HLT exit waits before the guest looks at its signals again

class _Frozen(Exception):
    """`pf`: a halted kvm_async_pf_task_wait that nothing will end (the kernel stops meanwhile): in Linux the CPU
    would stay in it for ever, so nothing after it runs; the task stays asleep."""


class GuestKernel:
    def __init__(self, config: GuestOptions) -> None:
        self.cfg = config
        self.log: Any = None
        self.runq = RunQueue()
        self.apf_set_up = False  # kvm_guest_cpu_init found the feature (Linux then installs the vector's handler)
        self.stopping = False
        self.lifecycle: str | None = None  # "crash" or "reboot" (SIGUSR1 / SIGUSR2), or "panic"
        self.panic_reason = ""
        self.stop_at_boot = False
        self.exit_code = 0
        self.drain_deadline = math.inf
        self.counts = {"accesses": 0, "shared_accesses": 0, "data_checks": 0, "data_check_failures": 0,
                       "apf_waits": 0, "exits": 0, "interrupts": 0, "torn_pages": 0, "slots_mid_write": 0,
                       "sigbus": 0, "fixups": 0, "genuine_pf": 0, "entry_faults": 0, "pf_races": 0,
                       "sigsegv": 0, "oops": 0, "ticks": 0, "hlt_exits": 0,
                       "count_work": 0, "count_ns": 0, "exit_ns": 0}
        self.shared_accept: dict[int, tuple[int, ...]] = {}  # shared gfn -> seqs this vCPU's slot may hold
        # The exception handlers by vector: where a not-present delivered otherwise than by #PF plugs in.
        self.exception_handlers: dict[int, Callable[[GuestTask, InjectException, PageAccess], None]] = {
            PF_VECTOR: self._exc_page_fault,
            VE_VECTOR: self._exc_virtualization_exception,
            DF_VECTOR: self._exc_double_fault,
        }
        self.halted_task: GuestTask | None = None  # `pf`: the task whose kernel-mode wait halts this CPU
        self.next_tick = 0.0
        self.stop_at = math.inf

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
            welcome, fds = self.transport.handshake(Hello(PROTOCOL_VERSION, cfg.vm, cfg.vcpu, cfg.boot, cfg.kind,
                                                          os.getpid(), cfg.transport))
            try:
                self.views = GuestViews(fds, welcome.pages)
            except (ValueError, OSError) as exc:
                raise GuestError(f"cannot map what the host passed with welcome: {exc}") from None
            self.vcpu: int = welcome.vcpu
            self.boot: int = welcome.boot
            self.cpuid: int = welcome.cpuid
            if cfg.log_dir is not None or cfg.log_stdout:
                slog.configure(log_path(cfg.log_dir, f"guest-{self.vcpu}", cfg.log_compress) if cfg.log_dir
                               else None, compression=cfg.log_compress,
                               stdout=cfg.log_stdout)
            self.log = slog.get_logger("guest", cfg.vm, vcpu=self.vcpu, boot=self.boot)
            self.entry_rng = random.Random(f"{cfg.seed}/{self.vcpu}/{self.boot}/entry")
            self.mm_rng = random.Random(f"{cfg.seed}/{self.vcpu}/{self.boot}/mm")
            self.idle_task = GuestTask(-1, [], random.Random(0))  # `current` in the idle loop
            self.transport.on_reconnect = self._on_reconnect
            self.transport.on_welcome = self._on_welcome
            self.transport.on_lost_exit = self._on_lost_exit
            self.transport.give_up = lambda: self.stopping
            ram = GuestRam.open(cfg.vm, RamLayout(welcome.pages))
            try:
                self.mem = GuestMemoryAccess(ram, self.views, welcome.vcpus)
                area = KvmVcpuPvApfData(ram.u32, self.vcpu * KVM_VCPU_PV_APF_DATA_SIZE)
                self.apf: GuestApf[GuestTask] = GuestApf(area, self.log, cfg.abi)
                self.cpu = Cpu(self._interrupt, self.log)
                self.transport.attach(self.cpu, self.views.ctl.u32)
                shared = shared_pages(welcome.pages)
                for tid in range(cfg.tasks):
                    pages = task_pages(welcome.pages, welcome.vcpus, self.vcpu, cfg.tasks, tid, shared.stop)
                    if pages:
                        rng = random.Random(f"{cfg.seed}/{self.vcpu}/{self.boot}/{tid}")
                        self.runq.add(GuestTask(tid, pages, rng, cfg.kernel_ratio, cfg.irq_off_ratio,
                                                shared=shared, shared_ratio=cfg.shared_ratio))
                for tid in range(cfg.tasks, cfg.tasks + cfg.counting_tasks):
                    self.runq.add(GuestTask(tid, [], random.Random(tid), counting=True))
                try:
                    self._boot()
                    self._vcpu_loop()
                    if self.lifecycle in ("crash", "panic"):
                        self._crash()
                    elif self.lifecycle == "reboot":
                        self._reboot()
                    else:
                        self._shutdown()
                except Exception as exc:  # the host went away for good or broke the protocol (or a bug): the boot ends
                    self.log.error("guest_abort", reason=str(exc) or type(exc).__name__,
                                   sleepers=self.apf.sleepers.sleepers)
                    raise
            finally:
                self.mem.leave()
                area.release()
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

    def _on_welcome(self, welcome: Welcome, fds: list[int]) -> None:
        """A reconnect's welcome (a restarted host): its EPT and control block replace the old ones."""
        try:
            new = GuestViews(fds, welcome.pages)
        except (ValueError, OSError) as exc:
            raise GuestError(f"cannot map what the host passed with welcome: {exc}") from None
        old, self.views = self.views, new
        self.mem.rebind(self.views)
        self.transport.attach_ctl(self.views.ctl.u32)
        old.close()

    def _on_lost_exit(self) -> None:
        """An exit whose reply died with its host (killed, or stopped by a snapshot) ends as if the access had not
        been tried: its VM entry never happened. A not-present the host injected in that reply wrote `flags` first,
        which in KVM is one with the injection; the emulated CPU takes the write back, or the next genuine #PF would
        read it (docs/PROTOCOL.md section 10). Not on `pf`: its `reason` may hold a restored host's page-ready."""
        if self.cfg.abi != "pf" and self.apf.enabled:
            flags = self.apf.read_and_reset_flags()
            if flags:
                self.log.info("guest_exit_lost", flags=flags)

    def _on_reconnect(self, count: int, seconds: float) -> None:
        self.log.info("guest_reconnect", reconnects=count, seconds=round(seconds, 3))

    def _request_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout

    def wrmsr(self, msr: int, value: int) -> None:
        """wrmsrq: a #GP is logged (Linux's "unchecked MSR access error") and the kernel goes on."""
        with self.cpu.context("exit"):
            reply = self.transport.wrmsr(msr, value)
        self._msr_error(reply, msr, value)

    def rdmsr(self, msr: int) -> int | None:
        with self.cpu.context("exit"):
            reply = self.transport.rdmsr(msr)
        if self._msr_error(reply, msr, None):
            return None
        assert isinstance(reply, MsrResult)
        return reply.value

    def _msr_error(self, reply: MsrResult | ErrorReply, msr: int, value: int | None) -> bool:
        if isinstance(reply, MsrResult) and reply.ok:
            return False
        error = reply.error if isinstance(reply, MsrResult) else f"{reply.code}: {reply.message}"
        self.log.error("guest_msr_gp", msr=MSR_NAMES.get(msr, hex(msr)), value=value, error=error)
        return True

    # --- boot and shutdown ---------------------------------------------------------------------------------------
    def _boot(self) -> None:
        cfg = self.cfg
        apf = cfg.apf and not (cfg.kind == "kdump" and cfg.kdump_no_kvmapf)
        self.log.info("guest_boot", kind=cfg.kind, abi=cfg.abi, bsp=self.bsp, tasks=len(self.runq), vector=cfg.vector,
                      apf=apf, send_always=cfg.send_always, transport=cfg.transport, shared_ratio=cfg.shared_ratio)
        self.cpu.enter("kernel")
        # The kernel's per-CPU data, the APF area among it, starts zeroed. Until APF is on, the area's page is
        # ordinary guest memory that may be swapped out, so the stores go through the EPT like any other access.
        self._kernel_store(self.apf.area.gpa, 0)
        self._kernel_store(self.apf.area.gpa + 4, 0)
        needed, name = ((KVM_FEATURE_ASYNC_PF, "KVM_FEATURE_ASYNC_PF") if self.pf
                        else (KVM_FEATURE_ASYNC_PF_INT, "KVM_FEATURE_ASYNC_PF_INT"))
        if apf and not self.cpuid & needed:
            self.log.warning("guest_no_apf", reason=f"host does not advertise {name}")
        if self.bsp:
            # start_kernel: smp_prepare_boot_cpu (kvm_smp_prepare_boot_cpu -> kvm_guest_cpu_init) comes before
            # late_time_init (x86_late_time_init -> apic_intr_mode_init -> setup_local_APIC): APF is enabled while
            # the LAPIC is still software-disabled, and its wake-all waits for the LAPIC.
            self._cpu_init(kvmapf=apf)
            self._setup_local_apic()
        else:
            # start_secondary -> apic_ap_setup -> setup_local_APIC, then cpuhp's kvm_cpu_online -> kvm_guest_cpu_init.
            self._setup_local_apic()
            self._cpu_init(kvmapf=apf)

    @property
    def bsp(self) -> bool:
        """The boot CPU: vCPU 0 of a normal kernel; a crash kernel boots on the CPU that panicked."""
        return self.vcpu == 0 or self.cfg.kind == "kdump"

    def _setup_local_apic(self) -> None:
        """`setup_local_APIC`: software-enable the LAPIC (the x2APIC SPIV register, bit 8)."""
        self.wrmsr(MSR_X2APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR)

    def _cpu_init(self, *, kvmapf: bool) -> None:
        """`kvm_guest_cpu_init`."""
        self.apf_set_up = self.apf.guest_cpu_init(self.wrmsr, cpuid=self.cpuid, vector=self.cfg.vector,
                                                  kvmapf=kvmapf, send_always=self.cfg.send_always)

    def _kernel_store(self, gpa: int, value: int) -> None:
        while (status := self.mem.store_u32(gpa, value)) is not Access.DONE:
            if status is Access.EXIT:
                with self.cpu.context("exit"):
                    self.transport.exit_mem(gpa, write=True, user=False, irq=False)

    def _crash(self) -> None:
        """panic() with a working crash path (`kvm_crash_shutdown`: kvm_guest_cpu_offline(true)): APF disabled
        without waiting for the events in flight, nobody woken; then the kdump kernel the supervisor boots next.
        Sleeping tasks die with this kernel."""
        self.cpu.cli()
        self.cpu.enter("kernel")
        reason = self.panic_reason or "panic (SIGUSR1)"
        self.log.error("guest_crash", reason=reason, sleepers=self.apf.sleepers.sleepers)
        self.apf.guest_cpu_offline(self.wrmsr, shutdown=True)
        self.exit_code = EXIT_CRASH

    def _reboot(self) -> None:
        """The reboot path (`kvm_pv_guest_cpu_reboot`: kvm_guest_cpu_offline(true)); the next boot is a normal
        kernel."""
        self.cpu.cli()
        self.cpu.enter("kernel")
        self.log.info("guest_reboot", sleepers=self.apf.sleepers.sleepers)
        self.apf.guest_cpu_offline(self.wrmsr, shutdown=True)
        self.exit_code = EXIT_REBOOT

    def _shutdown(self) -> None:
        self.cpu.cli()
        self.cpu.enter("kernel")
        self.apf.pv_disable_apf(self.wrmsr)
        table = self.apf.sleepers
        self.log.info("guest_shutdown", sleepers=table.sleepers, dummies=table.dummies,
                      dummy_tokens=table.dummy_tokens(), dummies_leaked=table.leaked, lost_sleepers=len(table.lost),
                      coalesced=self.cpu.coalesced,
                      deferred=dict(self.cpu.deferred), **self.counts)

    def _panic(self, reason: str, **fields: Any) -> None:
        """panic(): the vCPU stops running tasks; the crash path runs next (run)."""
        self.log.error("guest_panic", reason=reason, **fields)
        if self.lifecycle is None or self.lifecycle == "reboot":
            self.lifecycle = "panic"
            self.panic_reason = reason

    # --- the vCPU ------------------------------------------------------------------------------------------------
    def _vcpu_loop(self) -> None:
        cpu, runq, transport = self.cpu, self.runq, self.transport
        stop_at = self.stop_at = time.monotonic() + self.cfg.duration if self.cfg.duration is not None else math.inf
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
                if self.apf.sleepers.sleepers == 0:
                    return
                if now >= self.drain_deadline:
                    self.log.error("guest_drain_timeout", sleepers=self.apf.sleepers.sleepers)
                    return
                head = runq.peek()
                task = runq.pick() if head is not None and head.in_irq_off_section else None
            else:
                if now >= next_reinit and self.apf.enabled:
                    next_reinit = now + (reinit_every or math.inf)
                    self._cpu_offline_online()
                    continue
                task = runq.pick()
            if task is None:  # the idle loop: safe_halt (sti; hlt), an exit that an event of the host ends
                cpu.enter("halt")
                cpu.sti()
                # (taking pending interrupts may have made a task runnable; while draining, none is picked)
                if (self.apf.sleepers.sleepers if self.stopping else not len(runq)) \
                        and not (transport.poll() or cpu.pending):
                    self._hlt_exit(self.idle_task, min(self.drain_deadline, stop_at, next_reinit) - time.monotonic())
                continue
            self._run_task(task)

    @property
    def pf(self) -> bool:
        return self.cfg.abi == "pf"

    def _hlt_exit(self, task: GuestTask, timeout: float) -> None:
        """HLT with interrupts on as an exit (`kvm_emulate_halt`): the host blocks the vCPU until it has an event.
        Interrupts it raises meanwhile are pending when the exit ends, and taken at the next `sti`; a page-ready
        #PF (`pf`) that ends it is taken here (in `task`'s context: the idle task, or the one whose wait halts the
        CPU)."""
        self.counts["hlt_exits"] += 1
        with self.cpu.context("exit"):
            reply = self.transport.hlt_exit(max(0.0, min(timeout, HLT_SLICE)))
        self.cpu.cli()
        if isinstance(reply, InjectException):
            self._pf_dispatch(task, reply, user=False, irq=True)

    def _tick(self, task: GuestTask, *, user: bool) -> bool:
        """`pf`: the timer tick's exit, if one is due; a page-ready #PF it brings is taken at once, in `task`'s
        context. True if the task goes on with what it was doing."""
        now = time.monotonic()
        if now < self.next_tick:
            return True
        self.next_tick = now + TICK
        self.counts["ticks"] += 1
        with self.cpu.context("exit"):
            reply = self.transport.timer_exit(user=user, irq=True)
        if not isinstance(reply, InjectException):
            return True
        self.cpu.cli()
        self.cpu.enter("kernel")
        if self._pf_dispatch(task, reply, user=user, irq=True):
            self.runq.put_back(task)
        return False

    def _run_task(self, task: GuestTask) -> None:
        cpu = self.cpu
        if task.counting:
            cpu.enter("user")
            cpu.sti()
            self.transport.poll()
            cpu.boundary()  # what the poll raised (a reconnect's wake-all, raised while in `reconnect`) is taken now
            if self.pf and not self._tick(task, user=True):
                return
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
            cpu.enter("user" if acc.user else "kernel_irq_on")
            cpu.sti()
            self.transport.poll()
            cpu.boundary()  # what the poll raised (a reconnect's wake-all, raised while in `reconnect`) is taken now
            if self.pf and not self._tick(task, user=acc.user):
                return
            if acc.user and acc.gfn not in task.mapped:  # the task's page table does not map it: a genuine #PF
                cpu.cli()
                cpu.enter("kernel")
                self.counts["genuine_pf"] += 1
                self.exception_handlers[PF_VECTOR](task, InjectException(PF_VECTOR, USER_BASE + acc.gfn * PAGE_SIZE),
                                                   acc)
                return
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
            if isinstance(reply, InjectException):
                handler = self.exception_handlers.get(reply.vector)
                if handler is None:
                    self._panic("unexpected exception", vector=reply.vector, cr2=reply.cr2, task=task.tid)
                    self.runq.put_back(task)
                else:
                    handler(task, reply, acc)
            elif isinstance(reply, Resume):
                self.runq.put_back(task)  # the access is retried
            elif reply.code == "page_error":
                self._memory_failure(task, acc)
            else:
                self.log.error("guest_host_error", code=reply.code, message=reply.message)
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
            if self.cfg.guest_unmap_ratio and self.mm_rng.random() < self.cfg.guest_unmap_ratio:
                task.mapped.discard(self.mm_rng.choice(task.pages or [acc.gfn]))  # reclaim
        else:
            prev = accept.get(acc.gfn)
            if prev is not None:
                accept[acc.gfn] = (*prev, seq)  # our write may or may not have made it into the copy
        self.runq.put_back(task)

    def _cpu_offline_online(self) -> None:
        """CPU offline and online (cpuhp): kvm_cpu_down_prepare runs kvm_guest_cpu_offline(false) with interrupts
        saved off; the CPU takes what is pending once they are back on (APF is off then: the page-ready handler
        does nothing); kvm_cpu_online runs kvm_guest_cpu_init with interrupts saved off."""
        cpu = self.cpu
        self.log.info("guest_apf_reinit", sleepers=self.apf.sleepers.sleepers)
        cpu.enter("hotplug")  # the cpuhp thread: kernel code with interrupts on
        cpu.sti()
        cpu.cli()
        for woken in self.apf.guest_cpu_offline(self.wrmsr, shutdown=False):
            self._resume(woken.task)
        cpu.sti()  # local_irq_restore
        cpu.cli()
        if self.cfg.online_clears_token:  # not Linux: the stale-slot race's way out (docs/PROTOCOL.md)
            self._kernel_store(self.apf.area.gpa + 4, 0)
            self.log.info("guest_apf_slot_cleared")
        self._cpu_init(kvmapf=True)
        cpu.sti()
        cpu.cli()
        cpu.enter("kernel")

    # --- exceptions (entered with interrupts off: interrupt gates) -----------------------------------------------
    def _exc_page_fault(self, task: GuestTask, exc: InjectException, acc: PageAccess) -> None:
        """`exc_page_fault` -> kvm_handle_async_pf: CR2 and the APF flags are read first (5.8+, noinstr), then the
        entry's work (a nested genuine #PF there reads flags 0), then `__kvm_handle_async_pf` decides; a genuine #PF
        (flags 0) goes on to the kernel's own handling (`_do_page_fault`). `pf`: 5.7's `do_async_page_fault`."""
        if self.pf:
            if self._pf_dispatch(task, exc, user=acc.user, irq=acc.irq):
                self.runq.put_back(task)
            return
        cpu, cr2 = self.cpu, exc.cr2
        cpu.enter("pf_entry")
        flags = self.apf.read_and_reset_flags()
        self._entry_work(task)
        cpu.enter("pf")
        try:
            result = self.apf.handle_async_pf(flags, cr2, task, user=acc.user, irq=acc.irq)
        except Panic as panic:
            self._panic(str(panic), flags=flags, token=cr2, user=acc.user, irq=acc.irq, task=task.tid)
            self.runq.put_back(task)
            return
        if result is Pf.GENUINE:
            if self._do_page_fault(task, cr2, user=acc.user):
                self.runq.put_back(task)
            return
        self._after_not_present(task, result, cr2)

    # --- the guest's own page faults -----------------------------------------------------------------------------
    def _do_page_fault(self, task: GuestTask, address: int, *, user: bool) -> bool:
        """`handle_page_fault` for a #PF that is not an APF: a user address of one of the task's pages is mapped
        (`handle_mm_fault`); anything else is a bad address: SIGSEGV to a user task, an oops in the kernel (the task
        dies; in the idle task, a panic). True if the task goes on (it retries the access)."""
        gfn = (address - USER_BASE) // PAGE_SIZE
        if user and address >= USER_BASE and (gfn in task.pages or gfn in task.shared):
            task.mapped.add(gfn)
            return True
        token = address & 0xFFFF_FFFF
        if task is self.idle_task:
            self._panic("Attempted to kill the idle task!", address=address)
            return False
        current = task.current.gfn if task.current is not None else None
        if user:
            self.counts["sigsegv"] += 1
            self.log.error("guest_sigsegv", task=task.tid, address=address, token=token, gfn=current)
        else:
            self.counts["oops"] += 1
            self.log.error("guest_oops", task=task.tid, address=address, token=token, gfn=current,
                           message=f"BUG: unable to handle page fault for address: {address:#x}")
        task.token = None
        task.finish_access()
        return False

    def _entry_work(self, task: GuestTask) -> None:
        """The #PF entry's work before the handler proper (5.7: TRACE_IRQS_OFF, enter_from_user_mode; and an NMI's
        handler can land here too): now and then (`--entry-fault-ratio`) it touches vmalloc memory this CPU's page
        table does not map yet, a nested genuine #PF whose handler runs `do_async_page_fault` in kernel mode. On
        5.8+ the flags were read before: it reads 0 and `vmalloc_fault` maps the page. On `pf` it reads the
        outer's `reason`: 1 makes the nested fault a not-present on the token (u32)address (the CPU halts for
        good), 2 a wake of it (a dummy); the outer then reads 0 and takes its token for an address."""
        if not self.cfg.entry_fault_ratio or self.entry_rng.random() >= self.cfg.entry_fault_ratio:
            return
        self.counts["entry_faults"] += 1
        address = VMALLOC_START + self.entry_rng.randrange(VMALLOC_PAGES) * PAGE_SIZE + ENTRY_STACK_OFFSET
        reason = self.apf.read_and_reset_flags()
        self.log.info("guest_pf_nested", address=address, reason=reason, task=task.tid)
        if reason == 0:
            return  # vmalloc_fault: the page table gets the entry, the touch is retried
        self.counts["pf_races"] += 1
        kind = {1: "genuine_as_not_present", 2: "genuine_as_page_ready"}.get(reason, "bad_reason")
        token = address & 0xFFFF_FFFF
        self.log.error("guest_pf_race", kind=kind, reason=reason, address=address, token=token, task=task.tid,
                       message="a nested genuine #PF read the reason of the APF #PF it interrupted")
        self.cpu.push("pf_nested")
        try:
            result, woken = self.apf.do_async_page_fault(reason, address, task, user=False)
            if not self._pf_outcome(task, result, woken, token, user=False) and result is Pf.HALT:
                raise _Frozen  # halted on its own address: Linux never comes back from it
        finally:
            self.cpu.pop()
        # The nested fault returns and its access is retried: `reason` is 0 now, vmalloc_fault maps the page.

    # --- `pf`: 5.7's do_async_page_fault -------------------------------------------------------------------------
    def _pf_dispatch(self, task: GuestTask, exc: InjectException, *, user: bool, irq: bool) -> bool:
        """An exception on `pf`, in `task`'s context: #PF as 5.7 takes it (CR2 read by the asm entry, the entry's
        work, then `kvm_read_and_reset_pf_reason` and do_async_page_fault's switch); #DF panics. True if the
        interrupted task goes on (retries its access)."""
        if exc.vector != PF_VECTOR:
            handler = self.exception_handlers.get(exc.vector)
            if exc.vector == DF_VECTOR or handler is None:
                self._exc_double_fault(task, exc, None)
                return False
            self._panic("unexpected exception", vector=exc.vector, cr2=exc.cr2, task=task.tid)
            return False
        cpu = self.cpu
        cpu.push("pf_entry")
        try:
            try:
                self._entry_work(task)
            except _Frozen:
                return False
            reason = self.apf.read_and_reset_flags()
            cpu.enter("pf")
            result, woken = self.apf.do_async_page_fault(reason, exc.cr2, task, user=user)
            if result is Pf.GENUINE:
                return self._do_page_fault(task, exc.cr2, user=user)
            return self._pf_outcome(task, result, woken, exc.cr2 & 0xFFFF_FFFF, user=user)
        finally:
            cpu.pop()

    def _pf_outcome(self, task: GuestTask, result: Pf, woken: list[Woken[GuestTask]], token: int, *,
                    user: bool) -> bool:
        """What do_async_page_fault's APF cases do to `task`. True if it goes on."""
        if result is Pf.WAKE:
            for w in woken:
                if w.task is not self.halted_task and w.task is not task:
                    self._resume(w.task)
                else:
                    w.task.token = None
            return True
        if result is Pf.SLEEP:
            task.token = token
            self.counts["apf_waits"] += 1
            self.log.info("guest_apf_wait", token=token, task=task.tid)
            return False
        if result is Pf.HALT:
            self.counts["apf_waits"] += 1
            self.log.info("guest_apf_wait", token=token, task=task.tid, halted=True)
            return self._pf_halted_wait(task, token)
        return True  # NO_SLEEP: a dummy was there; WARN

    def _pf_halted_wait(self, task: GuestTask, token: int) -> bool:
        """5.7's `kvm_async_pf_task_wait` with n.halted: native_safe_halt until the node is unhashed, taking the
        #PFs that come meanwhile. Gives up (False: the task stays asleep) only when the kernel stops or panics."""
        prev, self.halted_task = self.halted_task, task
        self.cpu.push("halt")
        try:
            while self.apf.sleepers.holds(token, task):
                now = time.monotonic()
                if self.cfg.duration is not None and now >= self.stop_at:
                    self._request_stop()
                if self.lifecycle is not None or (self.stopping and now >= self.drain_deadline):
                    self.log.error("guest_apf_halt_stuck", token=token, task=task.tid,
                                   message="the CPU halted in kvm_async_pf_task_wait and was never woken")
                    return False
                self.cpu.sti()
                self._hlt_exit(task, self.drain_deadline - now)
            task.token = None
            return True
        finally:
            self.cpu.pop()
            self.halted_task = prev

    def _exc_double_fault(self, task: GuestTask, exc: InjectException, acc: PageAccess | None) -> None:
        """`exc_double_fault`: die("double fault"), then panic."""
        self._panic("double fault", vector=exc.vector, task=task.tid)
        if task is not self.idle_task:
            self.runq.put_back(task)

    def _exc_virtualization_exception(self, task: GuestTask, exc: InjectException, acc: PageAccess) -> None:
        """`ve` (apf-emu's design): the #VE of a not-present; the token is in the #VE information area."""
        self.cpu.enter("ve")
        try:
            result, token = self.apf.handle_ve(task, user=acc.user, irq=acc.irq)
        except Panic as panic:
            self._panic(str(panic), vector=exc.vector, user=acc.user, irq=acc.irq, task=task.tid)
            self.runq.put_back(task)
            return
        self._after_not_present(task, result, token)

    def _after_not_present(self, task: GuestTask, result: Pf, token: int) -> None:
        if result is Pf.ERROR:  # `int-error`: its page-ready came first and carried the error
            self._sigbus(task, token, "the page-ready reported a page-in error")
            return
        if result is Pf.SLEEP:
            task.token = token
            self.counts["apf_waits"] += 1
            self.log.info("guest_apf_wait", token=token, task=task.tid)
            if not len(self.runq):
                self.log.info("guest_apf_halt", token=token)
            return
        self.runq.put_back(task)  # NO_SLEEP, WARN, GENUINE: back to the task, which retries (or ends) its access

    # --- interrupts (the handler runs with interrupts off) -------------------------------------------------------
    def _interrupt(self, vector: int) -> None:
        self.counts["interrupts"] += 1
        if vector != self.cfg.vector or not self.apf_set_up:
            self.log.warning("guest_spurious_interrupt", vector=vector)
            return
        woken = self.apf.asyncpf_interrupt(self.wrmsr)
        if woken is None:
            self.log.info("guest_apf_irq_ignored", token=self.apf.area.token, message="APF is off on this vCPU")
            return
        for w in woken:
            if w.error:
                self._sigbus(w.task, w.token, "the page-ready reported a page-in error")
            else:
                self._resume(w.task)

    def _sigbus(self, task: GuestTask, token: int | None, reason: str) -> None:
        """`int-error`'s handle_async_pf_error (and a memory failure the VMM reported): SIGBUS to the user task,
        which dies of it (the kernel's default action). Its pages are not touched again."""
        gfn = task.current.gfn if task.current is not None else None
        self.counts["sigbus"] += 1
        self.log.error("guest_sigbus", task=task.tid, token=token, gfn=gfn, reason=reason)
        task.token = None
        task.finish_access()

    def _memory_failure(self, task: GuestTask, acc: PageAccess) -> None:
        """The VMM could not give the vCPU the page (its page-in failed: `apf_error_exit`) and reports a memory
        failure of this access: SIGBUS to a user task; an exception-table fixup in the kernel (the access fails,
        the kernel goes on)."""
        if acc.user:
            self._sigbus(task, None, "the VMM reported a memory failure of the access")
            return
        self.counts["fixups"] += 1
        self.log.error("guest_mce_fixup", task=task.tid, gfn=acc.gfn)
        task.finish_access()
        self.runq.put_back(task)

    def _resume(self, task: GuestTask) -> None:
        task.token = None
        if self.stopping:
            task.finish_access()  # draining: the task ends here
        else:
            self.runq.add(task)
