# `apf-emu run`: the native topology. Starts one host daemon and N guest agents as real processes, stops them in
# order at --duration or on SIGINT/SIGTERM, and leaves nothing behind: no child process, no socket, no shm segment.
#
# Order matters. Guests stop first (SIGTERM: they drain their sleeping tasks and disable APF, so every wait is
# woken); then the host (SIGTERM: closes connections, unlinks the socket and guest RAM). Whatever does not stop
# within its grace period is SIGKILLed, and the runner then removes what a killed host could not.
# Children run in their own sessions, so a terminal's Ctrl-C reaches only the runner, which does the above. Their
# stderr comes through the runner, a line at a time with the child's name in front, so that two children's lines
# never run together. A child that dies under `run` (killed, crashed) is a failed process: the run stops and says so.
#
# Before it starts anything, the runner writes `harness.jsonl` into the log directory: the settings it judges the
# logs with (the checker's ready-latency limit), so that `apf-emu check` of the same logs gives the same verdict.
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import trio

from shared.config import MAX_SOCKET_PATH, ConfigError, GuestOptions, HostOptions, daemon_env, with_
from shared.guest_ram import unlink, vm_shm_names
from shared.snapshot import DEFAULT_MSR_LIST

from . import live, progress, vmm
from .checker import DEFAULT_READY_LATENCY_LIMIT_MS

# The options `run` and `chaos` hand to the host and to every guest (shared/config.py has their ranges and help).
RUN_HOST = ("vcpus", "pages", "resident", "page_in_latency", "page_in_errors", "seed", "abi", "log_stdout",
            "log_compress", "enforce_pv_cpuid", "no_pending_check", "no_cancel_pending", "bugs")
RUN_GUEST = ("transport", "tasks", "vector", "kernel_ratio", "irq_off_ratio", "shared_ratio", "send_always",
             "entry_fault_ratio", "guest_unmap_ratio", "apf_reinit_every", "online_clears_token")
CHAOS_GUEST = ("transport", "tasks", "vector", "kernel_ratio", "irq_off_ratio", "shared_ratio", "send_always",
               "entry_fault_ratio", "guest_unmap_ratio", "kdump_no_kvmapf")

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
    snapshot_at: float | None = None  # seconds in: `apf-emu snapshot` of the VM, then `apf-emu restore` of it
    snapshot_msrs: str = DEFAULT_MSR_LIST  # the MSR list of that snapshot (shared/snapshot.py)


@dataclass
class RunResult:
    vm: str
    log_dir: Path
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    stopped_by: str = "duration"
    unexpected_exits: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


def check_socket_room() -> None:
    """The run's socket goes into a fresh directory under TMPDIR: say now (ConfigError) if its path would be too
    long for a Unix socket, rather than once the run has started."""
    longest = Path(tempfile.gettempdir()) / ("apf-emu-" + "x" * 8) / f".apf-{'9' * 7}"  # mkdtemp's, the staging name
    if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
        raise ConfigError(f"TMPDIR {tempfile.gettempdir()}: too long for the run's Unix socket under it (at most "
                          f"{MAX_SOCKET_PATH} bytes in all); set TMPDIR to a shorter directory")


def prepare(opts: RunOptions, prefix: str) -> tuple[str, Path, Path, Path]:
    """The run's VM id, log directory (emptied of earlier logs of the same names), and socket in a fresh
    temporary directory."""
    vm = opts.vm or f"{prefix}{os.getpid()}"
    log_dir = opts.log_dir or Path("apf-emu-logs") / vm
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in [*log_dir.glob("host*.jsonl*"), *log_dir.glob("guest-*.jsonl*"), *log_dir.glob("harness.jsonl*")]:
        old.unlink()  # a run's directory holds that run's logs only
    tmp = Path(tempfile.mkdtemp(prefix="apf-emu-"))
    return vm, log_dir, tmp, tmp / "host.sock"


async def run(opts: RunOptions) -> RunResult:
    vm, log_dir, tmp, sock = prepare(opts, "run")
    result = RunResult(vm, log_dir)
    write_harness_settings(log_dir, vm, "run", ready_latency_limit_ms=DEFAULT_READY_LATENCY_LIMIT_MS)
    place = {"vm": vm, "socket": sock, "log_dir": log_dir}
    host = with_(opts.host, **place)
    guest = with_(opts.guest, **place, seed=opts.host.seed, log_stdout=opts.host.log_stdout,
                  log_compress=opts.host.log_compress, abi=opts.host.abi)
    procs: dict[str, trio.Process] = {}
    # SIGINT and SIGTERM are the runner's from here to the end: the first stops the run, later ones are ignored
    # (a second Ctrl-C must not cut the stop short and leave processes behind).
    with stop_signals_absorbed(), trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, \
            progress.status_line() as line:
        async with trio.open_nursery() as pumps:
            status = await pumps.start(live.show, log_dir, "apf-emu run", line) if line.tty else trio.CancelScope()
            try:
                procs["host"] = await spawn(pumps, "host", host.argv())
                for i in range(host.vcpus):
                    procs[f"guest-{i}"] = await spawn(pumps, f"guest-{i}", with_(guest, vcpu=i).argv())
                async def snapshot_and_restore() -> trio.Process:
                    """The VMM's snapshot into <log dir>/snapshot, the old host's stop, the restoring host."""
                    directory = log_dir / "snapshot"
                    await trio.to_thread.run_sync(vmm.snapshot, sock, directory, opts.snapshot_msrs,
                                                  abandon_on_cancel=True)
                    old = procs["host"]
                    with trio.move_on_after(HOST_GRACE_S):
                        await old.wait()
                    result.exit_codes["host-before-snapshot"] = old.returncode
                    if old.returncode != 0:
                        raise vmm.VmmError(f"the host did not stop after the snapshot: {describe_exit(old.returncode)}")
                    return await spawn(pumps, "host", vmm.restore_command(directory, []))

                await _wait_for_stop(opts.duration, procs, result, signals,
                                     snapshot=snapshot_and_restore if opts.snapshot_at is not None else None,
                                     snapshot_at=opts.snapshot_at)
            finally:
                status.cancel()
                with trio.CancelScope(shield=True):
                    await _stop(procs, result)
                    result.leftovers += remove_leftovers(vm, tmp, sock, "the runner")
    return result


def write_harness_settings(log_dir: Path, vm: str, command: str, **settings: Any) -> None:
    """One line in harness.jsonl: what this run is judged with (the checker reads it back)."""
    line = {"event": "harness_settings", "role": "harness", "vm": vm, "vcpu": None, "boot": None,
            "mono_ns": time.monotonic_ns(), "timestamp": datetime.now(UTC).isoformat(), "pid": os.getpid(),
            "command": command, **settings}
    with open(log_dir / "harness.jsonl", "ab") as f:
        f.write(orjson.dumps(line) + b"\n")


async def spawn(nursery: trio.Nursery, name: str, argv: Sequence[str]) -> trio.Process:
    """Start a child in its own session; its stderr is copied to ours a line at a time, prefixed with `name`. Its
    options are all on its command line: it gets no APF_EMU_* variable (the runner read those for its own options),
    which would otherwise stand in for options left at their default."""
    proc = await trio.lowlevel.open_process(list(argv), start_new_session=True, stderr=-1,  # stderr: a pipe
                                            env=daemon_env())
    assert proc.stderr is not None
    nursery.start_soon(_pump_stderr, name, proc.stderr)
    return proc


async def _pump_stderr(name: str, stream: trio.abc.ReceiveStream) -> None:
    buf = b""
    with trio.CancelScope(shield=True):  # what a dying child says last is worth reading
        async with stream:
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if lines:
                    progress.write_above(b"".join(name.encode() + b": " + line + b"\n" for line in lines))
            if buf:
                progress.write_above(name.encode() + b": " + buf + b"\n")


@contextlib.contextmanager
def stop_signals_absorbed() -> Iterator[None]:
    """Around a run's signal receiver: SIGINT and SIGTERM that come after the first (the stop under way) are queued
    in the receiver, which delivers them again to the previous handler when it closes; that handler ignores them.
    Afterwards the usual handlers are back (a Ctrl-C during the summary ends the command with 130)."""
    old = {s: signal.signal(s, _absorb) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _absorb(_signum: int, _frame: Any) -> None:
    return None


def describe_exit(code: int | None) -> str:
    """A process's exit status in words."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def remove_leftovers(vm: str, tmp: Path, sock: Path, remover: str) -> list[str]:
    """Remove what a host that could not clean up left (its shm objects, its socket in `tmp`); say what it was."""
    found = [f"shm {name} (removed by {remover})" for name in vm_shm_names(vm) if unlink(name)]
    if sock.exists():
        found.append(f"socket {sock} (removed by {remover})")
    shutil.rmtree(tmp, ignore_errors=True)
    return found


async def _wait_for_stop(duration: float, procs: dict[str, trio.Process], result: RunResult,
                         signals: AsyncIterator[int], *,
                         snapshot: Callable[[], Awaitable[trio.Process]] | None = None,
                         snapshot_at: float | None = None) -> None:
    """Until `duration`, a stop signal or a process's unexpected end; `snapshot` at `snapshot_at` replaces the
    host (its end is then expected) by the one it returns."""
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            async for signum in signals:
                result.stopped_by = signal.Signals(signum).name
                nursery.cancel_scope.cancel()
                return

        async def on_exit(name: str, proc: trio.Process,
                          task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await proc.wait()
                result.unexpected_exits.append(f"{name} ended before the run did: {describe_exit(proc.returncode)}")
                result.stopped_by = f"{name} exit"
                nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        watchers = {name: await nursery.start(on_exit, name, proc) for name, proc in procs.items()}
        if snapshot is not None and snapshot_at is not None and snapshot_at < duration:
            await trio.sleep(snapshot_at)
            watchers["host"].cancel()
            try:
                procs["host"] = await snapshot()
            except vmm.VmmError as exc:
                result.unexpected_exits.append(f"snapshot: {exc}")
                result.stopped_by = "snapshot failure"
                nursery.cancel_scope.cancel()
                return
            watchers["host"] = await nursery.start(on_exit, "host", procs["host"])
            await trio.sleep(duration - snapshot_at)
        else:
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
                proc.send_signal(signal.SIGCONT)  # one paused by a snapshot that was never restored
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
