"""A native host + N guests run for benchmarks: like `apf-emu run`, plus resident-set sampling while the guests
work and the totals the benchmarks need from the logs (APF cycles, synchronous faults, counting work)."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from apf_emu.logs import read_merged
from apf_emu.stats import Stats
from shared.config import GuestOptions, HostOptions, PageInLatency, daemon_env, with_

ROOT = Path(__file__).resolve().parents[1]


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class TopologyResult:
    vcpus: int
    seconds: float  # guests' working time (their --duration)
    apfs: int = 0  # not-present deliveries
    wakes: int = 0  # tasks woken by page-ready (not by a wake-all)
    sync_faults: int = 0
    halts: int = 0  # KVM's artificial halt: every fault with interrupts on when APF is off
    accesses: int = 0  # page accesses that retired
    count_work: int = 0  # counting tasks' increments
    count_ns: int = 0  # time the counting tasks ran
    exit_ns: int = 0  # time the vCPUs spent in memory exits (with --no-apf: halted for page-ins)
    host_rss_kb: int = 0
    guest_rss_kb: list[int] = field(default_factory=list)
    events: int = 0
    log_dir: Path | None = None
    clean: bool = True
    stats: Stats | None = None  # everything apf-emu stats says of the run's logs


def run(vcpus: int, seconds: float, *, pages: int, resident: int, latency: str, tasks: int = 4,
        counting_tasks: int = 0, apf: bool = True, transport: str = "socket", keep_logs: Path | None = None,
        seed: int = 0, shared_ratio: float = 0.2, abi: str = "int",
        entry_fault_ratio: float = GuestOptions.entry_fault_ratio) -> TopologyResult:
    vm = f"bench{os.getpid()}x{vcpus}"
    tmp = tempfile.TemporaryDirectory(prefix="apf-topo-")
    log_dir = keep_logs or Path(tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    sock = Path(tmp.name) / "host.sock"
    result = TopologyResult(vcpus, seconds, log_dir=log_dir)
    host_opts = HostOptions(vm=vm, socket=sock, vcpus=vcpus, pages=pages, resident=resident,
                            page_in_latency=PageInLatency.parse(latency), log_dir=log_dir, seed=seed, abi=abi)
    host_opts.validate()
    guest_opts = GuestOptions(vm=vm, socket=sock, boot=1, tasks=tasks, counting_tasks=counting_tasks,
                              duration=seconds, log_dir=log_dir, transport=transport, seed=seed,
                              shared_ratio=shared_ratio, no_apf=not apf, abi=abi,
                              entry_fault_ratio=entry_fault_ratio)
    host = subprocess.Popen(host_opts.argv(), cwd=ROOT, start_new_session=True, env=daemon_env())
    guests: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if host.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the host daemon did not start")
            time.sleep(0.01)
        for v in range(vcpus):
            guests.append(subprocess.Popen(with_(guest_opts, vcpu=v).argv(), cwd=ROOT, start_new_session=True,
                                           env=daemon_env()))
        time.sleep(seconds * 0.7)  # a benchmark sampling memory while the guests work, not synchronisation
        result.host_rss_kb = rss_kb(host.pid)
        result.guest_rss_kb = [rss_kb(g.pid) for g in guests]
        for g in guests:
            result.clean &= g.wait(seconds + 120) == 0
    finally:
        for g in guests:
            if g.poll() is None:
                g.kill()
                g.wait()
        host.send_signal(signal.SIGTERM)
        try:
            result.clean &= host.wait(30) == 0
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()
            result.clean = False
    stats = Stats()
    for ev in read_merged([str(log_dir)]):
        stats.feed(ev)
        result.events += 1
        if ev["event"] == "guest_shutdown":
            result.accesses += ev.get("accesses", 0)
            result.count_work += ev.get("count_work", 0)
            result.count_ns += ev.get("count_ns", 0)
            result.exit_ns += ev.get("exit_ns", 0)
        elif ev["event"] == "guest_apf_wake" and not ev.get("all"):
            result.wakes += 1
    result.apfs = stats.apfs
    result.sync_faults = stats.sync_faults
    result.halts = stats.halts
    result.stats = stats
    if keep_logs is None:
        tmp.cleanup()
    return result
