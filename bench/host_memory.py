"""Does the host keep state for dead boots? Its RSS after 1,000 guest kill/restart cycles against after 100.

Each cycle is what a killed-and-restarted guest does to the host: connect as the next boot of vCPU 0, enable
the LAPIC, program MSR_KVM_ASYNC_PF_INT and _EN, take the wake-all, take a few async page faults, and vanish
without a word (the socket is reset with page-ins in flight, exactly what the host sees when a guest process is
SIGKILLed). A raw wire client does it in-process because starting 1,000 Python guest processes would measure
process start-up, not the host.
Usage:  .venv/bin/python bench/host_memory.py [--cycles 1000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

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
from shared.blocking_channel import BlockingChannel
from shared.config import HostOptions, PageInLatency
from shared.guest_ram import GuestRam, RamLayout
from shared.wire import PROTOCOL_VERSION, ExitMem, Hello, InjectException, Interrupt, Message, MsrWrite

ROOT = Path(__file__).resolve().parents[1]
PAGES, RESIDENT = 512, 128


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Client(BlockingChannel):
    def __init__(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        super().__init__(sock)

    def request(self, msg: Message) -> Message:
        """The reply, skipping the page-ready interrupts that come first."""
        self.send(msg)
        while True:
            reply: Message | None = self.receive()
            assert reply is not None
            if not isinstance(reply, Interrupt):
                return reply

    def kill(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, like a dead process
        self.close()


def cycle(path: Path, vm: str, boot: int, area: KvmVcpuPvApfData, rng: random.Random) -> None:
    c = Client(path)
    c.request(Hello(PROTOCOL_VERSION, vm, 0, boot, "normal", os.getpid(), "socket"))
    c.request(MsrWrite(MSR_X2APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_APIC_VECTOR))
    c.request(MsrWrite(MSR_KVM_ASYNC_PF_INT, 0xF3))
    c.request(MsrWrite(MSR_KVM_ASYNC_PF_EN, async_pf_en_value(0)))
    area.token = 0  # take the wake-all
    c.request(MsrWrite(MSR_KVM_ASYNC_PF_ACK, 1))
    for _ in range(5):
        reply = c.request(ExitMem(rng.randrange(1, PAGES) * 4096, True, True, True))
        if isinstance(reply, InjectException):
            area.flags = 0
    c.kill()


def measure(cycles: int) -> dict[str, float]:
    vm = f"bench{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="apf-bench-") as tmp:
        sock = Path(tmp) / "host.sock"
        host = subprocess.Popen(HostOptions(vm=vm, socket=sock, vcpus=1, pages=PAGES, resident=RESIDENT,
                                            page_in_latency=PageInLatency.parse("fixed:5ms")).argv(), cwd=ROOT)
        try:
            while not sock.exists():
                time.sleep(0.01)
            ram = GuestRam.open(vm, RamLayout(PAGES))
            area = KvmVcpuPvApfData(ram.u32, 0)
            rng = random.Random(0)
            marks = {}
            marks_at = sorted({100, cycles // 2, cycles})
            for boot in range(1, cycles + 1):
                cycle(sock, vm, boot, area, rng)
                if boot in marks_at:
                    time.sleep(0.5)  # let the host finish the resets and the page-ins the dead guests left
                    marks[boot] = rss_kb(host.pid)
            area.release()
            ram.close()
        finally:
            host.send_signal(signal.SIGTERM)
            host.wait(10)
    out: dict[str, float] = {f"rss_kb_after_{n}": kb for n, kb in marks.items()}
    out["growth"] = round(marks[cycles] / marks[100] - 1, 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = measure(args.cycles)
    if args.json:
        print(json.dumps(result))
    else:
        marks = ", ".join(f"{k.removeprefix('rss_kb_after_')} cycles {v} kB"
                          for k, v in result.items() if k != "growth")
        print(f"host RSS after {marks}: {result['growth']:+.1%} from 100 to {args.cycles}")


if __name__ == "__main__":
    main()
