# How the guest's VM exits reach the host and how exceptions and interrupts reach the guest: the two transports.
#
# Both keep the Unix socket for what needs a reply (handshake, wrmsr, the EPT-violation exit) and differ in how the
# host gets *into* the guest:
# - socket: `inject_pf` and `interrupt` are frames. The guest reads them while it waits for a reply (they are then
#   pending until the exit ends) and, between instructions, with a non-blocking read (`poll`).
# - signal: #PF injection and interrupts are POSIX real-time signals (shared/signals.py); CR2 and the raised
#   vectors are in the vCPU's control block (shared/views.py), written before the signal. A Python signal handler
#   runs between any two bytecodes of the guest, so an interrupt really can arrive anywhere; the Cpu decides
#   whether it is taken or stays pending. The host only signals the PID that connected (checked with SO_PEERCRED)
#   through a pidfd, so a recycled PID is never signalled.
# The guest is single-threaded and blocking, like a vCPU: an exit blocks until the host answers. A self-pipe
# (signal.set_wakeup_fd) wakes a halted vCPU when a signal arrives, including SIGTERM.
#
# If the host goes away (killed, restarting with --recover), the guest keeps its state, reconnects with the same
# hello (same boot) for up to `reconnect_timeout` seconds, and retries the exit it was in: the restarted host
# restores the vCPU's registers and sends a wake-all for the events that died with its predecessor. Its `welcome`
# brings a new EPT and control block: `on_welcome` hands them to the kernel before anything else runs.
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
from types import FrameType
from typing import Any

from shared.blocking_channel import BlockingChannel, ChannelClosed, NoHost, connect
from shared.signals import SIG_PF, interrupt_signals, signal_vectors
from shared.views import CTL_CR2, CTL_IRR, CTL_PF_SEQ
from shared.wire import Message, WireError

from .cpu import Cpu


class GuestError(Exception):
    """The guest cannot go on (host refused it, went away for good, or broke the protocol)."""


class HostGone(GuestError):
    """The connection to the host ended."""


class Transport:
    name = "socket"

    def __init__(self, path: Path, connect_timeout: float, reconnect_timeout: float = 30.0) -> None:
        self.path = path
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self.on_reconnect: Callable[[int, float], None] | None = None
        self.give_up: Callable[[], bool] = lambda: False  # e.g. the guest is stopping: do not wait for a host
        # After a reconnect: the new welcome and its file descriptors (the kernel maps them, then `attach_ctl`).
        self.on_welcome: Callable[[Message, list[int]], None] | None = None
        self._hello: dict[str, Any] = {}
        self.chan = BlockingChannel(_connect(path, connect_timeout))
        self.cpu: Cpu | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    # --- framing -------------------------------------------------------------------------------------------------
    @property
    def sock(self) -> socket.socket:
        return self.chan.sock

    @property
    def frames(self) -> deque[bytes]:
        return self.chan.frames

    def send(self, msg_type: str, **fields: Any) -> None:
        try:
            self.chan.send(msg_type, **fields)
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
            return self.chan.receive(block=block)
        except ChannelClosed as exc:
            raise HostGone(f"host went away: {exc}") from None
        except WireError as exc:
            raise GuestError(f"bad message from host: {exc.message}") from None

    def _reply(self) -> Message:
        """The reply to the one outstanding request; interrupts that come first stay pending."""
        while True:
            msg = self._next(block=True)
            assert msg is not None
            if msg["t"] == "interrupt":
                self._interrupt_frame(msg)
                continue
            if msg["t"] == "error" and msg["fatal"]:
                raise GuestError(f"host closed us: {msg['code']}: {msg['message']}")
            return msg

    def _interrupt_frame(self, msg: Message) -> None:
        assert self.cpu is not None
        self.cpu.raise_irq(msg["vector"])

    # --- the guest's view ----------------------------------------------------------------------------------------
    def handshake(self, **hello: Any) -> tuple[Message, list[int]]:
        """hello -> welcome, and the file descriptors that came with it (the EPT, the control block)."""
        self._hello = dict(hello, transport=self.name)
        self.send("hello", **self._hello)
        msg = self._next(block=True)
        assert msg is not None
        fds = self.chan.take_fds()
        if msg["t"] != "welcome":
            for fd in fds:
                os.close(fd)
            if msg["t"] == "error":
                raise GuestError(f"host refused us: {msg['code']}: {msg['message']}")
            raise GuestError(f"expected welcome, got {msg['t']}")
        # A reconnect (after the host went away) claims what this handshake was given: same vCPU, same boot.
        self._hello.update(vcpu=msg["vcpu"], boot=msg["boot"])
        return msg, fds

    def _reconnect(self) -> None:
        """The host went away: connect again, as the same vCPU and boot, until reconnect_timeout. The vCPU is not
        running meanwhile (the VMM is away): an interrupt arriving now (a vector signal) stays pending, or its
        handler's ACK would be sent in the middle of the handshake."""
        if self.cpu is None:
            self._reconnect_now()
            return
        self.cpu.push("reconnect")
        try:
            self._reconnect_now()
        finally:
            self.cpu.pop()

    def _reconnect_now(self) -> None:
        start = time.monotonic()
        deadline = start + self.reconnect_timeout
        self.chan.close()
        while True:
            if self.give_up():
                raise GuestError("the host went away while the guest was stopping")
            try:
                self.chan = BlockingChannel(_connect(self.path, min(1.0, max(0.0, deadline - time.monotonic()))))
                welcome, fds = self.handshake(**{k: v for k, v in self._hello.items() if k != "transport"})
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
        self.reconnects += 1
        if self.on_reconnect is not None:
            self.on_reconnect(self.reconnects, time.monotonic() - start)

    def _retrying(self, attempt: Callable[[], Message]) -> Message:
        """Run a request; if the host goes away meanwhile, reconnect and run it again (the exit is retried)."""
        while True:
            try:
                return attempt()
            except HostGone:
                self._reconnect()

    def attach(self, cpu: Cpu, ctl: memoryview) -> None:
        """Start delivering to `cpu`; `ctl` is the control block of this connection (`attach_ctl` for the next)."""
        self.cpu = cpu

    def attach_ctl(self, ctl: memoryview) -> None:
        return None

    def wrmsr(self, msr: int, value: int) -> Message:
        def attempt() -> Message:
            self.send("msr_write", msr=msr, value=value)
            return self._reply()

        return self._retrying(attempt)

    def exit_mem(self, gpa: int, *, write: bool, user: bool, irq: bool) -> Message:
        def attempt() -> Message:
            self.send("exit_mem", gpa=gpa, write=write, user=user, irq=irq)
            return self._reply()

        return self._retrying(attempt)

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
            if msg["t"] != "interrupt":
                raise GuestError(f"unexpected {msg['t']} from host with no request outstanding")
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


class SignalTransport(Transport):
    name = "signal"

    def __init__(self, path: Path, connect_timeout: float, reconnect_timeout: float = 30.0) -> None:
        # Handlers first: the default action of a real-time signal is to terminate, and a restored vCPU may be
        # signalled as soon as the host has sent `welcome`. Until `attach`, a vector signal only leaves its counter
        # raised; attach_ctl looks at every counter.
        self.irr: IrrReader | None = None
        signal.signal(SIG_PF, _ignore)  # the self-pipe wakes the exit wait; pf_seq says what happened
        for signum in interrupt_signals():
            signal.signal(signum, self._on_vector_signal)
        super().__init__(path, connect_timeout, reconnect_timeout)

    def attach(self, cpu: Cpu, ctl: memoryview) -> None:
        super().attach(cpu, ctl)
        cpu.probe = self._probe
        self.attach_ctl(ctl)

    def attach_ctl(self, ctl: memoryview) -> None:
        """A control block fresh from the host: every counter starts at 0, so a raise that came before we looked
        (a restored vCPU's wake-all) shows as a counter above 0. Runs with no vector signal able to see a half-made
        IrrReader: the handler reads `self.irr` once."""
        self.u32 = ctl
        self._pf_seen = 0
        self.irr = IrrReader(ctl, CTL_IRR, baseline=0)
        # A signal that came before this block was attached was read against the old one: look at every vector.
        for signum in interrupt_signals():
            self._on_vector_signal(signum, None)

    def _probe(self) -> str | None:
        # A #PF injected but not yet taken: an interrupt arriving now arrived "between the #PF and reading flags".
        return "pf_injected" if self.u32[CTL_PF_SEQ] != self._pf_seen else None

    def _on_vector_signal(self, signum: int, _frame: FrameType | None) -> None:
        irr, cpu = self.irr, self.cpu
        if irr is None or cpu is None:
            return
        for vector in irr.raised(signum):
            cpu.raise_irq(vector)

    def _interrupt_frame(self, msg: Message) -> None:
        raise GuestError("the host sent an interrupt frame on the signal transport")

    def exit_mem(self, gpa: int, *, write: bool, user: bool, irq: bool) -> Message:
        def attempt() -> Message:
            self.send("exit_mem", gpa=gpa, write=write, user=user, irq=irq)
            while True:
                seq = self.u32[CTL_PF_SEQ]
                if seq != self._pf_seen:  # the reply was a #PF (signal): CR2 was written before pf_seq
                    self._pf_seen = seq
                    return {"t": "inject_pf", "cr2": int(self.u32[CTL_CR2])}
                if self.frames:
                    return self._reply()
                readable, _, _ = select.select([self.sock, self._wake_r], [], [])
                self._drain_wakeup()
                if self.sock in readable:
                    self._fill(block=True)

        return self._retrying(attempt)

    def _poll(self) -> int:
        if self.frames or _readable(self.sock):
            self._fill(block=False)  # only an end of connection (or a protocol error) can be there
        return 0  # interrupts arrive by signal

    def close(self) -> None:
        for signum in [SIG_PF, *interrupt_signals()]:
            signal.signal(signum, signal.SIG_IGN)
        super().close()


class IrrReader:
    """Which vectors a vector signal stands for: those whose raise counter moved since the last look.

    However many signals were merged into one handler call, each raised vector is seen; a vector raised several
    times while pending is seen once, as the IRR holds one bit per vector.
    """

    def __init__(self, u32: memoryview, irr0: int, baseline: int | None = None) -> None:
        """`baseline`: the value every counter had when we started looking (None: whatever they hold now)."""
        self.u32 = u32
        self.irr0 = irr0
        self.seen = list(u32[irr0 : irr0 + 256]) if baseline is None else [baseline] * 256

    def raised(self, signum: int) -> list[int]:
        out = []
        for vector in signal_vectors(signum):
            count = self.u32[self.irr0 + vector]
            if count != self.seen[vector]:
                self.seen[vector] = count
                out.append(vector)
        return out


def _readable(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    return None


def _connect(path: Path, timeout: float) -> socket.socket:
    try:
        return connect(path, timeout)
    except NoHost as exc:
        raise GuestError(str(exc)) from None


def open_transport(kind: str, path: Path, connect_timeout: float, reconnect_timeout: float = 30.0) -> Transport:
    if kind == "socket":
        return Transport(path, connect_timeout, reconnect_timeout)
    if kind == "signal":
        return SignalTransport(path, connect_timeout, reconnect_timeout)
    raise ValueError(f"unknown transport {kind!r}")
