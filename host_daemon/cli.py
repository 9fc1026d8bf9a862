# `apf-host`: run the host daemon of one VM. Options also read from APF_EMU_* environment variables (for compose).
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from shared import log as slog
from shared.guest_ram import check_vm_id

from .daemon import HostConfig, serve
from .pager import PageInLatency


def env(name: str, default: str) -> str:
    return os.environ.get(f"APF_EMU_{name.upper()}", default)


def page_in_latency(text: str) -> PageInLatency:
    try:
        return PageInLatency.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apf-host",
        description="The apf-emu host daemon: owns guest RAM in POSIX shm, pages memory in and out, and runs the "
        "KVM async page fault protocol (MSR_KVM_ASYNC_PF_EN/_INT/_ACK, not-present #PF, page-ready interrupt) "
        "for every guest agent that connects to its Unix socket. Stops cleanly on SIGTERM or SIGINT.",
    )
    p.add_argument("--vm", default=env("vm", "vm0"), type=check_vm_id, help="VM id; names the shm object (%(default)s)")
    p.add_argument("--socket", type=Path, default=Path(env("socket", "/tmp/apf-emu-vm0.sock")),
                   help="Unix socket to listen on (%(default)s)")
    p.add_argument("--vcpus", type=int, default=env("vcpus", "2"), help="vCPU slots (%(default)s)")
    p.add_argument("--pages", type=int, default=env("pages", "512"), help="guest RAM in 4 KiB pages (%(default)s)")
    p.add_argument("--resident", type=int, default=env("resident", "384"),
                   help="host resident limit in pages, below --pages (%(default)s)")
    p.add_argument("--page-in-latency", type=page_in_latency, default=env("page_in_latency", "exp:2ms"),
                   help="page-in latency: 0, fixed:T, exp:MEAN or uniform:LO:HI (default exp:2ms)")
    p.add_argument("--seed", type=int, default=env("seed", "0"), help="random seed (%(default)s)")
    p.add_argument("--log-dir", type=Path, default=Path(env("log_dir", "")) if env("log_dir", "") else None,
                   help="write host.jsonl here")
    p.add_argument("--recover", action="store_true", default=env("recover", "") == "1",
                   help="take over the VM of a host that was killed: keep guest RAM, the swap and the saved vCPU "
                   "registers, rebuild residency from them, and restore each vCPU when its guest reconnects")
    p.add_argument("--log-stdout", action="store_true", default=env("log_stdout", "") == "1",
                   help="also write JSON log lines to stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = HostConfig(
        vm=args.vm, socket=args.socket, vcpus=args.vcpus, pages=args.pages, resident=args.resident,
        latency=args.page_in_latency, seed=args.seed, log_dir=args.log_dir, log_stdout=args.log_stdout,
        recover=args.recover,
    )
    try:
        config.validate()
    except ValueError as exc:
        print(f"apf-host: {exc}", file=sys.stderr)
        return 2
    slog.configure(args.log_dir / "host.jsonl" if args.log_dir else None, stdout=args.log_stdout)
    try:
        trio.run(serve, config)
    except (OSError, ValueError) as exc:
        print(f"apf-host: {exc}", file=sys.stderr)
        return 1
    finally:
        slog.close()
    return 0
