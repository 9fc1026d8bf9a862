# What the host can know of a guest process from outside: whether its pid still names a live process. The host
# learns a guest's pid from the kernel (SO_PEERCRED at connect); 0 means the guest is in a PID namespace the host
# cannot see, and then nothing can be known. A recycled pid looks alive, which errs on the safe side wherever this
# is used (the host waits for, or refuses to replace, a guest it cannot prove dead).
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if `pid` (> 0) names a process (perhaps a zombie, perhaps one that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
