# How the guest's VM exits reach the host, and how exceptions and interrupts reach the guest: what every transport
# shares (this module's `Transport`); each backend (guest_agent/transports/<name>.py) subclasses it to say how the
# host gets *into* the guest.
#
# All transports keep the Unix socket for what needs a reply (handshake, wrmsr, rdmsr, the EPT-violation exit). The
# guest is single-threaded and blocking, like a vCPU: an exit blocks until the host answers, and the answer is a
# typed message from shared/wire.py (MsrResult; InjectException or Resume for an exit; ErrorReply), whichever
# transport carried it. A self-pipe (signal.set_wakeup_fd) wakes a halted vCPU when a signal arrives, SIGTERM too.
#
# If the host goes away (killed, restarting with --recover), the guest keeps its state and reconnects with the same
# hello (same boot) for up to `reconnect_timeout` seconds. The exit it was in then ends as KVM's would after the VMM
# came back: an MSR access is performed again (the instruction is re-executed), an EPT-violation exit ends with
# Resume (the vCPU re-enters, takes what is pending, the restarted host's wake-all among it, and retries the access).
# A restored vCPU's first entry comes before `welcome`: the interrupts it raised (frames before `welcome`, or counters
# in the new control block) are pending before the guest runs again. The new `welcome` brings a new EPT and control
# block: `on_welcome` hands them to the kernel before anything runs.
from __future__ import annotations

import math
import os
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from shared.blocking_channel import BlockingChannel, ChannelClosed, NoHost, connect
from shared.wire import (
    ErrorReply,
    ExitHlt,
    ExitMem,
    ExitTimer,
    Hello,
    InjectException,
    Interrupt,
    Message,
    MsrRead,
    MsrResult,
    MsrWrite,
    Resume,
    Welcome,
    WireError,
)

from ..cpu import Cpu


class GuestError(Exception):
    """The guest cannot go on (host refused it, went away for good, or broke the protocol)."""


class HostGone(GuestError):
    """The connection to the host ended."""


ExitReply = InjectException | Resume | ErrorReply
MsrReply = MsrResult | ErrorReply
R = TypeVar("R")


class Transport:
    name = "base"

    def __init__(self, path: Path, connect_timeout: float, reconnect_timeout: float = 30.0) -> None:
        self.path = path
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self.on_reconnect: Callable[[int, float], None] | None = None
        self.give_up: Callable[[], bool] = lambda: False  # e.g. the guest is stopping: do not wait for a host
        # After a reconnect: the new welcome and its file descriptors (the kernel maps them, then `attach_ctl`).
        self.on_lost_exit: Callable[[], None] | None = None  # an exit whose reply died with the host
        self.on_welcome: Callable[[Welcome, list[int]], None] | None = None
        self._hello: Hello | None = None
        self.chan = BlockingChannel(_connect(path, connect_timeout))
        self.cpu: Cpu | None = None
        self._early: list[Interrupt] = []  # interrupt frames that came before welcome, for a cpu not yet attached
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    # --- what a backend decides ----------------------------------------------------------------------------------
    def _interrupt_frame(self, msg: Interrupt) -> None:
        """An `interrupt` frame arrived."""
        raise GuestError(f"the host sent an interrupt frame on the {self.name} transport")

    def _exit_reply(self) -> ExitReply:
        """The reply to the EPT-violation exit just sent."""
        reply: ExitReply = self._reply(InjectException, Resume)
        return reply

    def attach(self, cpu: Cpu, ctl: memoryview) -> None:
        """Start delivering to `cpu`; `ctl` is the control block of this connection (`attach_ctl` for the next)."""
        self.cpu = cpu
        self._take_early()

    def _take_early(self) -> None:
        early, self._early = self._early, []
        for msg in early:
            self._interrupt_frame(msg)

    def attach_ctl(self, ctl: memoryview) -> None:
        return None

    # --- framing -------------------------------------------------------------------------------------------------
    @property
    def sock(self) -> socket.socket:
        return self.chan.sock

    @property
    def frames(self) -> deque[bytes]:
        return self.chan.frames

    def send(self, msg: Message) -> None:
        try:
            self.chan.send(msg)
        except ChannelClosed as exc:
            raise HostGone(str(exc)) from None

    def _fill(self, *, block: bool) -> bool:
        """Read what the socket has into frames. False if nothing was there (non-blocking)."""
        try:
            return self.chan.fill(block=block)
        except ChannelClosed as exc:
            raise HostGone(f"host went away: {exc}") from None
        except WireError as exc:
            raise GuestError(f"bad frame from host: {exc.message}") from None

    def _next(self, *, block: bool) -> Message | None:
        try:
            msg: Message | None = self.chan.receive(block=block)
        except ChannelClosed as exc:
            raise HostGone(f"host went away: {exc}") from None
        except WireError as exc:
            raise GuestError(f"bad message from host: {exc.message}") from None
        return msg

    def _reply(self, *expected: type[Message]) -> Any:
        """The reply to the one outstanding request: one of `expected`, or a non-fatal error. Interrupts that come
        first stay pending."""
        while True:
            msg = self._next(block=True)
            if isinstance(msg, Interrupt):
                self._interrupt_frame(msg)
                continue
            if isinstance(msg, ErrorReply):
                if msg.fatal:
                    raise GuestError(f"host closed us: {msg.code}: {msg.message}")
                return msg
            if not isinstance(msg, expected):
                raise GuestError(f"expected {' or '.join(c.TYPE for c in expected)} from the host, got "
                                 f"{msg.TYPE if msg is not None else 'nothing'}")
            return msg

    # --- the guest's view ----------------------------------------------------------------------------------------
    def handshake(self, hello: Hello) -> tuple[Welcome, list[int]]:
        """hello -> welcome, and the file descriptors that came with it (the EPT, the control block)."""
        self._early.clear()  # what an earlier attempt got is superseded by this host's first entry
        self.send(hello)
        msg = self._next(block=True)
        while isinstance(msg, Interrupt):  # a restored vCPU's first entry (the restored IRR): pending on resume
            self._early.append(msg)
            msg = self._next(block=True)
        fds = self.chan.take_fds()
        if not isinstance(msg, Welcome):
            for fd in fds:
                os.close(fd)
            if isinstance(msg, ErrorReply):
                raise GuestError(f"host refused us: {msg.code}: {msg.message}")
            raise GuestError(f"expected welcome, got {msg.TYPE if msg is not None else 'nothing'}")
        # A reconnect (after the host went away) claims what this handshake was given: same vCPU, same boot.
        self._hello = Hello(hello.proto, hello.vm, msg.vcpu, msg.boot, hello.kind, hello.pid, hello.transport)
        return msg, fds

    def _reconnect(self) -> None:
        """The host went away: connect again, as the same vCPU and boot, until reconnect_timeout. The vCPU is not
        running meanwhile (the VMM is away): an interrupt arriving now (a vector signal) stays pending, or its
        handler's ACK would be sent in the middle of the handshake."""
        cpu = self.cpu
        if cpu is not None:
            cpu.push("reconnect")
        try:
            self._reconnect_now()
        finally:
            if cpu is not None:
                cpu.pop()

    def _reconnect_now(self) -> None:
        assert self._hello is not None
        start = time.monotonic()
        deadline = start + self.reconnect_timeout
        self.chan.close()
        while True:
            if self.give_up():
                raise GuestError("the host went away while the guest was stopping")
            try:
                self.chan = BlockingChannel(_connect(self.path, min(1.0, max(0.0, deadline - time.monotonic()))))
                welcome, fds = self.handshake(self._hello)
                break
            except HostGone:
                pass
            except GuestError as exc:
                if time.monotonic() > deadline:
                    raise
                if "no host listening" in str(exc):
                    continue  # keep trying until the deadline, looking at give_up every second
                if "vcpu_busy" not in str(exc):
                    raise
            self.chan.close()
            time.sleep(0.05)  # the host has not noticed our old connection's end yet
        if self.on_welcome is not None:
            self.on_welcome(welcome, fds)
        else:
            for fd in fds:
                os.close(fd)
        if self.cpu is not None:
            self._take_early()
        self.reconnects += 1
        if self.on_reconnect is not None:
            self.on_reconnect(self.reconnects, time.monotonic() - start)

    def _msr(self, msg: MsrWrite | MsrRead) -> MsrReply:
        """An MSR access; if the host goes away meanwhile, reconnect and perform it again."""
        while True:
            try:
                self.send(msg)
                reply: MsrReply = self._reply(MsrResult)
                return reply
            except HostGone:
                self._reconnect()

    def wrmsr(self, msr: int, value: int) -> MsrReply:
        return self._msr(MsrWrite(msr, value))

    def rdmsr(self, msr: int) -> MsrReply:
        return self._msr(MsrRead(msr))

    def exit_mem(self, gpa: int, *, write: bool, user: bool, irq: bool) -> ExitReply:
        """The EPT-violation exit. If the host goes away meanwhile: reconnect, and the exit ends with Resume."""
        return self._exit(ExitMem(gpa, write, user, irq), gpa)

    def hlt_exit(self, timeout: float) -> ExitReply:
        """HLT with interrupts on, as an exit (the `pf` ABI's idle: its page-ready is an exception, which only an
        entry injects): until the host has an event for this vCPU, or `timeout` seconds (inf: none)."""
        us = 0 if math.isinf(timeout) else max(1, min(int(timeout * 1e6), 3_600_000_000))
        return self._exit(ExitHlt(us), 0)

    def timer_exit(self, *, user: bool, irq: bool) -> ExitReply:
        """The exit of a timer tick while the guest runs (the `pf` ABI's chance of a page-ready)."""
        return self._exit(ExitTimer(user, irq), 0)

    def _exit(self, msg: ExitMem | ExitHlt | ExitTimer, gpa: int) -> ExitReply:
        try:
            self.send(msg)
            return self._exit_reply()
        except HostGone:
            self._reconnect()
            if self.on_lost_exit is not None:
                self.on_lost_exit()
            return Resume(gpa)

    def poll(self) -> int:
        """At an instruction boundary: pick up interrupts that arrived as frames. Returns how many."""
        try:
            return self._poll()
        except HostGone:
            self._reconnect()
            return 1  # not an interrupt, but the caller must look again: the new host may have sent a wake-all

    def _poll(self) -> int:
        n = 0
        while (msg := self._next(block=False)) is not None:
            if not isinstance(msg, Interrupt):
                raise GuestError(f"unexpected {msg.TYPE} from host with no request outstanding")
            self._interrupt_frame(msg)
            n += 1
        return n

    def halt(self, timeout: float) -> None:
        """hlt: sleep until an interrupt (frame or signal) or `timeout`. An interrupt already there ends it at
        once: its handler may have made a task runnable."""
        if self.poll() or (self.cpu is not None and self.cpu.pending):
            return
        wait = None if math.isinf(timeout) else max(0.0, timeout)
        readable, _, _ = select.select([self.sock, self._wake_r], [], [], wait)
        self._drain_wakeup()
        if self.sock in readable:
            self.poll()

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        self.chan.close()
        for s in (self._wake_r, self._wake_w):
            s.close()


def _connect(path: Path, timeout: float) -> socket.socket:
    try:
        return connect(path, timeout)
    except NoHost as exc:
        raise GuestError(str(exc)) from None
