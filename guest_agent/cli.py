# `apf-guest`: run the guest kernel of one vCPU. Its options (and their APF_EMU_* variables) are shared/config.py's.
#
# A supervisor may stop a guest at any moment, also while Python is still importing it: `main` notes SIGTERM and
# SIGINT from its first line on, before it imports the kernel, and the kernel then boots only to shut down cleanly.
from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType

from shared.config import EXIT_FAILED, GUEST_OPTIONS, GuestOptions, parse_daemon_args

DESCRIPTION = (
    "An apf-emu guest agent: the guest kernel of one vCPU. Connects to the host daemon, enables async page faults "
    "(MSR_KVM_ASYNC_PF_INT, then MSR_KVM_ASYNC_PF_EN), runs tasks that write and verify guest RAM, sleeps tasks on "
    "not-present #PFs and wakes them on page-ready interrupts. On SIGTERM/SIGINT it stops starting work, waits for "
    "sleeping tasks to be woken, disables APF and exits 0. SIGUSR1 panics (crash path: APF disabled without "
    "waiting, exit 70: boot a kdump kernel next); SIGUSR2 reboots (exit 71). If the host goes away it reconnects "
    "as the same boot and retries. Every option can also be given as APF_EMU_<OPTION>. Exit status: 0 clean stop, "
    "2 bad usage, 3 it could not go on, 70 panic, 71 reboot."
)


def main(argv: Sequence[str] | None = None) -> int:
    early: list[int] = []

    def note_stop(signum: int, _frame: FrameType | None) -> None:
        early.append(signum)

    previous = {s: signal.signal(s, note_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv, early)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: Sequence[str] | None, early: list[int]) -> int:
    from shared import log as slog

    from .kernel import GuestError, GuestKernel

    opts = parse_daemon_args("apf-guest", DESCRIPTION, GUEST_OPTIONS, argv, GuestOptions)
    kernel = GuestKernel(opts)
    try:
        kernel.run(stops_before_run=early)
    except (GuestError, OSError) as exc:
        print(f"apf-guest: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        slog.close()
    return kernel.exit_code
