# One guest agent's connection: the vCPU "thread" that runs the state machine of host_daemon/vcpu.py against the
# wire, the page-ins of host_daemon/memory.py and the guest's APF area.
#
# Every request from the guest gets exactly one reply (its result, an `error`, or for an APF the #PF itself);
# page-ready interrupts are pushed whenever a completion or an ACK lets one out. How a #PF or an interrupt reaches
# the guest is the notifier's business (host_daemon/notify.py). A bad frame is answered with an `error` and logged;
# only a fatal one (oversized or truncated frame, a second hello) closes the connection, and nothing here can take
# the daemon or other vCPUs down. The connection owns the vCPU's control block (host_daemon/guest_views.py): when
# it ends, the memory model stops looking at the block and the vCPU holds no page any more.
from __future__ import annotations

import contextlib
from typing import Any, Protocol

import trio

from shared.channel import MessageChannel
from shared.guest_ram import PAGE_SIZE
from shared.wire import Message, WireError

from .backing_store import SavedVcpu
from .guest_views import ControlBlock
from .memory import GuestMemory
from .notify import Notifier
from .pager import Pager
from .vcpu import AsyncPf, VcpuApf


class VmContext(Protocol):
    """What a connection needs of its VM (host_daemon/daemon.py's Vm): its memory, its page-ins, the nursery that
    page-ins run in, who holds which vCPU, and whether the daemon is ending."""

    memory: GuestMemory
    pager: Pager
    nursery: trio.Nursery
    vcpus: dict[int, VcpuConnection]

    @property
    def stopping(self) -> bool: ...


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
        self.apf = VcpuApf(vcpu_id, vm.memory.ram.u32, vm.memory.ram.layout.pages, log)
        self.pinned: int | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()  # set once the connection is reset and its end logged

    async def start(self, saved: SavedVcpu | None) -> None:
        """Continue the vCPU's token ids across boots; restore its registers if this boot is the one saved."""
        backing = self.vm.memory.backing
        if saved is not None and saved.boot == self.boot:
            self.apf.restore(saved.msr_en, saved.msr_int, saved.apf_id)
            await self._sync_pin()
        else:
            self.apf.apf_id = saved.apf_id if saved is not None else 0
            backing.save_vcpu(self.vcpu_id, self.boot, 0, 0, self.apf.apf_id)

    def _save(self) -> None:
        self.vm.memory.backing.save_vcpu(self.vcpu_id, self.boot, self.apf.msr_en, self.apf.msr_int, self.apf.apf_id)

    async def serve(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if self.apf.reraise:
                        self.apf.reraise = False
                        await self.notifier.interrupt(self.apf.vector)
                    if self.apf.done:  # a restore queued a wake-all
                        await self.deliver_ready()
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
            try:
                await self._dispatch(msg)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the guest went away while we answered

    async def reject(self, exc: WireError) -> None:
        self.log.error("wire_error", code=exc.code, message=exc.message, fatal=exc.fatal)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.chan.send("error", code=exc.code, message=exc.message, fatal=exc.fatal)

    async def _dispatch(self, msg: Message) -> None:
        t = msg["t"]
        if t == "msr_write":
            await self._msr_write(msg["msr"], msg["value"])
        elif t == "exit_mem":
            await self._exit_mem(msg["gpa"], user=msg["user"], irq=msg["irq"])
        else:  # hello again: the guest lost track of its connection; nothing it says can be trusted any more
            await self.reject(WireError("unexpected", f"a second {t} on one connection", fatal=True))
            raise trio.ClosedResourceError("second hello")

    async def _msr_write(self, msr: int, value: int) -> None:
        target = self.apf.area_gfn_enabled_by(msr, value)
        if target is not None:
            # The host writes the area, so its page must be resident before APF is on and stay so while it is
            # (KVM's put_user would fault it in): fault it in and pin it before the write takes effect.
            await self._pin(target)
        result = self.apf.write_msr(msr, value)
        await self._sync_pin()
        if target is not None:
            self.vm.memory.unpin(target)
        if result.ok:
            self._save()
        if result.rescan:
            # Raised before the reply, so that it is pending when the vCPU re-enters after the wrmsr exit, as KVM
            # injects it on that very entry: the wake-all of an enable is then taken before any later #PF.
            await self.deliver_ready()
        await self.chan.send("msr_result", msr=msr, ok=result.ok, error=result.error)

    async def _pin(self, gfn: int) -> None:
        await self.vm.pager.fault_in(gfn, self.vm.nursery)
        self.vm.memory.pin(gfn)

    async def _sync_pin(self) -> None:
        """Keep exactly one pin, on the page of the APF area in force (none while APF is off)."""
        area_gfn = self.apf.area.gpa // PAGE_SIZE if self.apf.area is not None else None
        if area_gfn != self.pinned:
            if area_gfn is not None:
                await self._pin(area_gfn)
            if self.pinned is not None:
                self.vm.memory.unpin(self.pinned)
            self.pinned = area_gfn

    async def _exit_mem(self, gpa: int, *, user: bool, irq: bool) -> None:
        gfn = gpa // PAGE_SIZE
        memory = self.vm.memory
        if not 0 <= gpa < memory.ram.layout.ram_size:
            await self.reject(WireError("bad_address", f"gpa {gpa:#x} is outside guest RAM"))
            return
        if memory.present(gfn):
            await self.chan.send("resume", gpa=gpa)  # raced with a page-in: just re-enter
            return
        decision = self.apf.on_fault(gfn, user=user, irq=irq)
        if decision.apf is None:
            await self.vm.pager.fault_in(gfn, self.vm.nursery)  # the vCPU is halted until the page is in
            await self.chan.send("resume", gpa=gpa)
            return
        memory.backing.save_apf_id(self.vcpu_id, self.apf.apf_id)
        event = self.vm.pager.start_page_in(gfn, self.vm.nursery)
        self._nursery.start_soon(self._complete_when, decision.apf, event)
        await self.notifier.inject_pf(decision.apf.token)

    async def _complete_when(self, item: AsyncPf, event: trio.Event) -> None:
        await event.wait()  # the page may be evicted again before the guest retries: it then faults anew
        if self.apf.complete(item):
            await self.deliver_ready()

    async def deliver_ready(self) -> None:
        vector = self.apf.check_completion()
        if vector is not None:
            await self.notifier.interrupt(vector)

    def reset(self, reason: str) -> None:
        """The vCPU is gone: drop its APF state, as KVM does on vCPU reset or destroy."""
        self.apf.drop_all(reason)
        self.apf.area = None
        self.notifier.close()
        if self.pinned is not None:
            self.vm.memory.unpin(self.pinned)
            self.pinned = None
        self.vm.memory.detach(self.vcpu_id, self.ctl.u32)
        if not self.vm.stopping and self.vm.vcpus.get(self.vcpu_id) in (None, self):
            # The guest went away. When the host is the one ending (SIGTERM, or a failure that leaves the state for
            # --recover), its guests may well live on: a recovering host must wait for them (the recovery window).
            self.vm.memory.backing.detach_guest(self.vcpu_id)
        self.ctl.close()
