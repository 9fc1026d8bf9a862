# `apf-host`: run the host daemon of one VM. Its options (and their APF_EMU_* variables) are shared/config.py's.
from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from shared import log as slog
from shared.config import EXIT_FAILED, EXIT_OK, HOST_OPTIONS, HostOptions, parse_daemon_args, with_
from shared.guest_ram import vm_state_left
from shared.logfile import log_path
from shared.snapshot import VcpuState

from .daemon import serve
from .snapshot import SnapshotError, restore_images

DESCRIPTION = (
    "The apf-emu host daemon: owns guest RAM in POSIX shm, pages memory in and out, and runs the KVM async page "
    "fault protocol (MSR_KVM_ASYNC_PF_EN/_INT/_ACK, not-present #PF, page-ready interrupt) for every guest agent "
    "that connects to its Unix socket. Every option can also be given as APF_EMU_<OPTION> (e.g. APF_EMU_VCPUS=4). "
    "Stops cleanly on SIGTERM or SIGINT. Exit status: 0 clean stop, 2 bad usage, 3 it could not run."
)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_daemon_args("apf-host", DESCRIPTION, HOST_OPTIONS, argv, HostOptions)
    if opts.recover_if_present and not opts.recover and vm_state_left(opts.vm):
        opts = with_(opts, recover=True)  # restarted by a supervisor after a kill: take the VM over
    states: list[VcpuState] = []
    if opts.restore is not None:
        try:
            manifest = restore_images(opts.restore, opts.vm, opts.pages, opts.vcpus, opts.abi)
        except SnapshotError as exc:
            print(f"apf-host: --restore: {exc}", file=sys.stderr)
            return EXIT_FAILED
        opts = with_(opts, recover=True)
        states = list(manifest.vcpu_states)
    slog.configure(log_path(opts.log_dir, "host", opts.log_compress) if opts.log_dir else None,
                   stdout=opts.log_stdout, compression=opts.log_compress)
    try:
        trio.run(serve, opts, states)
    except (OSError, ValueError) as exc:
        print(f"apf-host: VM {opts.vm} on {opts.socket}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        slog.close()
    return EXIT_OK
