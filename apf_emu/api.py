# The Python API: a VM of real processes (one host daemon, one guest agent per vCPU) in a context manager, for
# VMM projects' tests and for scripts.
#
#     from apf_emu.api import VM
#
#     with VM(vcpus=2, abi="int", log_dir="logs/t1") as vm:
#         vm.wait_for("guest_apf_wake", n=20)           # twenty APFs have completed somewhere in the VM
#         vm.vcpus[0].panic()                            # the crash path: APF off without waiting, exit 70
#         vm.vcpus[0].restart()                          # the next boot, a kdump kernel after a panic
#         vm.wait_for("guest_apf_wake", vcpu=0, boot=2)
#     vm.check().assert_clean()                          # the checker's verdict on the VM's logs
#
# It starts exactly what `apf-emu run` starts, with the same options (keywords named as run's flags: vcpus,
# pages, resident, page_in_latency, abi, transport, tasks, bugs, ...; each checked by the same parser as the command
# line, so a bad one is a ConfigError naming it), and stops it as `run` does: guests first (SIGTERM: they wake
# their sleepers and disable APF), then the host, SIGKILL for what does not stop in time, then the removal of what
# a killed host leaves (its shm objects, its socket). Every child runs in its own session, so a Ctrl-C reaches only
# this process, whose `with` block then stops them; each is also told to get SIGTERM if this process dies
# (PR_SET_PDEATHSIG), so that not even a SIGKILLed test runner leaves a VM running.
#
# The API is synchronous (subprocess, polling of the log files): it is meant for ordinary test functions and
# scripts. Log events come back as `LogEvent`s; `check()` runs the one checker (apf_emu/checker.py) on them.
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from shared import config
from shared.config import EXIT_CRASH, EXIT_REBOOT, ConfigError, GuestOptions, HostOptions, daemon_env, with_
from shared.snapshot import DEFAULT_MSR_LIST
from shared.wire import VmmDone

from . import vmm
from .checker import INVARIANTS, Violation
from .logs import Event, LogInputError, ReadReport, read_merged
from .pdeath import die_with_parent
from .runner import (
    CHAOS_GUEST,
    GUEST_GRACE_S,
    HOST_GRACE_S,
    RUN_GUEST,
    RUN_HOST,
    check_socket_room,
    describe_exit,
    remove_leftovers,
)
from .stats import Stats
from .verdict import analyse

__all__ = ["VM", "ApiError", "CheckResult", "ConfigError", "Host", "LogEvent", "Vcpu", "VmmError", "check_logs",
           "stop_all"]

VmmError = vmm.VmmError
START_TIMEOUT_S: Final = 30.0  # a host's socket, a guest's guest_boot
POLL_S: Final = 0.02


_LIVE: weakref.WeakSet[VM] = weakref.WeakSet()  # started and not yet stopped: stop_all's


def stop_all() -> None:
    """Stop every VM of this process that is still running (at interpreter exit, and the pytest plugin's end)."""
    for vm in list(_LIVE):
        vm.stop()


atexit.register(stop_all)


class ApiError(Exception):
    """The VM cannot do what was asked (a process is not in the state the call needs, or did not get there)."""


_COMMON: Final = frozenset({"event", "mono_ns", "role", "vm", "vcpu", "boot"})


# --- events and verdicts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogEvent:
    """One line of an apf-emu log (docs/LOGGING.md): the fields every line has, and the event's own in `fields`."""

    event: str
    mono_ns: int
    role: str
    vm: str | None
    vcpu: int | None
    boot: int | None
    fields: Mapping[str, Any]

    @classmethod
    def from_dict(cls, ev: Event) -> LogEvent:
        vcpu, boot = ev.get("vcpu"), ev.get("boot")
        return cls(event=str(ev["event"]), mono_ns=int(ev["mono_ns"]), role=str(ev.get("role")),
                   vm=ev.get("vm") if isinstance(ev.get("vm"), str) else None,
                   vcpu=vcpu if isinstance(vcpu, int) else None, boot=boot if isinstance(boot, int) else None,
                   fields={k: v for k, v in ev.items() if k not in _COMMON})

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def as_dict(self) -> Event:
        """The line as the checker and the statistics read it."""
        return {"event": self.event, "mono_ns": self.mono_ns, "role": self.role, "vm": self.vm, "vcpu": self.vcpu,
                "boot": self.boot, **self.fields}

    def matches(self, event: str | None = None, **match: Any) -> bool:
        """Whether this is `event` (any, if None) with every field of `match` equal (vcpu, boot, role, token...)."""
        if event is not None and self.event != event:
            return False
        line = self.as_dict()
        return all(line.get(k) == v for k, v in match.items())


@dataclass
class CheckResult:
    """The checker's verdict on a VM's logs, and the statistics of the same events."""

    violations: list[Violation]
    stats: Stats
    events: int
    protocol_events: int
    report: ReadReport = field(default_factory=ReadReport)

    @property
    def checked(self) -> bool:
        """False when the logs held no event any invariant reads: nothing was checked, which is not a pass."""
        return self.protocol_events > 0

    @property
    def ok(self) -> bool:
        return self.checked and not self.violations

    def summary(self) -> str:
        if not self.checked:
            return f"NOT CHECKED: {self.events} events read, none of them a protocol event an invariant reads"
        if not self.violations:
            return f"all {len(INVARIANTS)} invariants hold over {self.events} events"
        lines = [f"{len(self.violations)} violations over {self.events} events:"]
        for v in self.violations[:20]:
            lines.append(f"  {v.invariant}: {v.message}")
        if len(self.violations) > 20:
            lines.append(f"  ... {len(self.violations) - 20} more")
        return "\n".join(lines)

    def assert_clean(self) -> None:
        """AssertionError with the violations (or with "nothing was checked") unless every invariant held."""
        if not self.ok:
            raise AssertionError(self.summary())


def check_logs(*paths: str | Path, **checker_options: Any) -> CheckResult:
    """The checker's verdict on logs (files or directories), as `apf-emu check` gives it."""
    violations, stats, report, checker = analyse([str(p) for p in paths], **checker_options)
    return CheckResult(violations, stats, checker.events, checker.protocol_events, report)


# --- processes ----------------------------------------------------------------------------------------------------
def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """A VM's process, which dies with the thread that started it (before exec: apf_emu/pdeath.py): a VM belongs
    to the thread that made it."""
    return subprocess.Popen(argv, start_new_session=True, env=daemon_env(), stdin=subprocess.DEVNULL,
                            preexec_fn=functools.partial(die_with_parent, os.getpid()))


def _signal(proc: subprocess.Popen[bytes] | None, signum: int) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def _reap(proc: subprocess.Popen[bytes], grace: float) -> int:
    """Wait up to `grace` for a process; SIGKILL it after that. Its exit status."""
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class _Process:
    """A process of the VM, if started: its pid, and whether it runs."""

    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Vcpu(_Process):
    """One vCPU: the guest agent process of its current boot. Boots are numbered from 1; `restart()` starts the
    next one after the process ended (killed, panicked, rebooted or stopped)."""

    def __init__(self, vm: VM, index: int) -> None:
        self._vm = vm
        self.index = index
        self.boot = 0
        self.kind = "normal"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._next_kind = "normal"
        self.exit_codes: dict[int, int] = {}  # boot -> exit status

    def __repr__(self) -> str:
        return f"<Vcpu {self.index} boot {self.boot} {self.kind} {'running' if self.alive else 'down'}>"

    def _start(self, kind: str) -> None:
        self.boot += 1
        self.kind = kind
        opts = with_(self._vm.guest_options, vcpu=self.index, boot=self.boot, kind=kind)
        self.proc = _spawn(opts.argv())
        self._vm._wait("guest_boot", 1, START_TIMEOUT_S, {"vcpu": self.index, "boot": self.boot},
                       (f"guest {self.index} boot {self.boot}", self.proc))

    def restart(self, kind: str | None = None) -> None:
        """Boot the next kernel on this vCPU: `kind` "normal" or "kdump" (default: kdump after a panic, as a crash
        kernel would boot, else normal). Returns once it has booted (its handlers are in place)."""
        if self.alive:
            raise ApiError(f"vCPU {self.index}: boot {self.boot} still runs; kill, panic, reboot or stop it first")
        if self.proc is not None and self.boot not in self.exit_codes:
            self._ended(self.proc.returncode)  # it ended on its own (a panic of its own: kdump next)
        if kind not in (None, "normal", "kdump"):
            raise ApiError(f"vCPU {self.index}: kind {kind!r} is not normal or kdump")
        self._start(kind or self._next_kind)

    def _end(self, signum: int, expected: tuple[int, ...], what: str, timeout: float) -> int:
        proc = self._running(what)
        if self.paused and signum != signal.SIGKILL:
            self.resume()
        proc.send_signal(signum)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ApiError(f"vCPU {self.index}: boot {self.boot} did not end within {timeout:g} s of its {what}; "
                           "killed") from None
        self._ended(code)
        if code not in expected:
            raise ApiError(f"vCPU {self.index}: boot {self.boot} ended with {describe_exit(code)} on {what}")
        return code

    def _ended(self, code: int) -> None:
        self.paused = False
        self.exit_codes[self.boot] = code
        self._next_kind = "kdump" if code == EXIT_CRASH else "normal"

    def _running(self, what: str) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            raise ApiError(f"vCPU {self.index}: no running boot to {what}")
        return self.proc

    def kill(self) -> None:
        """SIGKILL: no crash path runs; the host sees the connection end and resets the vCPU."""
        self._end(signal.SIGKILL, (-signal.SIGKILL,), "kill", GUEST_GRACE_S)

    def panic(self) -> None:
        """SIGUSR1: the crash path (kvm_crash_shutdown: APF disabled without waiting), exit 70; the next boot is a
        kdump kernel."""
        self._end(signal.SIGUSR1, (EXIT_CRASH,), "panic", GUEST_GRACE_S)

    def reboot(self) -> None:
        """SIGUSR2: the reboot path (kvm_pv_guest_cpu_reboot: APF disabled), exit 71; the next boot is normal."""
        self._end(signal.SIGUSR2, (EXIT_REBOOT,), "reboot", GUEST_GRACE_S)

    def stop(self) -> int:
        """SIGTERM: a clean shutdown (sleepers woken, APF disabled), exit 0."""
        return self._end(signal.SIGTERM, (0,), "stop", GUEST_GRACE_S + 5)

    def pause(self) -> None:
        """SIGSTOP: the vCPU stops running (it cannot free its token slot); `resume()` or the VM's stop ends it."""
        self._running("pause").send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        _signal(self.proc, signal.SIGCONT)
        self.paused = False

    @contextlib.contextmanager
    def paused_for(self) -> Iterator[None]:
        """`with vcpu.paused_for(): ...`: paused inside the block, running again after it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def events(self, event: str | None = None, **match: Any) -> list[LogEvent]:
        """This vCPU's events (host and guest), every boot."""
        return self._vm.events(event, vcpu=self.index, **match)


class Host(_Process):
    """The host daemon (KVM and the VMM in one process)."""

    def __init__(self, vm: VM) -> None:
        self._vm = vm
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    def _start(self, argv: list[str]) -> None:
        sock = self._vm.socket
        sock.unlink(missing_ok=True)  # a killed host's: from now on the socket file means "listening"
        self.proc = _spawn(argv)
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while not sock.exists():
            if self.proc.poll() is not None:
                raise ApiError(f"the host ended before it listened: {describe_exit(self.proc.returncode)}")
            if time.monotonic() > deadline:
                raise ApiError(f"the host did not listen on {sock} within {START_TIMEOUT_S:g} s")
            time.sleep(POLL_S)

    def kill(self) -> None:
        """SIGKILL the host: guest RAM, swap and the vCPUs' registers survive; `restart()` takes them over."""
        if not self.alive or self.proc is None:
            raise ApiError("the host is not running")
        self.proc.kill()
        self.exit_codes.append(self.proc.wait())

    def restart(self) -> None:
        """A new host after a killed one (`--recover`): the guests reconnect as the same boots, a wake-all replaces
        the events that died."""
        if self.alive:
            raise ApiError("the host still runs; kill it first")
        self._start(with_(self._vm.host_options, recover=True).argv())

    def pause(self) -> None:
        if self.proc is None or not self.alive:
            raise ApiError("the host is not running")
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        _signal(self.proc, signal.SIGCONT)


class VM:
    """A VM of real processes. `with VM(**options) as vm:` starts it (the host, then a guest per vCPU, each
    booted) and stops it at the end of the block, whatever ends the block, leaving no process, socket or shm
    object behind. Options are `apf-emu run`'s, as keywords (apf-emu run --help lists them). Logs go to `log_dir`
    (default apf-emu-logs/<vm>, as run's) and stay there; only this VM's lines are read back."""

    def __init__(self, *, log_dir: str | Path | None = None, vm: str | None = None, **options: Any) -> None:
        self.name = vm or f"api{os.getpid()}x{time.monotonic_ns() % 10**6}"
        config.vm_id(self.name)
        host_kw, guest_kw = _split_options(options)
        check_socket_room()
        self._tmp = Path(tempfile.mkdtemp(prefix="apf-emu-"))
        self.socket = self._tmp / "host.sock"
        self.log_dir = Path(log_dir) if log_dir is not None else Path("apf-emu-logs") / self.name  # as run's
        place = {"vm": self.name, "socket": self.socket, "log_dir": self.log_dir}
        try:
            self.host_options = with_(config.parse(HostOptions, host_kw), **place)
            guest = config.parse(GuestOptions, guest_kw)
            h = self.host_options
            self.guest_options = with_(guest, **place, seed=h.seed, log_stdout=h.log_stdout,
                                       log_compress=h.log_compress, abi=h.abi)
        except ConfigError:
            self._remove_tmp()
            raise
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host = Host(self)
        self.vcpus = [Vcpu(self, i) for i in range(self.host_options.vcpus)]
        self.leftovers: list[str] = []
        self.problems: list[str] = []
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<VM {self.name} {len(self.vcpus)} vCPUs, logs in {self.log_dir}>"

    # --- life --------------------------------------------------------------------------------------------------
    def start(self) -> VM:
        if self._started:
            raise ApiError(f"VM {self.name} was started already")
        self._started = True
        _LIVE.add(self)
        try:
            self.host._start(self.host_options.argv())
            for v in self.vcpus:
                v._start("normal")
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> list[str]:
        """Stop everything as `apf-emu run` does and remove what is left; the problems seen (a process that had to
        be killed, a guest that did not stop cleanly). Idempotent."""
        if self._closed:
            return self.problems
        self._closed = True
        _LIVE.discard(self)
        for v in self.vcpus:  # boots that ended on their own since the last call: a problem unless expected
            if v.proc is not None and v.proc.poll() is not None and v.boot not in v.exit_codes:
                v._ended(v.proc.returncode)
                self.problems.append(f"guest {v.index} boot {v.boot} ended on its own: "
                                     f"{describe_exit(v.proc.returncode)}")
        guests = [v for v in self.vcpus if v.proc is not None and v.proc.poll() is None]
        host = self.host.proc
        if host is not None and host.poll() is not None and len(self.host.exit_codes) < self.host.starts:
            self.host.exit_codes.append(host.returncode)
            self.problems.append(f"the host ended on its own: {describe_exit(host.returncode)}")
        _signal(host, signal.SIGCONT)  # the guests need their host to drain
        for v in guests:
            _signal(v.proc, signal.SIGCONT)
            _signal(v.proc, signal.SIGTERM)
        for v in guests:
            assert v.proc is not None
            code = _reap(v.proc, GUEST_GRACE_S)
            v.exit_codes[v.boot] = code
            if code != 0:
                self.problems.append(f"guest {v.index} boot {v.boot} stopped with {describe_exit(code)}")
        if host is not None and host.poll() is None:
            _signal(host, signal.SIGTERM)
            code = _reap(host, HOST_GRACE_S)
            self.host.exit_codes.append(code)
            if code != 0:
                self.problems.append(f"host stopped with {describe_exit(code)}")
        self.leftovers = remove_leftovers(self.name, self._tmp, self.socket, "apf_emu.api")
        self._remove_tmp()
        return self.problems

    def _remove_tmp(self) -> None:
        # The logs stay (in the temporary directory only if no log_dir was given: then they go with it).
        if self.log_dir.is_relative_to(self._tmp):
            return
        with contextlib.suppress(OSError):
            os.rmdir(self._tmp)

    # --- snapshots ---------------------------------------------------------------------------------------------
    def snapshot(self, directory: str | Path, msrs: str = DEFAULT_MSR_LIST) -> VmmDone:
        """`apf-emu snapshot`: the VM paused (every guest stopped, exits answered), saved into `directory`, and the
        host gone; the guests stay paused until `restore()`. `msrs`: the MSR list the VMM saves (shared/snapshot.py;
        "firecracker-1.1" reproduces a VMM that forgets MSR_KVM_ASYNC_PF_INT)."""
        if not self.host.alive:
            raise ApiError("the host is not running")
        done = vmm.snapshot(self.socket, Path(directory), msrs)
        assert self.host.proc is not None
        try:
            self.host.exit_codes.append(self.host.proc.wait(HOST_GRACE_S))
        except subprocess.TimeoutExpired:
            raise ApiError(f"the host did not stop within {HOST_GRACE_S:g} s of its snapshot") from None
        return done

    def restore(self, directory: str | Path, *host_args: str) -> None:
        """`apf-emu restore`: a new host from the snapshot in `directory` (its recorded options, then `host_args`),
        which resumes the paused guests."""
        if self.host.alive:
            raise ApiError("the host still runs: take a snapshot (or kill it) first")
        self.host._start(vmm.restore_command(Path(directory), list(host_args)))

    # --- logs --------------------------------------------------------------------------------------------------
    def events(self, event: str | None = None, **match: Any) -> list[LogEvent]:
        """Every event of the VM's logs so far, in mono_ns order; only `event` with the fields of `match` if given
        (vm.events("kvm_async_pf_ready", vcpu=1, injected=True))."""
        try:
            merged = read_merged([str(self.log_dir)])
            out = [LogEvent.from_dict(ev) for ev in merged]
        except LogInputError:  # nothing logged yet
            return []
        match = {"vm": self.name, **match}  # a reused log directory holds other VMs' lines too
        return [e for e in out if e.matches(event, **match)]

    def wait_for(self, event: str, n: int = 1, *, timeout: float = 30.0, **match: Any) -> list[LogEvent]:
        """Wait until the logs hold `n` events `event` with the fields of `match`; those events. ApiError after
        `timeout` seconds."""
        return self._wait(event, n, timeout, match, None)

    def _wait(self, event: str, n: int, timeout: float, match: Mapping[str, Any],
              proc: tuple[str, subprocess.Popen[bytes]] | None) -> list[LogEvent]:
        """wait_for, failing at once when the process `proc` (its name and itself) has ended."""
        deadline = time.monotonic() + timeout
        delay = POLL_S
        while True:
            found = self.events(event, **match)
            if len(found) >= n:
                return found
            if proc is not None and proc[1].poll() is not None:
                raise ApiError(f"{proc[0]} ended with {describe_exit(proc[1].returncode)} before its {event}")
            if time.monotonic() > deadline:
                raise ApiError(f"timed out after {timeout:g} s waiting for {n} x {event} {dict(match) or ''} "
                               f"({len(found)} so far) in {self.log_dir}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def check(self, **checker_options: Any) -> CheckResult:
        """The checker's verdict on the logs so far (usually after the `with` block: a stopped VM's boots ended
        cleanly). `checker_options`: Checker's, e.g. ready_latency_limit_ms."""
        return check_logs(self.log_dir, **checker_options)


def _split_options(options: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """`apf-emu run`'s options as keywords, turned into the host's and the guests' command-line words, so that the
    command line's own parser checks them (a ConfigError naming the option)."""
    tables = ({o.dest: o for o in HostOptions.TABLE if o.dest in RUN_HOST},
              {o.dest: o for o in GuestOptions.TABLE if o.dest in VM_GUEST})
    host: list[str] = []
    guest: list[str] = []
    for name, value in options.items():
        found = [(table[name], words) for table, words in zip(tables, (host, guest), strict=True) if name in table]
        if not found:
            raise ConfigError(f"unknown VM option {name!r}; the options are "
                              f"{', '.join(sorted(set(RUN_HOST) | set(VM_GUEST)))}")
        for o, words in found:
            if o.is_flag != isinstance(value, bool):
                raise ConfigError(f"VM option {name}: {value!r} is not a value for it"
                                  + (" (a flag: True or False)" if o.is_flag else ""))
            if o.is_flag:
                words += o.format(value)
            elif isinstance(value, (set, frozenset, list, tuple)):
                words += [o.flag_name, ",".join(str(v) for v in value)]
            else:
                words += [o.flag_name, hex(value) if name == "vector" and isinstance(value, int) else str(value)]
    return host, guest


# The guests' options a VM takes: those of `apf-emu run` and `chaos`, and the two a test may want for a guest that
# does not use APF or counts.
VM_GUEST: Final = tuple(dict.fromkeys((*RUN_GUEST, *CHAOS_GUEST, "no_apf", "counting_tasks", "drain_timeout")))
