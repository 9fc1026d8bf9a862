"""The cost of each step of an APF cycle against a real host daemon, per transport, in the same run as the floor.

The benchmark process is the guest of one vCPU, instrumented: it faults on a swapped-out page and times
  not_present  exit_mem sent -> #PF received (the injection: a frame, or SIGRTMIN and CR2 in the control block)
  ready        the host's kvm_async_pf_completed (its log's mono_ns, the same CLOCK_MONOTONIC) -> page-ready
               interrupt received (a frame, or the vector's signal)
  ack          MSR_KVM_ASYNC_PF_ACK written -> msr_result received
with page-in latency 0, so that what is measured is the protocol and the transport, not the page-in. The host
logs to a file exactly as in a normal run: logging is part of the cost. The guest side does no logging.

Usage: python -m bench.apf_cycle [--cycles N] [--transport socket|signal] [--profile FILE [--profiler P]]
  --profile runs the host under a profiler and writes what it finds to FILE (where the host's time goes):
  pyinstrument (a text call tree; pip install pyinstrument, or '.[bench]') or cProfile (pstats data, and the top
  20 functions printed).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

from shared.abi import (
    APIC_SPIV_APIC_ENABLED,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_X2APIC_SPIV,
    SPURIOUS_APIC_VECTOR,
    async_pf_en_value,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.blocking_channel import BlockingChannel, connect
from shared.config import HostOptions, PageInLatency, daemon_env
from shared.guest_ram import GuestRam, RamLayout
from shared.signals import SIG_PF, vector_signal
from shared.views import CTL_CR2, CTL_PF_SEQ, GuestViews
from shared.wire import (
    PROTOCOL_VERSION,
    ExitMem,
    Hello,
    InjectException,
    Interrupt,
    Message,
    MsrResult,
    MsrWrite,
    Resume,
    Welcome,
)

from .floor import histogram

ROOT = Path(__file__).resolve().parents[1]
PAGES, RESIDENT, VECTOR = 256, 32, 0xF3
STEPS = ("not_present", "ready", "ack")
SIGNALS = frozenset({SIG_PF, vector_signal(VECTOR)})  # the signal transport's: blocked, taken with sigtimedwait
WARMUP = 200  # cycles not counted: the first ones pay for imports, caches and the allocator


@dataclass
class CycleResult:
    hist: dict[str, HdrHistogram]
    cycles: int
    resumed: int  # exits that found the page resident (no APF): not counted

    def p50_us(self, step: str) -> float:
        return float(self.hist[step].get_value_at_percentile(50)) / 1000

    def summary(self) -> dict[str, Any]:
        return {step: {"p50_us": self.p50_us(step),
                       "p99_us": self.hist[step].get_value_at_percentile(99) / 1000,
                       "n": self.hist[step].get_total_count()} for step in self.hist}


class Guest:
    """One vCPU's guest side, blocking, with exact timestamps."""

    def __init__(self, path: Path, vm: str, transport: str, ram: GuestRam) -> None:
        self.transport = transport
        sock = connect(path, 10)  # a host that has bound its socket may not listen yet
        sock.settimeout(10)
        self.chan = BlockingChannel(sock)
        self.sock = sock
        self.frames = self.chan.frames
        self.area = KvmVcpuPvApfData(ram.u32, 0)
        self.views: GuestViews | None = None
        if transport == "signal":
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            welcome = self.request(Hello(PROTOCOL_VERSION, vm, 0, 1, "normal", os.getpid(), transport))
            assert isinstance(welcome, Welcome), welcome
            self.views = GuestViews(self.chan.take_fds(), PAGES)
        except BaseException:
            self.close()
            raise
        self.u32 = self.views.ctl.u32
        self.seen_pf = self.u32[CTL_PF_SEQ]

    def close(self) -> None:
        self.area.release()
        if self.views is not None:
            self.views.close()
        self.chan.close()
        if self.transport == "signal":
            # A signal still queued (a #PF that came after its pf_seq was seen) would kill us once unblocked: it has
            # no handler. Take them first.
            while signal.sigtimedwait(SIGNALS, 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def send(self, msg: Message) -> None:
        self.chan.send(msg)

    def frame(self) -> Message:
        msg: Message | None = self.chan.receive()
        assert msg is not None
        return msg

    def request(self, msg: Message) -> Message:
        self.send(msg)
        return self.frame()

    def wrmsr(self, msr: int, value: int) -> None:
        result = self.request(MsrWrite(msr, value))
        assert isinstance(result, MsrResult) and result.ok, result

    def interrupt(self) -> None:
        if self.transport == "socket":
            msg = self.frame()
            assert isinstance(msg, Interrupt) and msg.vector == VECTOR, msg
        elif signal.sigtimedwait({vector_signal(VECTOR)}, 10) is None:
            raise RuntimeError("no page-ready signal within 10 s")

    def exit_mem(self, gfn: int) -> int | None:
        """The exit; the token of the #PF it got, or None if the host resumed the vCPU (no APF)."""
        self.send(ExitMem(gfn * 4096, True, True, True))
        if self.transport == "socket":
            msg = self.frame()
            return msg.cr2 if isinstance(msg, InjectException) else None
        while True:
            if self.u32[CTL_PF_SEQ] != self.seen_pf:
                self.seen_pf = self.u32[CTL_PF_SEQ]
                return int(self.u32[CTL_CR2])
            if self.frames or _readable(self.sock):
                msg = self.frame()
                assert isinstance(msg, Resume), msg
                return None
            signal.sigtimedwait({SIG_PF}, 0.001)

    def enable(self) -> None:
        """As Linux boots: the LAPIC software-enabled, then MSR_KVM_ASYNC_PF_INT and _EN; the wake-all that
        enabling queues is raised at the end of that exit, before its result."""
        self.wrmsr(MSR_X2APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR)
        self.wrmsr(MSR_KVM_ASYNC_PF_INT, VECTOR)
        self.send(MsrWrite(MSR_KVM_ASYNC_PF_EN, async_pf_en_value(0)))
        if self.transport == "socket":
            self.interrupt()
            result = self.frame()
        else:
            result = self.frame()
            self.interrupt()
        assert isinstance(result, MsrResult) and result.ok, result
        self.area.token = 0
        self.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1)


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def measure(transport: str, cycles: int = 2000, profile: Path | None = None,
            profiler: str = "pyinstrument") -> CycleResult:
    vm = f"bench{os.getpid()}{transport[:3]}"
    with tempfile.TemporaryDirectory(prefix="apf-cycle-") as tmp:
        sock = Path(tmp) / "host.sock"
        command = HostOptions(vm=vm, socket=sock, vcpus=1, pages=PAGES, resident=RESIDENT,
                              page_in_latency=PageInLatency.parse("0"), log_dir=Path(tmp)).argv()
        python, module_flag, rest = command[0], command[1], command[2:]  # python -m host_daemon ...
        if profile and profiler == "pyinstrument":
            command = [python, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(profile), module_flag, *rest]
        elif profile:
            command = [python, "-m", "cProfile", "-o", str(profile), module_flag, *rest]
        host = subprocess.Popen(command, cwd=ROOT, env=daemon_env())
        try:
            result = cycles_against(host, sock, vm, transport, cycles, Path(tmp) / "host.jsonl", "the host daemon",
                                    before_log=lambda: _stop(host))
        finally:
            _stop(host)
    return result


def cycles_against(host: subprocess.Popen[bytes], sock: Path, vm: str, transport: str, cycles: int, log: Path,
                   what: str, before_log: Callable[[], None] | None = None) -> CycleResult:
    """Once `host` listens on `sock`: a guest of vCPU 0 that enables APF and runs the cycles (run_cycles)."""
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline or host.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)
    ram = GuestRam.open(vm, RamLayout(PAGES))
    try:
        guest = Guest(sock, vm, transport, ram)
        try:
            guest.enable()
            return run_cycles(guest, cycles, WARMUP, log, before_log)
        finally:
            guest.close()
    finally:
        ram.close()


def _stop(host: subprocess.Popen[bytes]) -> None:
    if host.poll() is None:
        host.send_signal(signal.SIGTERM)
    try:
        host.wait(30)
    except subprocess.TimeoutExpired:
        host.kill()
        host.wait()


def run_cycles(guest: Guest, cycles: int, warmup: int, log: Path,
               before_log: Callable[[], None] | None = None) -> CycleResult:
    """APF cycles on swapped-out pages, round robin, each step timed by the guest; `ready` from the host's log
    (`before_log` is called first: a host that must end before its log is whole). The same loop for the emulator
    and for the protocol floor (bench/protocol_floor.py), so that only the host differs."""
    hist = {step: histogram() for step in (*STEPS, "cycle")}
    received: dict[int, int] = {}  # token -> ns the page-ready arrived
    resumed = 0
    gfn = 0
    for i in range(cycles + warmup):
        gfn = gfn % (PAGES - 1) + 1  # round robin over more pages than are resident: each is out
        t0 = time.monotonic_ns()
        token = guest.exit_mem(gfn)
        t1 = time.monotonic_ns()
        if token is None:
            resumed += 1
            continue
        assert guest.area.read_and_reset_flags() == 1
        guest.interrupt()
        t2 = time.monotonic_ns()
        assert guest.area.token == token
        guest.area.token = 0
        t3 = time.monotonic_ns()
        guest.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1)
        t4 = time.monotonic_ns()
        if i < warmup:
            continue
        received[token] = t2
        hist["not_present"].record_value(t1 - t0)
        hist["ack"].record_value(t4 - t3)
        hist["cycle"].record_value(t4 - t0)
    if before_log is not None:
        before_log()
    for line in log.read_bytes().splitlines():
        if b"kvm_async_pf_completed" in line:
            ev = orjson.loads(line)
            at = received.get(ev["token"])
            if at is not None:
                hist["ready"].record_value(max(1, at - ev["mono_ns"]))
    return CycleResult(hist, cycles, resumed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=2000)
    p.add_argument("--transport", choices=["socket", "signal"], default=None, help="default: both")
    p.add_argument("--profile", type=Path, default=None, metavar="FILE")
    p.add_argument("--profiler", choices=["pyinstrument", "cprofile"], default="pyinstrument")
    args = p.parse_args()
    for transport in [args.transport] if args.transport else ["socket", "signal"]:
        r = measure(transport, args.cycles, args.profile, args.profiler)
        steps = "  ".join(f"{s} p50 {r.p50_us(s):6.1f} us" for s in (*STEPS, "cycle"))
        print(f"{transport:7} {steps}  (cycles {r.cycles}, resumed {r.resumed})")
    if args.profile and args.profiler == "cprofile":
        import pstats

        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
