# docker-compose.yml end to end: real containers from the README's compose commands. scripts/prepare-docker makes
# the machine ready (engine, base image, wheelhouse); the test skips only if it says no engine can be started.
# The stack runs with 4 guests, one guest's process is SIGKILLed inside its container (a crash, which the restart
# policy answers, unlike `compose kill`), it must come back as the next boot of a vCPU, and the compose logs must
# pass `apf-emu check` and feed `apf-emu stats`; the same for the host daemon, which comes back with
# --recover-if-present. `down -v` must leave no container or volume of the project.
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from .prepare import prepared

ROOT = Path(__file__).resolve().parents[2]

# Kill the apf-guest process of the container it runs in (not the docker-init that is PID 1, not itself).
KILL_GUEST = (
    "import os, signal\n"
    "for p in filter(str.isdigit, os.listdir('/proc')):\n"
    "    cmd = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')\n"
    "    if int(p) not in (1, os.getpid()) and any(a.endswith(b'/apf-guest') for a in cmd):\n"
    "        os.kill(int(p), signal.SIGKILL)\n"
)


@pytest.fixture(scope="session")
def base_image() -> str:
    return prepared("prepare-docker", "a Docker engine")


def compose_command() -> list[str]:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0:
                return cmd
        except FileNotFoundError:
            continue
    raise AssertionError("scripts/prepare-docker succeeded but neither `docker compose` nor `docker-compose` runs")


class Stack:
    """One compose project of this checkout, driven with the same commands as the README."""

    def __init__(self, base_image: str, *files: str, **env: str) -> None:
        self.project = f"apfe2e{os.getpid()}{int(time.monotonic() * 1000) % 100000}"
        self.cmd = [*compose_command(), "-p", self.project]
        for f in files:
            self.cmd += ["-f", f]
        self.env = {**os.environ, "BASE_IMAGE": base_image, **env}

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.cmd, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc

    def logs(self, *services: str) -> str:
        return self.run("logs", "--no-color", *services).stdout

    def events(self, *services: str) -> list[dict[str, Any]]:
        out = []
        for line in self.logs(*services).splitlines():
            start = line.find("{")
            if start >= 0:
                with contextlib.suppress(orjson.JSONDecodeError):
                    out.append(orjson.loads(line[start:]))
        return out

    def containers(self, service: str, *, all_states: bool = False) -> list[str]:
        args = ["ps", "-q", *(["-a"] if all_states and "docker-compose" not in self.cmd[0] else []), service]
        return self.run(*args).stdout.split()

    def wait_events(self, predicate: Any, what: str, timeout: float = 90) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events("host")
            if predicate(events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; host log tail:\n"
                                     + self.logs()[-3000:])
            time.sleep(0.5)  # polling another process's output, not standing in for synchronisation

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = subprocess.run(["docker", "ps", "-a", "-q", "--filter", label], capture_output=True, text=True,
                               timeout=60).stdout.split()
        for kind in ("volume", "network"):
            found += subprocess.run(["docker", kind, "ls", "-q", "--filter", label], capture_output=True, text=True,
                                    timeout=60).stdout.split()
        return found


@pytest.fixture
def stack_factory(base_image: str) -> Iterator[Any]:
    stacks: list[Stack] = []

    def make(*files: str, **env: str) -> Stack:
        stack = Stack(base_image, *files, **env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.run("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
        assert stack.leftovers() == [], f"compose project {stack.project} left containers, volumes or networks behind"
    # Each build of changed sources leaves the previous apf-emu:local untagged: remove those (not in use).
    subprocess.run(["docker", "image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=apf-emu"],
                   capture_output=True, timeout=120)


def ready_on(events: list[dict[str, Any]], vcpu: int, boot: int | None = None) -> bool:
    return any(e.get("event") == "kvm_async_pf_ready" and e.get("vcpu") == vcpu
               and (boot is None or e.get("boot") == boot) for e in events)


def apf_emu(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apf_emu", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=300)


def check_logs(stack: Stack) -> dict[str, Any]:
    """`compose logs | apf-emu check -` and `| apf-emu stats --json -`, as the README has them."""
    logs = stack.logs()
    checked = apf_emu("check", "-", stdin=logs)
    assert checked.returncode == 0, f"apf-emu check found violations:\n{checked.stdout[-3000:]}"
    assert " 0 violations" in checked.stdout
    stats = apf_emu("stats", "--json", "-", stdin=logs)
    assert stats.returncode == 0, stats.stderr
    summary: dict[str, Any] = orjson.loads(stats.stdout)
    assert summary["apfs"] > 0 and summary["data_checks"] > 0 and summary["data_check_failures"] == 0
    return summary


def test_compose_stack_survives_a_guest_crash(stack_factory):
    stack = stack_factory(APF_EMU_VCPUS="4")
    stack.run("up", "-d", "--build", timeout=600)
    guests = stack.containers("guest")
    assert len(guests) == 4
    stack.wait_events(lambda evs: all(ready_on(evs, v) for v in range(4)), "page-ready on all 4 vCPUs")

    victim = guests[0]
    boots = [orjson.loads(line[line.find("{"):]) for line in subprocess.run(
        ["docker", "logs", victim], capture_output=True, text=True, timeout=60).stdout.splitlines()
        if '"guest_boot"' in line]
    assert len(boots) == 1 and boots[0]["boot"] == 1
    vcpu = boots[0]["vcpu"]
    # The container ends with its process, taking the exec along (137) or not (0).
    killer = subprocess.run(["docker", "exec", victim, "python3", "-c", KILL_GUEST], capture_output=True,
                            text=True, timeout=60)
    assert killer.returncode in (0, 137), killer.stderr
    stack.wait_events(lambda evs: ready_on(evs, vcpu, boot=2), f"vCPU {vcpu} back as boot 2 with APF traffic")
    restarts = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", victim], capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()
    assert restarts == "1", "the restart policy, not the test, brought the crashed guest back"

    stack.run("stop", "--timeout", "20")
    states = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", *guests,
                             *stack.containers("host", all_states=True)],
                            capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert states == ["0"] * 5, f"every container stops cleanly on SIGTERM: exit codes {states}"
    summary = check_logs(stack)
    assert summary["events"]["guest_boot"] == 5
    host = stack.events("host")
    connects = [(e["vcpu"], e["boot"]) for e in host if e.get("event") == "vcpu_connect"]
    assert sorted(connects) == sorted([(v, 1) for v in range(4)] + [(vcpu, 2)])
    assert all(e["assigned"] for e in host if e.get("event") == "vcpu_connect"), "replicas name no vCPU or boot"


def test_compose_signal_transport(stack_factory):
    stack = stack_factory("docker-compose.yml", "docker-compose.signal.yml", APF_EMU_VCPUS="2")
    stack.run("up", "-d", "--build", timeout=600)
    events = stack.wait_events(lambda evs: all(ready_on(evs, v) for v in range(2)), "page-ready on both vCPUs")
    connects = [e for e in events if e.get("event") == "vcpu_connect"]
    assert {e["transport"] for e in connects} == {"signal"}
    stack.run("stop", "--timeout", "20")
    check_logs(stack)


@pytest.mark.parametrize("abi", ["pf", "ve", "int-error"])
@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_compose_runs_every_abi(stack_factory, abi, transport):
    """Every ABI of shared/abis.py under compose, on both transports (`pf` without its nested #PFs, whose race the
    checker flags by design): APF traffic on both vCPUs, the ABI in every boot, a clean verdict."""
    files = ("docker-compose.yml", "docker-compose.signal.yml") if transport == "signal" else ("docker-compose.yml",)
    stack = stack_factory(*files, APF_EMU_VCPUS="2", APF_EMU_ABI=abi, APF_EMU_ENTRY_FAULT_RATIO="0")
    stack.run("up", "-d", "--build", timeout=600)
    events = stack.wait_events(lambda evs: all(ready_on(evs, v) for v in range(2)), "page-ready on both vCPUs")
    stack.run("stop", "--timeout", "20")
    assert {e["transport"] for e in events if e.get("event") == "vcpu_connect"} == {transport}
    boots = [e for e in stack.events("guest") if e.get("event") == "guest_boot"]
    assert len(boots) >= 2 and {e["abi"] for e in boots} == {abi}
    assert check_logs(stack)["abis"] == [abi]


# Kill the apf-host process of the host container (not the docker-init that is PID 1, not itself).
KILL_HOST = KILL_GUEST.replace("/apf-guest", "/apf-host")


@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_compose_host_crash_is_restarted_and_recovers_the_vm(stack_factory, transport):
    """The host daemon is SIGKILLed inside its container: the restart policy brings the container back, the new
    daemon takes the VM over (--recover-if-present: guest RAM and swap survived in the `vm` container's /dev/shm,
    and with signals the guests in its PID namespace), the guests reconnect as the same boots and go on; no data
    check fails and the logs pass `apf-emu check`."""
    files = ("docker-compose.yml", "docker-compose.signal.yml") if transport == "signal" else ("docker-compose.yml",)
    stack = stack_factory(*files, APF_EMU_VCPUS="2")
    stack.run("up", "-d", "--build", timeout=600)
    stack.wait_events(lambda evs: all(ready_on(evs, v) for v in range(2)), "page-ready on both vCPUs")
    host = stack.containers("host")[0]
    # Detached: an exec attached to a container that dies under it can hang in Docker.
    killer = subprocess.run(["docker", "exec", "-d", host, "python3", "-c", KILL_HOST], capture_output=True,
                            text=True, timeout=60)
    assert killer.returncode == 0, killer.stderr

    def recovered(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in evs if e.get("event") == "host_ready" and e.get("recovered")]

    def resumed(evs: list[dict[str, Any]]) -> bool:
        ready = recovered(evs)
        if not ready:
            return False
        after = [e for e in evs if e["mono_ns"] > ready[0]["mono_ns"]]
        return all(any(e.get("event") == "vcpu_connect" and e.get("vcpu") == v and e.get("restored") for e in after)
                   and any(e.get("event") == "kvm_async_pf_ready" and e.get("vcpu") == v for e in after)
                   for v in range(2))

    events = stack.wait_events(resumed, "the restarted host recovering the VM, both vCPUs back with APF traffic")
    assert [e["recovered"] for e in events if e.get("event") == "host_ready"] == [False, True]
    restarts = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", host], capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()
    assert restarts == "1", "the restart policy, not the test, brought the host back"
    stack.run("stop", "--timeout", "20")
    summary = check_logs(stack)
    assert summary["events"]["guest_boot"] == 2, "the guests went on as the same boots"
