# `apf-emu chaos`: the native topology under a seeded, reproducible schedule of faults, with everything that dies
# brought back, ending with the log checker's verdict.
#
# Faults (all real signals to real processes):
#   guest_kill   SIGKILL a guest: no crash path runs; the host sees the connection end and resets the vCPU; the
#                vCPU comes back as the next boot of a normal kernel
#   guest_panic  SIGUSR1: the guest's crash path disables APF without waiting and exits 70; the vCPU comes back as
#                a kdump kernel (APF on unless --kdump-no-kvmapf), which reboots into a normal kernel after a while
#   host_kill    SIGKILL the host daemon; it is restarted with --recover: guest RAM, swap and vCPU registers
#                survive, guests reconnect, a wake-all replaces the events that died
#   guest_pause / host_pause   SIGSTOP for a while, then SIGCONT
# The schedule is a pure function of the seed, the duration, the vCPU count and the fault counts; it is printed.
from __future__ import annotations

import contextlib
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from shared.config import EXIT_CRASH, EXIT_REBOOT, with_

from . import live, progress
from .checker import DEFAULT_READY_LATENCY_LIMIT_MS
from .runner import (
    HOST_GRACE_S,
    RunOptions,
    prepare,
    remove_leftovers,
    spawn,
    stop_signals_absorbed,
    terminate,
    write_harness_settings,
)

KDUMP_SECONDS = 2.0  # how long a kdump kernel runs before it reboots into a normal kernel
GUEST_STOP_S = 20.0  # a guest's grace period at the end: it drains its sleeping tasks
UP_WAIT_S = 3.0  # how long a fault waits for its target to be (re)started before it is skipped
CHAOS_LATENCY_SLACK_S = 5.0  # the checker's ready-latency bound: the longest pause plus this


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the start
    kind: str
    vcpu: int | None = None
    seconds: float = 0.0  # pause length

    def __str__(self) -> str:
        target = f" vcpu {self.vcpu}" if self.vcpu is not None else ""
        pause = f" for {self.seconds:.2f} s" if self.seconds else ""
        return f"{self.at:7.2f} s  {self.kind}{target}{pause}"


@dataclass(frozen=True)
class ChaosOptions(RunOptions):
    duration: float = 60.0
    guest_kills: int = 10
    guest_panics: int = 3
    host_kills: int = 2
    pauses: int = 5


def make_schedule(seed: int, duration: float, vcpus: int, opts: ChaosOptions) -> list[Fault]:
    rng = random.Random(f"apf-emu-chaos/{seed}")
    faults: list[Fault] = []
    window = (0.1 * duration, 0.8 * duration)
    for kind, count in (("guest_kill", opts.guest_kills), ("guest_panic", opts.guest_panics)):
        faults += [Fault(rng.uniform(*window), kind, rng.randrange(vcpus)) for _ in range(count)]
    # Host kills evenly spread (with jitter), so that each restart has time to settle before the next.
    for i in range(opts.host_kills):
        slot = (window[1] - window[0]) / max(1, opts.host_kills)
        faults.append(Fault(window[0] + slot * i + rng.uniform(0.2, 0.8) * slot, "host_kill"))
    for _ in range(opts.pauses):
        if rng.random() < 0.7:
            faults.append(Fault(rng.uniform(*window), "guest_pause", rng.randrange(vcpus), rng.uniform(0.5, 2.0)))
        else:
            faults.append(Fault(rng.uniform(*window), "host_pause", None, rng.uniform(0.5, 1.5)))
    return sorted(faults, key=lambda f: f.at)


@dataclass
class ChaosResult:
    vm: str
    log_dir: Path
    schedule: list[Fault]
    applied: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    boots: dict[int, list[str]] = field(default_factory=dict)  # vCPU -> kinds of its boots, in order
    host_starts: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    injected: list[Fault] = field(default_factory=list)  # the faults applied, in order (a stop cuts the schedule)
    stopped_by: str = "duration"
    # Panics and kdump reboots that hit a guest before it installed its handlers (Python still starting): the
    # signal's default action killed it, which is a crash without a crash path, like SIGKILL.
    early_signal_deaths: int = 0


class Chaos:
    def __init__(self, opts: ChaosOptions) -> None:
        self.opts = opts
        self.vm, self.log_dir, self.tmp, self.sock = prepare(opts, "chaos")
        place = {"vm": self.vm, "socket": self.sock, "log_dir": self.log_dir}
        self.host_opts = with_(opts.host, **place)
        self.guest_opts = with_(opts.guest, **place, seed=opts.host.seed, log_compress=opts.host.log_compress,
                                abi=opts.host.abi)
        self.stopping = False
        self.host: trio.Process | None = None
        self.guests: dict[int, trio.Process] = {}
        self.host_up = trio.Event()
        schedule = make_schedule(opts.host.seed, opts.duration, opts.host.vcpus, opts)
        # A paused guest cannot free its token slot, and a killed host delivers nothing until it is back: page-ready
        # may legitimately wait that long, so the checker's bound allows for the longest pause plus a host restart.
        longest_pause = max((f.seconds for f in schedule), default=0.0)
        limit = max(DEFAULT_READY_LATENCY_LIMIT_MS, (longest_pause + CHAOS_LATENCY_SLACK_S) * 1000)
        self.result = ChaosResult(self.vm, self.log_dir, schedule)
        write_harness_settings(self.log_dir, self.vm, "chaos", ready_latency_limit_ms=limit,
                               why=f"the longest pause ({longest_pause:.2f} s) plus {CHAOS_LATENCY_SLACK_S:g} s")

    # --- processes -----------------------------------------------------------------------------------------------
    async def _host_loop(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        first = True
        while not self.stopping:
            self.sock.unlink(missing_ok=True)  # the killed host's: from now on the socket file means "listening"
            self.host = await spawn(self._pumps, "host", with_(self.host_opts, recover=not first).argv())
            self.result.host_starts += 1
            await self._wait_for_socket(self.host)
            self.host_up.set()
            if first:
                task_status.started()
                first = False
            await self.host.wait()
            self.host_up = trio.Event()
            if self.stopping:
                break
            if self.host.returncode != -signal.SIGKILL:
                self.result.problems.append(f"host exited with status {self.host.returncode} during the run")
                break

    async def _wait_for_socket(self, proc: trio.Process) -> None:
        # The host renames its socket into place once it listens.
        with trio.move_on_after(10):
            while proc.returncode is None and not self.sock.exists():
                await trio.sleep(0.01)

    async def _guest_loop(self, vcpu: int) -> None:
        async def boot(number: int, kind: str) -> trio.Process:
            guest = with_(self.guest_opts, vcpu=vcpu, boot=number, kind=kind)
            proc = self.guests[vcpu] = await spawn(self._pumps, f"guest-{vcpu}", guest.argv())
            return proc

        await guest_boots(vcpu, boot, lambda: self.stopping, self.result)

    def _guest(self, vcpu: int) -> Target | None:
        return self.guests.get(vcpu)

    async def _guests_started(self) -> None:
        """Before the schedule's clock starts: the guests are this harness's own, started already."""

    # --- faults --------------------------------------------------------------------------------------------------
    async def _inject(self, t0: float) -> None:
        for fault in self.result.schedule:
            await trio.sleep_until(t0 + fault.at)
            if self.stopping:
                return
            target = await self._target(fault)
            if target is None:
                self.result.skipped[fault.kind] += 1
                continue
            self.result.applied[fault.kind] += 1
            self.result.injected.append(fault)
            if fault.kind in ("guest_kill", "host_kill"):
                target.send_signal(signal.SIGKILL)
            elif fault.kind == "guest_panic":
                target.send_signal(signal.SIGUSR1)
            else:
                target.send_signal(signal.SIGSTOP)
                try:
                    await trio.sleep(fault.seconds)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        target.send_signal(signal.SIGCONT)

    async def _target(self, fault: Fault) -> Target | None:
        with trio.move_on_after(UP_WAIT_S):
            while True:
                proc = self.host if fault.vcpu is None else self._guest(fault.vcpu)
                if proc is not None and proc.returncode is None and (fault.vcpu is not None or self.host_up.is_set()):
                    return proc
                await trio.sleep(0.05)
        return None

    # --- the run -------------------------------------------------------------------------------------------------
    async def run(self) -> ChaosResult:
        with progress.status_line() as line:
            async with trio.open_nursery() as pumps:
                self._pumps = pumps
                status = await pumps.start(live.show, self.log_dir, "apf-emu chaos", line) if line.tty \
                    else trio.CancelScope()
                try:
                    await self._run()
                finally:
                    status.cancel()
        return self.result

    async def _run(self) -> None:
        # SIGINT and SIGTERM are the harness's from the start to the end: the first stops the schedule, later ones
        # are ignored, so that the stop and the cleanup always run to their end.
        with stop_signals_absorbed(), trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await self._run_with(signals)

    async def _run_with(self, signals: AsyncIterator[int]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._host_loop)
                for vcpu in range(self.opts.host.vcpus):
                    nursery.start_soon(self._guest_loop, vcpu)
                await self._guests_started()
                with trio.move_on_after(self.opts.duration):
                    async with trio.open_nursery() as inner:
                        inner.start_soon(self._inject, trio.current_time())

                        async def on_signal() -> None:
                            async for signum in signals:
                                self.result.stopped_by = signal.Signals(signum).name
                                inner.cancel_scope.cancel()
                                return

                        inner.start_soon(on_signal)
                        await trio.sleep_forever()
                await self._stop()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _stop(self) -> None:
        """Everything continues (SIGCONT), the host must be up for the guests to drain; then stop as `run` does."""
        self.stopping = True
        for proc in [self.host, *self.guests.values()]:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
        with trio.move_on_after(10):
            await self.host_up.wait()
        await self._stop_guests()
        if self.host is not None:
            await terminate({"host": self.host}, HOST_GRACE_S, self.result.exit_codes, self.result.problems)

    async def _stop_guests(self) -> None:
        live = {f"guest-{v}": p for v, p in self.guests.items() if p.returncode is None}
        await terminate(live, GUEST_STOP_S, self.result.exit_codes, self.result.problems)

    async def _cleanup(self) -> None:
        for proc in [self.host, *self.guests.values()]:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                self.result.leftovers.append(f"process {proc.pid} (killed by the harness)")
        self.result.leftovers += remove_leftovers(self.vm, self.tmp, self.sock, "the harness")


class Target(Protocol):
    """What a fault is sent to: a process the harness started, or one in another container (apf_emu/pod.py)."""

    @property
    def returncode(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


async def guest_boots(vcpu: int, boot: Callable[[int, str], Awaitable[trio.Process]], stopping: Callable[[], bool],
                      result: ChaosResult) -> None:
    """One vCPU's guest, boot after boot until `stopping`: a guest that died comes back as the next boot, of a kdump
    kernel after a panic (EXIT_CRASH), which reboots into a normal kernel after KDUMP_SECONDS (SIGUSR2)."""
    number, kind = 1, "normal"
    result.boots[vcpu] = []
    while not stopping():
        proc = await boot(number, kind)
        result.boots[vcpu].append(kind)
        async with trio.open_nursery() as nursery:
            if kind == "kdump":
                nursery.start_soon(_kdump_reboot, proc)
            await proc.wait()
            nursery.cancel_scope.cancel()
        if stopping():
            break
        code = proc.returncode
        if code in (-signal.SIGUSR1, -signal.SIGUSR2):
            result.early_signal_deaths += 1
        elif code not in (EXIT_CRASH, EXIT_REBOOT, -signal.SIGKILL):
            result.problems.append(f"guest {vcpu} boot {number} exited with status {code}")
        number += 1
        kind = "kdump" if code == EXIT_CRASH else "normal"


async def _kdump_reboot(proc: trio.Process) -> None:
    await trio.sleep(KDUMP_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGUSR2)


async def chaos(opts: ChaosOptions) -> ChaosResult:
    return await Chaos(opts).run()
