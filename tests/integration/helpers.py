# Real processes and a blocking wire client for integration tests.
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

from shared import config
from shared.abi import (
    APIC_SPIV_APIC_ENABLED,
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_APF_WAKE_ALL_TOKEN,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_X2APIC_SPIV,
    SPURIOUS_APIC_VECTOR,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.blocking_channel import BlockingChannel, ChannelClosed
from shared.guest_ram import PAGE_SIZE, shm_name
from shared.views import GuestViews
from shared.wire import PROTOCOL_VERSION, ExitMem, Hello, Interrupt, MsrRead, MsrResult, MsrWrite, Welcome

ROOT = Path(__file__).resolve().parents[2]

# Every process a test starts and every VM it names, so that conftest.py can reap what a failing test left.
STARTED: list[subprocess.Popen[bytes]] = []
VMS: set[str] = set()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll a condition (another process's state) until it holds; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append(orjson.loads(line))
    return out


class HostProcess:
    def __init__(self, tmp: Path, vm: str, *args: str) -> None:
        self.vm = vm
        self.socket = tmp / "host.sock"
        self.log_dir = tmp
        self.socket.unlink(missing_ok=True)  # a killed host's: the file appears again once the new host listens
        self.options = config.parse(config.HostOptions, args, vm=vm, socket=self.socket, log_dir=tmp)
        self.proc = subprocess.Popen(self.options.argv(), cwd=ROOT, start_new_session=True)
        STARTED.append(self.proc)
        VMS.add(vm)
        wait_until(lambda: self.proc.poll() is not None or self.socket.exists(), 10, "the host's socket")
        assert self.proc.poll() is None, f"host exited with {self.proc.returncode}"

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.log_dir / "host.jsonl")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def shm_exists(self) -> bool:
        return os.path.exists(f"/dev/shm{shm_name(self.vm)}")


class WireClient:
    """A guest's side of the socket, blocking, for scripted scenarios, speaking the typed messages of shared/wire.py.
    After a successful `hello`, `views` holds the EPT and control block that came with `welcome`."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
        self.chan = BlockingChannel(sock)
        self.views: GuestViews | None = None
        self.interrupts = 0  # interrupt frames `reply` skipped

    @property
    def sock(self) -> socket.socket:
        return self.chan.sock

    def send(self, msg: Any) -> None:
        self.chan.send(msg)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> Any:
        """The next message, or None once the host closed the connection."""
        try:
            return self.chan.receive()
        except ChannelClosed:
            return None

    def request(self, msg: Any) -> Any:
        self.send(msg)
        reply = self.receive()
        assert reply is not None, "host closed the connection"
        return reply

    def reply(self, msg: Any) -> Any:
        """Send a request; return its reply, counting (and dropping) the interrupts that come first."""
        self.send(msg)
        while True:
            got = self.receive()
            assert got is not None, "host closed the connection"
            if not isinstance(got, Interrupt):
                return got
            self.interrupts += 1

    def wrmsr(self, msr: int, value: int) -> MsrResult:
        result = self.reply(MsrWrite(msr, value))
        assert isinstance(result, MsrResult), result
        return result

    def rdmsr(self, msr: int) -> MsrResult:
        result = self.reply(MsrRead(msr))
        assert isinstance(result, MsrResult), result
        return result

    def exit_mem(self, gfn: int, *, user: bool = True, irq: bool = True) -> Any:
        """The EPT-violation exit on `gfn`: InjectException, Resume or ErrorReply (interrupts before it skipped)."""
        return self.reply(ExitMem(gfn * PAGE_SIZE, True, user, irq))

    def hello(self, vm: str, vcpu: int | None = 0, boot: int = 1, **fields: Any) -> Any:
        hello = dict(proto=PROTOCOL_VERSION, vm=vm, vcpu=vcpu, boot=boot, kind="normal", pid=os.getpid(),
                     transport="socket")
        self.send(Hello(**{**hello, **fields}))
        while isinstance(reply := self.receive(), Interrupt):  # a restored vCPU's first entry comes before welcome
            self.interrupts += 1
        assert reply is not None, "host closed the connection"
        fds = self.chan.take_fds()
        if isinstance(reply, Welcome):
            self.views = GuestViews(fds, reply.pages)
        else:
            assert fds == [], "descriptors with a refusal"
        return reply

    def enable_apf(self, area: KvmVcpuPvApfData | None, *, gpa: int = 0, lapic: bool = True) -> None:
        """As Linux boots: the LAPIC software-enabled (unless lapic=False), MSR_KVM_ASYNC_PF_INT, then _EN; the
        wake-all that the enabling exit raises before its result is taken (slot cleared, ACK) if `area` is given."""
        if lapic:
            assert self.wrmsr(MSR_X2APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR).ok
        assert self.wrmsr(MSR_KVM_ASYNC_PF_INT, HYPERVISOR_CALLBACK_VECTOR).ok
        before = self.interrupts
        assert self.wrmsr(MSR_KVM_ASYNC_PF_EN, async_pf_en_value(gpa)).ok
        if area is not None and lapic:
            assert self.interrupts == before + 1, "no wake-all before the enabling write's result"
            assert area.token == KVM_APF_WAKE_ALL_TOKEN
            area.token = 0
            assert self.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1).ok

    def close(self) -> None:
        if self.views is not None:
            self.views.close()
            self.views = None
        self.chan.close()


class GuestProcess:
    def __init__(self, host: HostProcess, vcpu: int, *args: str, boot: int = 1, kind: str = "normal",
                 vcpu_arg: bool = True) -> None:
        """vcpu_arg=False: pass neither --vcpu nor --boot, the host assigns both (`log` is then only a guess)."""
        self.log = host.log_dir / f"guest-{vcpu}.jsonl"
        claim = {"vcpu": vcpu, "boot": boot} if vcpu_arg else {}
        self.options = config.parse(config.GuestOptions, args, vm=host.vm, socket=host.socket,
                                    log_dir=host.log_dir, kind=kind, **claim)
        self.proc = subprocess.Popen(self.options.argv(), cwd=ROOT, start_new_session=True)
        STARTED.append(self.proc)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()


def end_run(guests: list[GuestProcess], host: Any) -> None:
    """The `finally` of a test run: kill what a failure left running, then stop the host, which must stop cleanly."""
    for g in guests:
        if g.proc.poll() is None:
            g.proc.kill()
    assert host.stop() == 0


def reconnect_and_go_on(guests: list[GuestProcess], waits: int) -> None:
    """Each guest reconnects to a new host, then sleeps on `waits` more APFs: the VM goes on."""
    for g in guests:
        wait_for_events(g.log, "guest_reconnect")
    before = {g: count_events(g.log, "guest_apf_wait") for g in guests}
    for g in guests:
        wait_for_events(g.log, "guest_apf_wait", before[g] + waits)


def count_events(path: Path, name: str, **match: Any) -> int:
    return sum(1 for e in read_events(path) if e["event"] == name and all(e.get(k) == v for k, v in match.items()))


def wait_for_events(path: Path, name: str, n: int = 1, timeout: float = 30, **match: Any) -> None:
    wait_until(lambda: count_events(path, name, **match) >= n, timeout, f"{n} x {name} {match or ''} in {path.name}")
