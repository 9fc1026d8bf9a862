# The guest kernel of one vCPU: boot, the vCPU loop, the #PF handler and the page-ready interrupt handler, after
# arch/x86/kernel/kvm.c.
#
# - Boot (`kvm_guest_cpu_init`): wrmsr MSR_KVM_ASYNC_PF_INT = vector first, then MSR_KVM_ASYNC_PF_EN =
#   area | ENABLED | DELIVERY_AS_INT [| SEND_ALWAYS]. The area is this vCPU's 64-byte slot in guest page 0.
# - The vCPU loop runs one task access at a time. Between accesses, with interrupts on, it takes pending vectors;
#   with nothing runnable it halts until a vector arrives.
# - #PF (`__kvm_handle_async_pf`): read and reset `flags`. 0 is a genuine fault. PAGE_NOT_PRESENT puts the task to
#   sleep on the token (CR2) in the sleep table, or finds the dummy a faster page-ready left and retries at once.
# - Page-ready interrupt (`sysvec_kvm_asyncpf_interrupt`): read `token`, wake its sleeper (or leave a dummy), wake
#   everything on 0xffffffff, write 0 to `token`, wrmsr MSR_KVM_ASYNC_PF_ACK = 1.
# - Stop (SIGTERM/SIGINT): run no new accesses, keep taking page-ready interrupts until no task sleeps (or the
#   drain timeout), then disable APF as the reboot path does (`kvm_pv_disable_apf`) and leave.
#
# With the socket transport an interrupt arrives as a message; a reader task queues it and the vCPU loop takes it at
# the next instruction boundary where interrupts are on, which is where a real CPU would take it.
from __future__ import annotations

import math
import os
import random
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

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
from shared.channel import MessageChannel
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.wire import HOST_TO_GUEST, PROTOCOL_VERSION, Message, WireError

from .memory import Access, GuestMemoryAccess
from .sleep_table import DuplicateToken, SleepTable
from .workload import GuestTask, RunQueue, task_pages


class GuestError(Exception):
    """The guest cannot go on (host refused it, went away, or broke the protocol)."""


@dataclass(frozen=True)
class GuestConfig:
    vm: str
    socket: Path
    vcpu: int | None = None
    boot: int = 1
    kind: str = "normal"
    tasks: int = 4
    vector: int = 0xF3
    send_always: bool = False
    apf: bool = True
    seed: int = 0
    kernel_ratio: float = 0.1
    irq_off_ratio: float = 0.05
    log_dir: Path | None = None
    log_stdout: bool = False
    connect_timeout: float = 10.0
    drain_timeout: float = 5.0
    duration: float | None = None


async def connect(path: Path, timeout: float) -> trio.SocketStream:
    """Connect, retrying while the host is not listening yet (it may be starting or restarting)."""
    with trio.move_on_after(timeout):
        while True:
            try:
                return await trio.open_unix_socket(os.fspath(path))
            except (FileNotFoundError, ConnectionRefusedError):
                await trio.sleep(0.02)
    raise GuestError(f"no host listening on {path} after {timeout} s")


class GuestKernel:
    def __init__(self, config: GuestConfig) -> None:
        self.cfg = config
        self.log: Any = None
        self.sleep: SleepTable[GuestTask] = SleepTable()
        self.runq = RunQueue()
        self.pending: deque[int] = deque()  # vectors raised but not yet taken (the IRR)
        self.apf_enabled = False
        self.stopping = False
        self.drain_deadline = math.inf
        self._kick = trio.Event()
        self.counts = {"accesses": 0, "data_checks": 0, "data_check_failures": 0, "apf_waits": 0, "exits": 0,
                       "interrupts": 0}

    # --- plumbing ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        stream = await connect(self.cfg.socket, self.cfg.connect_timeout)
        self.chan = MessageChannel(stream, HOST_TO_GUEST)
        try:
            welcome = await self._handshake()
            self.vcpu: int = welcome["vcpu"]
            self.cpuid: int = welcome["cpuid"]
            if self.cfg.log_dir is not None or self.cfg.log_stdout:
                slog.configure(self.cfg.log_dir / f"guest-{self.vcpu}.jsonl" if self.cfg.log_dir else None,
                               stdout=self.cfg.log_stdout)
            self.log = slog.get_logger("guest", self.cfg.vm, vcpu=self.vcpu, boot=self.cfg.boot)
            ram = GuestRam.open(self.cfg.vm, RamLayout(welcome["pages"]))
            try:
                self.mem = GuestMemoryAccess(ram, self.vcpu)
                self.apf = KvmVcpuPvApfData(ram.u32, self.vcpu * KVM_VCPU_PV_APF_DATA_SIZE)
                for tid in range(self.cfg.tasks):
                    pages = task_pages(welcome["pages"], welcome["vcpus"], self.vcpu, self.cfg.tasks, tid)
                    if pages:
                        rng = random.Random(f"{self.cfg.seed}/{self.vcpu}/{self.cfg.boot}/{tid}")
                        self.runq.add(GuestTask(tid, pages, rng, self.cfg.kernel_ratio, self.cfg.irq_off_ratio))
                self._replies_send, self._replies = trio.open_memory_channel[Message](1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(slog.flush_every)
                    nursery.start_soon(self._signals)
                    await self._boot()
                    await self._vcpu_loop()
                    await self._shutdown()
                    nursery.cancel_scope.cancel()
            finally:
                self.mem.leave()
                self.apf.release()
                del self.mem
                ram.close()
        finally:
            with trio.CancelScope(shield=True):
                await self.chan.aclose()

    async def _handshake(self) -> Message:
        await self.chan.send("hello", proto=PROTOCOL_VERSION, vm=self.cfg.vm, vcpu=self.cfg.vcpu,
                             boot=self.cfg.boot, kind=self.cfg.kind, pid=os.getpid())
        msg = await self.chan.receive()
        if msg is None:
            raise GuestError("host closed the connection during the handshake")
        if msg["t"] == "error":
            raise GuestError(f"host refused us: {msg['code']}: {msg['message']}")
        if msg["t"] != "welcome":
            raise GuestError(f"expected welcome, got {msg['t']}")
        return msg

    async def _reader(self) -> None:
        while True:
            try:
                msg = await self.chan.receive()
            except WireError as exc:
                raise GuestError(f"bad frame from host: {exc.code}: {exc.message}") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                msg = None
            if msg is None:
                raise GuestError("host went away")
            if msg["t"] == "interrupt":
                self.pending.append(msg["vector"])
                self._kick.set()
            else:
                await self._replies_send.send(msg)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            if self.cfg.duration is not None:
                with trio.move_on_after(self.cfg.duration):
                    async for _ in signals:
                        break
            else:
                async for _ in signals:
                    break
        self.stopping = True
        self.drain_deadline = trio.current_time() + self.cfg.drain_timeout
        self._kick.set()

    async def request(self, msg_type: str, **fields: Any) -> Message:
        """Send a request that exits to the host (wrmsr, EPT violation) and wait for its one reply."""
        await self.chan.send(msg_type, **fields)
        reply = await self._replies.receive()
        if reply["t"] == "error" and reply["fatal"]:
            raise GuestError(f"host closed us: {reply['code']}: {reply['message']}")
        return reply

    async def wrmsr(self, msr: int, value: int) -> bool:
        reply = await self.request("msr_write", msr=msr, value=value)
        ok = reply["t"] == "msr_result" and reply["ok"]
        if not ok:
            self.log.error("guest_msr_gp", msr=hex(msr), value=value, error=reply.get("error") or reply.get("message"))
        return ok

    # --- boot and shutdown ---------------------------------------------------------------------------------------
    async def _boot(self) -> None:
        self.log.info("guest_boot", kind=self.cfg.kind, tasks=len(self.runq), vector=self.cfg.vector,
                      apf=self.cfg.apf, send_always=self.cfg.send_always)
        if not self.cfg.apf:
            return
        if not self.cpuid & KVM_FEATURE_ASYNC_PF_INT:  # kvm_guest_cpu_init checks the feature first
            self.log.warning("guest_no_apf", reason="host does not advertise KVM_FEATURE_ASYNC_PF_INT")
            return
        # Zero the area first. Until APF is on its page is ordinary guest memory that may be swapped out, so the
        # stores go through the EPT like any other access.
        await self._kernel_store(self.apf.gpa, 0)
        await self._kernel_store(self.apf.gpa + 4, 0)
        if await self.wrmsr(MSR_KVM_ASYNC_PF_INT, self.cfg.vector):
            value = async_pf_en_value(self.apf.gpa, send_always=self.cfg.send_always)
            self.apf_enabled = await self.wrmsr(MSR_KVM_ASYNC_PF_EN, value)

    async def _kernel_store(self, gpa: int, value: int) -> None:
        while (status := self.mem.store_u32(gpa, value)) is not Access.DONE:
            if status is Access.EXIT:
                await self.request("exit_mem", gpa=gpa, write=True, user=False, irq=False)

    async def _shutdown(self) -> None:
        if self.apf_enabled:
            self.apf_enabled = False
            await self.wrmsr(MSR_KVM_ASYNC_PF_EN, 0)
        self.log.info("guest_shutdown", sleepers=self.sleep.sleepers, dummies=self.sleep.dummies, **self.counts)

    # --- the vCPU ------------------------------------------------------------------------------------------------
    async def _vcpu_loop(self) -> None:
        runq = self.runq
        while True:
            if self.pending and not self._irqs_off():
                await self._take_interrupts()
            if self.stopping:
                if self.sleep.sleepers == 0:
                    return
                if trio.current_time() >= self.drain_deadline:
                    self.log.error("guest_drain_timeout", sleepers=self.sleep.sleepers)
                    return
                task = runq.pick() if self._irqs_off() else None
            else:
                task = runq.pick()
            if task is None:
                await self._halt()
                continue
            await self._step(task)
            await trio.lowlevel.checkpoint()  # let the reader queue any vector that arrived meanwhile

    def _irqs_off(self) -> bool:
        head = self.runq.peek()
        return head is not None and head.in_irq_off_section

    async def _halt(self) -> None:
        """hlt: wait for an interrupt (or the stop signal)."""
        self._kick = trio.Event()
        if self.pending:
            return
        with trio.move_on_at(self.drain_deadline):
            await self._kick.wait()

    async def _step(self, task: GuestTask) -> None:
        acc = task.next_access()
        status, seq, ok = self.mem.update_page(acc.gfn, task.accept.get(acc.gfn), self.vcpu << 16 | task.tid)
        if status is Access.DONE:
            self.counts["accesses"] += 1
            self.counts["data_checks"] += 1
            if not ok:
                self.counts["data_check_failures"] += 1
                self.log.error("guest_data_check", gfn=acc.gfn, ok=False, task=task.tid,
                               expected=list(task.accept.get(acc.gfn, ())))
            elif task.faulted:
                self.log.info("guest_data_check", gfn=acc.gfn, ok=True, task=task.tid)
            task.accept[acc.gfn] = (seq,)
            task.finish_access()
            self.runq.put_back(task)
        elif status is Access.RETRY:
            prev = task.accept.get(acc.gfn)
            if prev is not None:
                task.accept[acc.gfn] = (*prev, seq)  # our write may or may not have made it into the copy
            self.runq.put_back(task)
        else:
            self.counts["exits"] += 1
            task.faulted = True
            reply = await self.request("exit_mem", gpa=acc.gfn * PAGE_SIZE, write=True, user=acc.user, irq=acc.irq)
            if reply["t"] == "inject_pf":
                await self._page_fault(task, reply["cr2"], acc.user, acc.irq)
            elif reply["t"] == "resume":
                self.runq.put_back(task)
            else:
                self.log.error("guest_host_error", code=reply.get("code"), message=reply.get("message"))
                task.finish_access()
                self.runq.put_back(task)

    # --- #PF -----------------------------------------------------------------------------------------------------
    async def _page_fault(self, task: GuestTask, cr2: int, user: bool, irq: bool) -> None:
        flags = self.apf.read_and_reset_flags()
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

    # --- page-ready interrupt ------------------------------------------------------------------------------------
    async def _take_interrupts(self) -> None:
        while self.pending and not self._irqs_off():
            await self._interrupt(self.pending.popleft())

    async def _interrupt(self, vector: int) -> None:
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
            task, dummy_created = self.sleep.wake(token)
            if task is not None:
                self.log.info("guest_apf_wake", token=token, task=task.tid, all=False)
                self._resume(task)
            else:
                self.log.info("guest_apf_dummy", token=token, action="created" if dummy_created else "removed")
        self.log.info("guest_apf_ack", token=token)
        self.apf.token = 0
        await self.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1)

    def _resume(self, task: GuestTask) -> None:
        task.token = None
        if self.stopping:
            task.finish_access()  # draining: the task ends here
        else:
            self.runq.add(task)
