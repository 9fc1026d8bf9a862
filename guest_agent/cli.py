# `apf-guest`: run the guest kernel of one vCPU. Options also read from APF_EMU_* environment variables (for compose).
#
# A supervisor may stop a guest at any moment, also while Python is still importing it: `main` notes SIGTERM and
# SIGINT from its first line on, before it imports the kernel, and the kernel then boots only to shut down cleanly.
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from shared.guest_ram import check_vm_id


def env(name: str, default: str) -> str:
    return os.environ.get(f"APF_EMU_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apf-guest",
        description="An apf-emu guest agent: the guest kernel of one vCPU. Connects to the host daemon, enables "
        "async page faults (MSR_KVM_ASYNC_PF_INT, then MSR_KVM_ASYNC_PF_EN), runs tasks that write and verify "
        "guest RAM, sleeps tasks on not-present #PFs and wakes them on page-ready interrupts. On SIGTERM/SIGINT "
        "it stops starting work, waits for sleeping tasks to be woken, disables APF and exits 0. SIGUSR1 panics "
        "(crash path: APF disabled without waiting, exit 70: boot a kdump kernel next); SIGUSR2 reboots (exit 71). "
        "If the host goes away it reconnects as the same boot and retries.",
    )
    p.add_argument("--vm", default=env("vm", "vm0"), type=check_vm_id, help="VM id (%(default)s)")
    p.add_argument("--socket", type=Path, default=Path(env("socket", "/tmp/apf-emu-vm0.sock")),
                   help="the host daemon's Unix socket (%(default)s)")
    p.add_argument("--transport", choices=["socket", "signal"], default=env("transport", "socket"),
                   help="how #PF injection and interrupts reach the guest: socket frames or real-time signals "
                   "(%(default)s)")
    p.add_argument("--vcpu", type=int, default=env("vcpu", "-1"),
                   help="vCPU id to claim; default: the host assigns one")
    p.add_argument("--boot", type=int, default=env("boot", "0"),
                   help="boot number of this vCPU's kernel; default 0: the host numbers it (one more than the last "
                   "boot of that vCPU it saw)")
    p.add_argument("--kind", choices=["normal", "kdump"], default=env("kind", "normal"), help="kernel kind")
    p.add_argument("--tasks", type=int, default=env("tasks", "4"),
                   help="guest tasks that write and verify guest RAM (%(default)s)")
    p.add_argument("--counting-tasks", type=int, default=env("counting_tasks", "0"),
                   help="guest tasks that only count (CPU work, no memory): what a vCPU can run while others wait "
                   "for pages; their total is `count_work` in guest_shutdown (%(default)s)")
    p.add_argument("--vector", type=lambda s: int(s, 0), default=env("vector", "0xf3"),
                   help="page-ready vector written to MSR_KVM_ASYNC_PF_INT (default 0xf3)")
    p.add_argument("--send-always", action="store_true", default=env("send_always", "") == "1",
                   help="set KVM_ASYNC_PF_SEND_ALWAYS: accept APFs in kernel mode too")
    p.add_argument("--no-apf", dest="apf", action="store_false", default=env("apf", "1") == "1",
                   help="do not enable APF (like the no-kvmapf kernel parameter)")
    p.add_argument("--kernel-ratio", type=float, default=env("kernel_ratio", "0.1"),
                   help="share of accesses made in kernel mode (%(default)s)")
    p.add_argument("--irq-off-ratio", type=float, default=env("irq_off_ratio", "0.05"),
                   help="share of accesses that open an interrupts-off section (%(default)s)")
    p.add_argument("--shared-ratio", type=float, default=env("shared_ratio", "0.2"),
                   help="share of accesses that go to the pages every vCPU shares (a slot per vCPU in each); 0 "
                   "keeps every task on its own pages (%(default)s)")
    p.add_argument("--apf-reinit-every", type=float, default=None, metavar="SECONDS",
                   help="disable and re-enable APF this often, as CPU offline/online does (default never)")
    p.add_argument("--kdump-apf", action="store_true", default=env("kdump_apf", "") == "1",
                   help="with --kind kdump: the crash kernel enables APF afresh (default: it never does)")
    p.add_argument("--reconnect-timeout", type=float, default=30.0,
                   help="seconds to keep reconnecting when the host goes away (%(default)s)")
    p.add_argument("--seed", type=int, default=env("seed", "0"), help="random seed (%(default)s)")
    p.add_argument("--duration", type=float, default=None, help="stop by itself after this many seconds")
    p.add_argument("--log-dir", type=Path, default=Path(env("log_dir", "")) if env("log_dir", "") else None,
                   help="write guest-<vcpu>.jsonl here")
    p.add_argument("--log-stdout", action="store_true", default=env("log_stdout", "") == "1",
                   help="also write JSON log lines to stdout")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the host (%(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    early: list[int] = []

    def note_stop(signum: int, _frame: FrameType | None) -> None:
        early.append(signum)

    previous = {s: signal.signal(s, note_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv, early)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: list[str] | None, early: list[int]) -> int:
    from shared import log as slog

    from .kernel import GuestConfig, GuestError, GuestKernel

    args = build_parser().parse_args(argv)
    if not 1 <= args.tasks <= 1024 or not 0 <= args.counting_tasks <= 1024:
        print("apf-guest: --tasks must be 1..1024 and --counting-tasks 0..1024", file=sys.stderr)
        return 2
    if not 0 <= args.vector <= 255:
        print("apf-guest: --vector must be 0..255", file=sys.stderr)
        return 2
    if not (0 <= args.kernel_ratio <= 1 and 0 <= args.irq_off_ratio <= 1 and 0 <= args.shared_ratio <= 1):
        print("apf-guest: --kernel-ratio, --irq-off-ratio and --shared-ratio must be within 0..1", file=sys.stderr)
        return 2
    config = GuestConfig(
        vm=args.vm, socket=args.socket, transport=args.transport, apf_reinit_every=args.apf_reinit_every, vcpu=None if args.vcpu < 0 else args.vcpu, boot=args.boot, kind=args.kind,
        tasks=args.tasks, counting_tasks=args.counting_tasks, vector=args.vector, send_always=args.send_always, apf=args.apf, seed=args.seed,
        log_dir=args.log_dir, log_stdout=args.log_stdout, connect_timeout=args.connect_timeout,
        duration=args.duration, kernel_ratio=args.kernel_ratio, irq_off_ratio=args.irq_off_ratio,
        shared_ratio=args.shared_ratio,
        kdump_apf=args.kdump_apf, reconnect_timeout=args.reconnect_timeout,
    )
    kernel = GuestKernel(config)
    try:
        kernel.run(stops_before_run=early)
    except (GuestError, OSError) as exc:
        print(f"apf-guest: {exc}", file=sys.stderr)
        return 3
    finally:
        slog.close()
    return kernel.exit_code
