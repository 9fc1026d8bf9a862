# `apf-emu pod host|guest`: one campaign case as a Kubernetes pod of one host container and one container per vCPU
# (apf_emu/kube.py writes the manifests). The containers share the pod's IPC namespace, so guest RAM is the same
# POSIX shm in /dev/shm as natively, and its PID namespace (shareProcessNamespace), so that signals reach across
# containers: the signal transport's, and the chaos schedule's.
#
# The host container is the case's harness: a chaos run (apf_emu/chaos.py) whose host is its own child, as
# natively, and whose guests are the other containers'. Each guest container is a supervisor of one vCPU's boots
# (chaos.guest_boots, the same loop as natively). They meet in the pod's run directory, an emptyDir volume: the
# host's socket, each supervisor's pid and its current guest's pid (the schedule's targets), and `stopped`, which
# the harness writes at the end before it SIGTERMs the supervisors. Every process writes its JSON log lines to
# the shared log directory (the harness judges the case from them) and to its container's stdout (what
# `kubectl logs` and `apf-emu campaign collect` read). The host container prints the case's record
# (apf_emu/cases.py) as its last line and exits with the verdict's status; the guest containers exit 0.
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Final

import orjson
import trio

from shared.config import GuestOptions, HostOptions, with_

from .cases import Case, CaseResult, Settings, record
from .chaos import GUEST_STOP_S, Chaos, ChaosOptions, ChaosResult, Target, guest_boots
from .runner import spawn, terminate
from .scenarios import chaos_scenario, with_scenario
from .summary import chaos_json
from .verdict import analyse_run, verdict_status

RUN_DIR: Final = Path("/run/apf-emu")
LOG_DIR: Final = Path("/var/log/apf-emu")
STOPPED: Final = "stopped"
START_WAIT_S: Final = 120.0  # how long the harness waits for every guest container, a guest for the host's socket


def chaos_options(case: Case, settings: Settings, *, log_dir: Path | None = None,
                  vm: str | None = None) -> ChaosOptions:
    """The chaos run of a case: what `apf-emu chaos <case.chaos_args()>` runs (tests/apf_emu/test_pod.py holds
    the two to the same options)."""
    host = with_(HostOptions(), vcpus=settings.vcpus, seed=case.seed, abi=case.abi)
    # As `apf-emu chaos` gives them: every guest also stops by itself after the duration (a net for a harness that
    # died), and runs with the case's seed and ABI.
    guest = with_(GuestOptions(), transport=settings.transport, duration=settings.duration, seed=case.seed,
                  abi=case.abi)
    if case.scenario:
        host, guest = with_scenario(*chaos_scenario(case.scenario), host, guest)
    return ChaosOptions(host=host, guest=guest, duration=settings.duration, log_dir=log_dir, vm=vm,
                        guest_kills=settings.guest_kills, guest_panics=settings.guest_panics,
                        host_kills=settings.host_kills, pauses=settings.pauses)


def pidfile(run_dir: Path, vcpu: int, *, supervisor: bool = False) -> Path:
    return run_dir / f"guest-{vcpu}{'.supervisor' if supervisor else ''}.pid"


class PodProcess:
    """A process of another container of the pod, by the pid its supervisor wrote (one PID namespace)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; 0 once it is gone or a zombie (its exit status is its supervisor's to read)."""
        try:
            status = Path(f"/proc/{self.pid}/stat").read_bytes()
        except OSError:
            return 0
        return 0 if status[status.rindex(b")") + 2:][:1] in (b"Z", b"X") else None

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


def read_pid(path: Path) -> PodProcess | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return PodProcess(pid) if pid > 1 else None


class PodChaos(Chaos):
    """The harness of the host container: chaos with the guests in the other containers."""

    def __init__(self, opts: ChaosOptions, run_dir: Path) -> None:
        super().__init__(opts)
        self.run_dir = run_dir
        self.sock = run_dir / "host.sock"
        self.host_opts = with_(self.host_opts, socket=self.sock, log_stdout=True)

    async def _guest_loop(self, vcpu: int) -> None:
        return None  # its container's supervisor boots it

    def _guest(self, vcpu: int) -> Target | None:
        return read_pid(pidfile(self.run_dir, vcpu))

    async def _guests_started(self) -> None:
        with trio.move_on_after(START_WAIT_S) as waited:
            while any(self._guest(v) is None for v in range(self.opts.host.vcpus)):
                await trio.sleep(0.1)  # polling files of processes in other containers
        if waited.cancelled_caught:
            missing = [v for v in range(self.opts.host.vcpus) if self._guest(v) is None]
            self.result.problems.append(f"no guest of vCPU {missing} started within {START_WAIT_S:g} s")

    async def _stop_guests(self) -> None:
        (self.run_dir / STOPPED).touch()
        supervisors = {v: read_pid(pidfile(self.run_dir, v, supervisor=True)) for v in range(self.opts.host.vcpus)}
        for proc in supervisors.values():
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(GUEST_STOP_S + 10):
            while any(p is not None and p.returncode is None for p in supervisors.values()):
                await trio.sleep(0.1)
        for v, proc in supervisors.items():
            if proc is not None and proc.returncode is None:
                self.result.problems.append(f"the supervisor of vCPU {v} did not stop; killed")
                proc.send_signal(signal.SIGKILL)


async def pod_host(case: Case, settings: Settings, *, run_dir: Path, log_dir: Path, where: str) -> CaseResult:
    t0 = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    opts = chaos_options(case, settings, log_dir=log_dir, vm="case")
    harness = PodChaos(opts, run_dir)
    sys.stdout.buffer.write((log_dir / "harness.jsonl").read_bytes())  # the settings it is judged with, for collect
    sys.stdout.flush()
    result: ChaosResult = await harness.run()
    violations, stats, report, checker = analyse_run(log_dir)
    summary = chaos_json(result, stats, violations, report, checker, case.scenario)
    status = verdict_status(violations, checker, failed=bool(result.problems or result.leftovers),
                            interrupted=result.stopped_by != "duration")
    return record(case, settings, exit_status=status, summary=summary, wall_s=time.monotonic() - t0, log_dir=None,
                  where=where)


async def pod_guest(settings: Settings, case: Case, vcpu: int, *, run_dir: Path, log_dir: Path) -> int:
    """One vCPU's boots until the harness stops the case (SIGTERM, or `stopped` for a supervisor that starts late)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    opts = chaos_options(case, settings)
    sock = run_dir / "host.sock"
    # No duration of its own: the harness's clock starts once every guest container is up, so a guest that started
    # early must not end before the harness ends the case.
    guest = with_(opts.guest, vm="case", socket=sock, log_dir=log_dir, log_stdout=True, duration=None)
    stopping = False
    current: dict[str, trio.Process] = {}
    result = ChaosResult("case", log_dir, [])
    pidfile(run_dir, vcpu, supervisor=True).write_text(f"{os.getpid()}\n")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as pumps:

            async def on_signal() -> None:
                nonlocal stopping
                async for _ in signals:
                    if not stopping and "guest" in current:
                        pumps.start_soon(terminate, {"guest": current["guest"]}, GUEST_STOP_S, result.exit_codes,
                                         result.problems)
                    stopping = True

            pumps.start_soon(on_signal)

            async def boot(number: int, kind: str) -> trio.Process:
                proc = current["guest"] = await spawn(pumps, f"guest-{vcpu}",
                                                      with_(guest, vcpu=vcpu, boot=number, kind=kind).argv())
                pidfile(run_dir, vcpu).write_text(f"{proc.pid}\n")
                return proc

            def stopped() -> bool:
                return stopping or (run_dir / STOPPED).exists()

            with trio.move_on_after(START_WAIT_S):
                while not sock.exists() and not stopped():
                    await trio.sleep(0.05)  # the host container's socket, renamed into place once it listens
            await guest_boots(vcpu, boot, stopped, result)
            if "guest" in current:  # a signal that came while it was being started
                await terminate({"guest": current["guest"]}, GUEST_STOP_S, result.exit_codes, result.problems)
            pumps.cancel_scope.cancel()  # on_signal (a child's stderr pump ends with the child)
    pidfile(run_dir, vcpu).unlink(missing_ok=True)
    for problem in result.problems:
        print(f"apf-emu pod guest {vcpu}: {problem}", file=sys.stderr)
    return 0


def print_record(res: CaseResult) -> None:
    """The host container's last line: the case's record, which collect takes for the case's line."""
    sys.stdout.buffer.write(orjson.dumps({"apf_emu_case": res.as_dict()}) + b"\n")
    sys.stdout.flush()
