# The transports: how the host gets *into* a guest (the injection of a #PF, an interrupt on a vector). Everything
# that needs a reply stays on the Unix socket for all of them (docs/PROTOCOL.md, sections 2 and 7).
#
# This is the registry: one name per transport, used by every parser (the `transport` option, the `hello` field) and
# by both sides' factories, which load the backend module of that name: host_daemon/transports/<name>.py (a
# `Notifier`) and guest_agent/transports/<name>.py (a guest `Transport`). Adding a transport is this list and those
# two modules, and nothing else; tests/test_transports.py checks that both sides have a backend for every name.
from __future__ import annotations

from typing import Final

TRANSPORTS: Final = ("socket", "signal")
DESCRIPTIONS: Final = {
    "socket": "#PF injection and interrupts are msgpack frames on the vCPU's socket",
    "signal": "#PF injection and interrupts are POSIX real-time signals, their payload in the control block",
}
