# `apf-emu run`: the native topology. Starts one host daemon and N guest agents as real processes, stops them in
# order at --duration or on SIGINT/SIGTERM, and leaves nothing behind: no child process, no socket, no shm segment.
#
# Order matters. Guests stop first (SIGTERM: they drain their sleeping tasks and disable APF, so every wait is
# woken); then the host (SIGTERM: closes connections, unlinks the socket and guest RAM). Whatever does not stop
# within its grace period is SIGKILLed, and the runner then removes what a killed host could not.
# Children run in their own sessions, so a terminal's Ctrl-C reaches only the runner, which does the above.
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

from shared.config import GuestOptions, HostOptions, with_
from shared.guest_ram import unlink, vm_shm_names

GUEST_GRACE_S = 15.0
HOST_GRACE_S = 10.0


@dataclass(frozen=True)
class RunOptions:
    """A native run: the host's options, the options every guest shares (each gets its own vCPU), and the run's
    own. vm, socket and log_dir of `host` and `guest` are filled in by `run`."""

    host: HostOptions = field(default_factory=HostOptions)
    guest: GuestOptions = field(default_factory=GuestOptions)
    duration: float = 10.0
    log_dir: Path | None = None
    vm: str | None = None


@dataclass
class RunResult:
    vm: str
    log_dir: Path
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    stopped_by: str = "duration"
    unexpected_exits: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


def prepare(opts: RunOptions, prefix: str) -> tuple[str, Path, Path, Path]:
    """The run's VM id, log directory (emptied of earlier logs of the same names), and socket in a fresh
    temporary directory."""
    vm = opts.vm or f"{prefix}{os.getpid()}"
    log_dir = opts.log_dir or Path("apf-emu-logs") / vm
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in list(log_dir.glob("host.jsonl")) + list(log_dir.glob("guest-*.jsonl")):
        old.unlink()  # a run's directory holds that run's logs only
    tmp = Path(tempfile.mkdtemp(prefix="apf-emu-"))
    return vm, log_dir, tmp, tmp / "host.sock"


async def run(opts: RunOptions) -> RunResult:
    vm, log_dir, tmp, sock = prepare(opts, "run")
    result = RunResult(vm, log_dir)
    place = {"vm": vm, "socket": sock, "log_dir": log_dir}
    host = with_(opts.host, **place)
    guest = with_(opts.guest, **place, seed=opts.host.seed, log_stdout=opts.host.log_stdout)
    procs: dict[str, trio.Process] = {}
    try:
        procs["host"] = await trio.lowlevel.open_process(host.argv(), start_new_session=True)
        for i in range(host.vcpus):
            procs[f"guest-{i}"] = await trio.lowlevel.open_process(with_(guest, vcpu=i).argv(),
                                                                    start_new_session=True)
        await _wait_for_stop(opts.duration, procs, result)
    finally:
        with trio.CancelScope(shield=True):
            await _stop(procs, result)
            result.leftovers += remove_leftovers(vm, tmp, sock, "the runner")
    return result


def remove_leftovers(vm: str, tmp: Path, sock: Path, remover: str) -> list[str]:
    """Remove what a host that could not clean up left (its shm objects, its socket in `tmp`); say what it was."""
    found = [f"shm {name} (removed by {remover})" for name in vm_shm_names(vm) if unlink(name)]
    if sock.exists():
        found.append(f"socket {sock} (removed by {remover})")
    shutil.rmtree(tmp, ignore_errors=True)
    return found


async def _wait_for_stop(duration: float, procs: dict[str, trio.Process], result: RunResult) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    result.stopped_by = signal.Signals(signum).name
                    nursery.cancel_scope.cancel()
                    return

            async def on_exit(name: str, proc: trio.Process) -> None:
                await proc.wait()
                result.unexpected_exits.append(f"{name} exited early with status {proc.returncode}")
                result.stopped_by = f"{name} exit"
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            for name, proc in procs.items():
                nursery.start_soon(on_exit, name, proc)
            await trio.sleep(duration)
            nursery.cancel_scope.cancel()


async def _stop(procs: dict[str, trio.Process], result: RunResult) -> None:
    guests = {n: p for n, p in procs.items() if n != "host"}
    await terminate(guests, GUEST_GRACE_S, result.exit_codes, result.unexpected_exits)
    if "host" in procs:
        await terminate({"host": procs["host"]}, HOST_GRACE_S, result.exit_codes, result.unexpected_exits)


async def terminate(procs: dict[str, trio.Process], grace: float, exit_codes: dict[str, int | None],
                    problems: list[str]) -> None:
    """SIGTERM each process, wait up to `grace`, SIGKILL what is left; record exit statuses and problems."""
    for proc in procs.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    async with trio.open_nursery() as nursery:
        for name, proc in procs.items():
            nursery.start_soon(_reap, name, proc, grace, exit_codes, problems)


async def _reap(name: str, proc: trio.Process, grace: float, exit_codes: dict[str, int | None],
                problems: list[str]) -> None:
    with trio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        problems.append(f"{name} did not stop within {grace} s and was killed")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    exit_codes[name] = proc.returncode
