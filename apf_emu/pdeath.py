# What a child process is set up with between fork and exec. PR_SET_PDEATHSIG, for the VMs the Python API starts
# (apf_emu/api.py) and the shards of a split check (apf_emu/shards.py), so that not even a SIGKILLed parent leaves
# one running; and SIGINT ignored, for a campaign's cases (apf_emu/campaign.py), so that a stop that reaches a case
# while its Python is still starting is not a KeyboardInterrupt halfway through its set-up (a harness takes SIGINT
# as its own once it is ready, and the campaign sends it again until the case has stopped).
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


_SIG_IGN: Final = 1


def sigint_ignored() -> None:
    """In the child: SIGINT ignored, which exec keeps and Python then leaves alone (libc's signal(2): Python's
    signal.signal works in the main thread only, and the fork may be a worker thread's)."""
    _LIBC.signal(signal.SIGINT, _SIG_IGN)
