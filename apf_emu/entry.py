# `apf-emu`'s entry point, kept free of imports: a Ctrl-C while Python is still importing the tools (trio, orjson,
# the checker: a few tenths of a second) ends the command with status 130 and one line, not a traceback.
from __future__ import annotations

import signal
import sys


def main() -> int:
    # SIGINT is held back while the tools are imported (an interrupt inside an extension module's import can do
    # worse than raise), then let through at once.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        try:
            from .cli import main as cli_main
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    except KeyboardInterrupt:
        print("apf-emu: interrupted", file=sys.stderr)
        return 130
    try:
        return cli_main()
    except KeyboardInterrupt:  # (cli_main handles its own; this is for a Ctrl-C at its very end)
        return 130
