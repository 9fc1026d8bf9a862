# A child process that dies with its parent: PR_SET_PDEATHSIG, for the VMs the Python API starts (apf_emu/api.py)
# and the shards of a split check (apf_emu/shards.py), so that not even a SIGKILLed parent leaves one running.
from __future__ import annotations

import ctypes
import os
import signal
from typing import Final

_PR_SET_PDEATHSIG: Final = 1
_LIBC: Final = ctypes.CDLL(None, use_errno=True)  # resolved here: a child between fork and exec only calls it


def die_with_parent(parent: int) -> None:
    """In the child: SIGTERM when the thread that started it ends (with its process, however it dies). A parent
    already gone before the prctl (the child is then an orphan, see prctl(2)) sends nothing: the child ends at
    once."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)
