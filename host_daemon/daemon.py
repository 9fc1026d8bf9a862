# The host daemon: one VM. Owns guest RAM (creates and finally unlinks the shm object), the published EPT and the
# memory model, the Unix socket the guest agents connect to, the handshake that gives each its vCPU (and, with
# `welcome`, the EPT and a control block of its own), and orderly shutdown on SIGTERM/SIGINT.
#
# The handshake trusts nothing in `hello`: every integer has a range (shared/wire.py HELLO_RANGES, the vCPU
# below --vcpus), anything outside is refused with a fatal error, and a connection handler that fails anyway is
# logged with its traceback (`vcpu_crash`) and frees its vCPU.
#
# Structure follows hypercorn's trio worker: a nursery for the server, a signal task that cancels it, and cleanup
# in `finally` blocks so that a clean stop leaves no socket file and no shm segment behind.
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import posix_ipc
import trio

from shared import log as slog
from shared.abi import AsyncPfEn
from shared.abis import CPUID as ABI_CPUID
from shared.channel import MessageChannel
from shared.config import HostOptions, vmm_socket, with_
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout, check_vm_id
from shared.snapshot import Manifest, VcpuState, parse_msr_list
from shared.transports import TRANSPORTS
from shared.wire import (
    BOOT_MAX,
    GUEST_TO_HOST,
    HELLO_RANGES,
    PROTOCOL_VERSION,
    ErrorReply,
    Hello,
    VmmDone,
    VmmSnapshot,
    Welcome,
    WireError,
)

from .backing_store import BackingStore
from .guest_views import ControlBlock, PublishedEpt
from .memory import GuestMemory
from .pager import Pager
from .processes import pid_alive
from .snapshot import SnapshotError, check_directory, pause, resume, resume_paused, save
from .transports import make_notifier
from .vcpu import AsyncPf
from .vcpu_conn import VcpuConnection

HANDSHAKE_TIMEOUT_S = 5.0


def staging_socket(opts: HostOptions, suffix: str = "") -> Path:
    """Where the socket is bound before it is renamed to `socket` (`suffix` for the VMM socket's)."""
    return opts.socket.with_name(f".apf-{os.getpid()}{suffix}")


async def _listen(path: Path, staging: Path) -> trio.socket.SocketType:
    """A Unix socket listening at `path`, mode 0600, that appears there only once it listens."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(os.fspath(staging))
    os.chmod(staging, 0o600)
    sock.listen(128)
    os.replace(staging, path)
    return sock


class Vm:
    def __init__(self, config: HostOptions) -> None:
        self.config = config
        self.log = slog.get_logger("host", config.vm)
        self.memory: GuestMemory
        self.pager: Pager
        self.ept: PublishedEpt
        self.nursery: trio.Nursery
        self.vcpus: dict[int, VcpuConnection] = {}
        self.recovery_pins: dict[int, int] = {}  # vCPU -> APF-area page pinned until that vCPU reconnects
        self.last_boot: dict[int, int] = {}  # vCPU -> newest boot that connected, to number a hello with boot 0
        self.pageready_pending: dict[int, bool] = {}  # vCPU -> what kvm_vcpu_reset left of it for the next boot
        self.handed_over = False  # a snapshot was taken: the host stops and leaves the VM for the restoring host
        self.snapshotting = False  # a snapshot is being taken: no new guest, no second snapshot
        self.carried: dict[int, list[AsyncPf]] = {}  # `no-disable-eat`: what a vCPU's kdump kernel will find
        self.restored: list[VcpuState] = []  # a restored snapshot's vCPUs: their guests resume once the host listens

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        layout = RamLayout(cfg.pages)
        if cfg.recover:
            # A previous host of this VM was killed: guest RAM, the swap and the saved registers are still there.
            try:
                ram = GuestRam.open(cfg.vm, layout)
                backing = BackingStore(cfg.vm, cfg.pages, recover=True)
            except posix_ipc.ExistentialError:
                raise ValueError(f"--recover: there is no VM {cfg.vm!r} to recover") from None
            ram.owner = True
        else:
            ram = GuestRam.create(cfg.vm, layout)
            backing = BackingStore(cfg.vm, cfg.pages, recover=False)
        clean = False
        started = False  # listening: from then on a failure leaves the VM's state for --recover
        ept = None
        try:
            ept = self.ept = PublishedEpt(cfg.vm, cfg.pages)
            self.memory = GuestMemory(ram, ept.u32, backing, cfg.resident, self.log, recover=cfg.recover)
            self.pager = Pager(self.memory, cfg.page_in_latency, random.Random(cfg.seed), cfg.page_in_errors)
            # A stale socket of a killed host goes first; then bound and listening under a temporary name, and
            # renamed into place: whoever sees the socket file (a guest, a health check, a supervisor waiting for
            # a restarted host, a test) can connect to it. The VMM's socket (snapshots) is another file beside it.
            sockets = {cfg.socket: staging_socket(cfg), vmm_socket(cfg.socket): staging_socket(cfg, ".vmm")}
            for path in (*sockets, *sockets.values()):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            try:
                sock, vmm = [await _listen(path, staging) for path, staging in sockets.items()]
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._signals, nursery.cancel_scope)
                    if cfg.recover:
                        await self._pin_saved_areas()
                    self.log.info(
                        "host_ready", socket=str(cfg.socket), shm=ram.name, pages=cfg.pages, resident=cfg.resident,
                        vcpus=cfg.vcpus, latency=str(cfg.page_in_latency), errors=str(cfg.page_in_errors),
                        seed=cfg.seed, abi=cfg.abi,
                        cpuid=ABI_CPUID[cfg.abi], recovered=cfg.recover,
                        recovered_pages=self.memory.stats.recovered_pages, resident_now=self.memory.resident,
                        awaiting=self.memory.awaiting,
                    )
                    started = True
                    if self.restored:
                        self.log.info("vmm_restore", directory=str(cfg.restore),
                                      guest_pids=[s.guest_pid for s in self.restored],
                                      resumed=resume_paused(self.restored))
                    await nursery.start(trio.serve_listeners, self._handle, [trio.SocketListener(sock)])
                    await nursery.start(trio.serve_listeners, self._handle_vmm, [trio.SocketListener(vmm)])
                    task_status.started()
                clean = True
            finally:
                if not self.handed_over:  # a snapshot removed them at once: they may be a restoring host's by now
                    self._unlink_sockets()
        finally:
            memory = getattr(self, "memory", None)  # absent if the memory model refused its configuration
            self.log.info("host_stop", **(vars(memory.stats) if memory is not None else {}))
            # The VM ends with a clean stop. After a crash inside the daemon the state stays for --recover; the
            # runner removes it if nobody recovers it.
            if ept is not None:
                ept.close()
            # A host that never started (its socket could not be bound, say) leaves nothing to recover, unless it
            # was itself recovering a VM.
            unlink_it = (clean and not self.handed_over) or not (started or cfg.recover)
            if unlink_it:
                ram.close()
            else:
                ram.close_keep()
            backing.close(unlink_it=unlink_it)

    async def _pin_saved_areas(self) -> None:
        """Until each vCPU is back, keep the page of its saved APF area resident: its guest still runs and writes
        the area directly (clearing the token slot), which must not land on a page the new host swapped out."""
        for vcpu in range(self.config.vcpus):
            saved = self.memory.backing.saved_vcpu(vcpu)
            if saved is None:
                continue
            en = AsyncPfEn(saved.msr_en)
            if en.apf_enabled and en.gpa < self.memory.ram.layout.ram_size:
                gfn = en.gpa // PAGE_SIZE
                await self.pager.fault_in(gfn, self.nursery)
                self.memory.pin(gfn)
                self.recovery_pins[vcpu] = gfn

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.log.info("host_signal", signal=signal.Signals(signum).name)
                scope.cancel()
                return

    def _unlink_sockets(self) -> None:
        cfg = self.config
        for path in (cfg.socket, vmm_socket(cfg.socket), staging_socket(cfg), staging_socket(cfg, ".vmm")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _handle_vmm(self, stream: trio.SocketStream) -> None:
        """The VMM's socket: one `vmm_snapshot` request per connection."""
        chan = MessageChannel(stream, GUEST_TO_HOST)
        try:
            msg = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):  # for the request only: the pause has its own
                try:
                    msg = await chan.receive()
                except WireError as exc:
                    await self._refuse(chan, exc.code, exc.message)
                    return
            if isinstance(msg, VmmSnapshot):
                await self._vmm_snapshot(chan, msg)
            elif msg is not None:
                await self._refuse(chan, "unexpected", f"the VMM socket takes vmm_snapshot, not {msg.TYPE}")
        except Exception as exc:  # a VMM connection's failure never takes the daemon down
            if not _only_disconnects(exc):
                self.log.exception("vmm_crash", error=repr(exc))
        finally:
            with trio.CancelScope(shield=True):
                await chan.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        chan = MessageChannel(stream, GUEST_TO_HOST)
        session = _Session()
        try:
            await self._session(chan, session)
        except Exception as exc:  # also an ExceptionGroup of Exceptions; Cancelled is a BaseException and passes
            # One connection's failure must never take the daemon or the other vCPUs down; `_session` freed the
            # vCPU in its `finally` before we get here.
            if not _only_disconnects(exc):
                self.log.exception("vcpu_crash", vcpu=session.vcpu, error=repr(exc))
        finally:
            with trio.CancelScope(shield=True):
                await chan.aclose()

    async def _session(self, chan: MessageChannel, session: _Session) -> None:
        msg = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
            try:
                msg = await chan.receive()
            except WireError as exc:
                await self._refuse(chan, exc.code, exc.message)
                return
        if scope.cancelled_caught:
            await self._refuse(chan, "handshake_timeout", f"no hello within {HANDSHAKE_TIMEOUT_S} s")
            return
        if msg is None:
            return  # a probe (health check) that connected and left
        if isinstance(msg, VmmSnapshot):
            await self._refuse(chan, "unexpected", "vmm_snapshot is the VMM's: send it on the VMM socket "
                               f"({vmm_socket(self.config.socket)}), which no guest is given")
            return
        if self.snapshotting:
            await self._refuse(chan, "snapshot_in_progress", "the VM is being snapshotted")
            return
        if not isinstance(msg, Hello):
            await self._refuse(chan, "unexpected", f"expected hello, got {msg.TYPE}")
            return
        peer_pid = _peer_pid(chan)
        problem = self._check_hello(msg) or self._check_peer(peer_pid, msg)
        if problem:
            await self._refuse(chan, *problem)
            return
        vcpu_id = msg.vcpu if msg.vcpu is not None else self._free_vcpu()
        boot = msg.boot or self._next_boot(vcpu_id)
        old = self.vcpus.get(vcpu_id)
        if old is not None:
            # A newer boot of this vCPU: the guest that held it is gone even if its connection has not ended yet
            # (the host has not read its end yet). Only if the kernel agrees: a live guest is never pushed out.
            if old.peer_pid and pid_alive(old.peer_pid):
                await self._refuse(chan, "vcpu_busy", f"vCPU {vcpu_id} is held by a live guest (pid {old.peer_pid})")
                return
            old.log.info("vcpu_replaced", by_boot=boot)
            old.scope.cancel()
            with trio.move_on_after(5):
                await old.done.wait()
            if vcpu_id in self.vcpus:  # it did not let go, or another hello took it while we waited
                await self._refuse(chan, "vcpu_busy", f"vCPU {vcpu_id} did not become free")
                return
        ctl = ControlBlock(self.config.vm, vcpu_id)
        try:
            notifier = make_notifier(msg.transport, chan, ctl.u32, msg.pid)
        except OSError as exc:
            ctl.close()
            await self._refuse(chan, "bad_pid", f"cannot set up {msg.transport} for pid {msg.pid}: {exc.strerror}")
            return
        log = slog.get_logger("host", self.config.vm, vcpu=vcpu_id, boot=boot)
        conn = VcpuConnection(self, chan, notifier, ctl, vcpu_id, boot, log, peer_pid or 0)
        if self.snapshotting or self.handed_over:  # a snapshot began while this hello was being answered
            notifier.close()
            ctl.close()
            await self._refuse(chan, "snapshot_in_progress", "the VM is being snapshotted")
            return
        session.vcpu = vcpu_id
        self.vcpus[vcpu_id] = conn
        self.last_boot[vcpu_id] = max(boot, self.last_boot.get(vcpu_id, 0))
        saved = self.memory.backing.saved_vcpu(vcpu_id)
        log.info("vcpu_connect", guest_pid=msg.pid, kind=msg.kind, transport=msg.transport,
                 restored=saved is not None and saved.boot == boot, assigned=msg.vcpu is None or not msg.boot)
        try:
            self.memory.attach(vcpu_id, ctl.u32)
            self.memory.backing.attach_guest(vcpu_id, peer_pid or 0)
            await conn.start(saved)
            carried = self.carried.pop(vcpu_id, [])
            if msg.kind == "kdump" and carried:  # `no-disable-eat`: a kexec into the crash kernel keeps the vCPU
                conn.apf.adopt(carried)
            if vcpu_id in self.recovery_pins:
                self.memory.unpin(self.recovery_pins.pop(vcpu_id))
            await conn.first_entry()  # a restored vCPU's interrupts come before welcome: pending when it resumes
            await chan.send_with_fds(
                [self.ept.fd, ctl.fd],
                Welcome(proto=PROTOCOL_VERSION, vm=self.config.vm, vcpu=vcpu_id, boot=boot, vcpus=self.config.vcpus,
                        pages=self.config.pages, page_size=self.memory.ram.layout.page_size, shm=self.memory.ram.name,
                        cpuid=ABI_CPUID[self.config.abi]),
            )
            ctl.forget_fd()
            await conn.serve()
        finally:
            conn.reset("vcpu_reset", handover=self.handed_over)
            if self.vcpus.get(vcpu_id) is conn:
                del self.vcpus[vcpu_id]
            log.info("vcpu_handover" if self.handed_over else "vcpu_disconnect")
            conn.done.set()  # only now may a newer boot's connect be logged: the checker reads them in order

    async def _vmm_snapshot(self, chan: MessageChannel, msg: VmmSnapshot) -> None:
        """host_daemon/snapshot.py: pause, save, stop, answer. Refused (fatal error, nothing changed, the guests
        resumed, no file left) if the request is bad, a snapshot is already being taken, or a guest cannot be
        paused."""
        if self.snapshotting or self.handed_over:
            await self._refuse(chan, "snapshot_in_progress", "a snapshot is already being taken")
            return
        self.snapshotting = True
        pids: dict[int, int] = {}
        try:
            if msg.proto != PROTOCOL_VERSION:
                raise SnapshotError(f"protocol {msg.proto} is not {PROTOCOL_VERSION}")
            try:
                msrs = parse_msr_list(msg.msrs)
            except ValueError as exc:
                raise SnapshotError(str(exc)) from None
            directory = check_directory(msg.directory)
            cfg = self.config
            pids = await pause(self)
            start_only = {"--recover", "--recover-if-present"}
            args = [w for w in with_(cfg, restore=None).argv()[3:] if w not in start_only]
            manifest = save(self, directory, Manifest(cfg.vm, cfg.pages, cfg.vcpus, cfg.abi, msrs,
                                                      host_args=tuple(args)), msrs, pids)
        except SnapshotError as exc:
            resume(pids.values())
            self.snapshotting = False
            self.log.error("vmm_snapshot_refused", reason=str(exc))
            await self._refuse(chan, "snapshot_failed", str(exc))
            return
        except BaseException:
            resume(pids.values())
            self.snapshotting = False
            raise
        # From here the VM is the snapshot's: nothing more is delivered (VcpuConnection looks at handed_over), the
        # sockets go at once (a restoring host may create them again before this one has ended), and the host stops.
        self.handed_over = True
        self._unlink_sockets()
        self.log.info("vmm_snapshot", directory=str(directory), vcpus=sorted(pids), guest_pids=sorted(pids.values()),
                      msrs=len(msrs))
        self.nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await chan.send(VmmDone(str(directory), len(manifest.vcpu_states)))

    def _check_hello(self, msg: Hello) -> tuple[str, str] | None:
        """Every field of `hello` within its documented range (docs/PROTOCOL.md, section 3)."""
        if msg.proto != PROTOCOL_VERSION:
            return "bad_version", f"protocol {_short(msg.proto)} is not {PROTOCOL_VERSION}"
        try:
            check_vm_id(msg.vm)
        except ValueError:
            return "wrong_vm", f"{_short(msg.vm)} is not a VM id (1-48 characters of [A-Za-z0-9_.-])"
        if msg.vm != self.config.vm:
            return "wrong_vm", f"this host runs VM {self.config.vm!r}, not {msg.vm!r}"
        if msg.transport not in TRANSPORTS:
            return "bad_field", f"transport must be one of {', '.join(TRANSPORTS)}"
        if msg.kind not in ("normal", "kdump"):
            return "bad_field", "kind must be normal or kdump"
        lo, hi = HELLO_RANGES["boot"]
        if not lo <= msg.boot <= hi:
            return "bad_field", f"boot must be {lo}..{hi} (0 asks the host to number the boot)"
        lo, hi = HELLO_RANGES["pid"]
        if not lo <= msg.pid <= hi:
            return "bad_pid", f"pid must be {lo}..{hi}"
        vcpu = msg.vcpu
        if vcpu is None:
            if len(self.vcpus) >= self.config.vcpus:
                return "no_vcpu", f"all {self.config.vcpus} vCPUs are taken"
        elif not 0 <= vcpu < self.config.vcpus:
            return "bad_vcpu", f"vCPU {_short(vcpu)} is not in 0..{self.config.vcpus - 1}"
        elif vcpu in self.vcpus and msg.boot and msg.boot <= self.vcpus[vcpu].boot:
            return "vcpu_busy", f"vCPU {vcpu} is connected (boot {self.vcpus[vcpu].boot})"
        return None

    def _free_vcpu(self) -> int:
        """The lowest free vCPU, preferring those whose guest of a dead host is not awaited any more: a guest that
        may still run on the old EPT keeps its vCPU until it is back or gone (host_daemon/memory.py)."""
        free = set(range(self.config.vcpus)) - self.vcpus.keys()
        return min(free - set(self.memory.awaiting) or free)

    @property
    def stopping(self) -> bool:
        """The daemon is ending (SIGTERM, or a failure): connections end because of the host, not their guests."""
        return self.nursery.cancel_scope.cancel_called

    def _next_boot(self, vcpu: int) -> int:
        """The boot number for a guest that asked the host to count: one more than any boot of this vCPU that
        connected to this host or, after --recover, to the host before it. After BOOT_MAX it wraps to 1."""
        saved = self.memory.backing.saved_vcpu(vcpu)
        last = max(self.last_boot.get(vcpu, 0), saved.boot if saved is not None else 0)
        if last >= BOOT_MAX:
            self.log.warning("boot_numbers_wrapped", vcpu=vcpu, last=last)
            self.last_boot[vcpu] = 0
            return 1
        return last + 1

    def _check_peer(self, peer_pid: int | None, msg: Hello) -> tuple[str, str] | None:
        """The signal transport signals the guest's PID: only if the kernel says that PID is our peer."""
        if msg.transport == "signal" and peer_pid != msg.pid:
            return "bad_pid", f"hello claims pid {msg.pid} but the socket's peer is pid {peer_pid or 'unknown'}"
        return None

    async def _refuse(self, chan: MessageChannel, code: str, message: str) -> None:
        self.log.error("wire_error", code=code, message=message, fatal=True)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await chan.send(ErrorReply(code, message, True))


@dataclass
class _Session:
    vcpu: int | None = None  # the vCPU this connection claimed, once it did


def _peer_pid(chan: MessageChannel) -> int | None:
    """The socket peer's PID as the kernel saw it (SO_PEERCRED); None if it is not visible from our PID namespace."""
    stream = chan.stream
    assert isinstance(stream, trio.SocketStream)
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None


def _short(value: Any) -> str:
    """A value from the wire, for an error message: repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _only_disconnects(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_disconnects(e) for e in exc.exceptions)
    return isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError))


async def serve(config: HostOptions, restored: list[VcpuState] | None = None) -> None:
    """Run the VM; `restored`: the vCPUs of a restored snapshot, whose paused guests are resumed once the host
    listens."""
    vm = Vm(config)
    vm.restored = list(restored or [])
    await vm.run()
