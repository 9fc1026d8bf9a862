# The transports: how the host gets *into* a guest (an exception such as the #PF of a not-present, an interrupt on a
# vector). Everything that needs a reply stays on the Unix socket for all of them (docs/PROTOCOL.md, sections 2 and
# 7). This module is the axis: the registry of names, and the two interfaces each transport implements.
#
# Every parser (the guests' `--transport`, the `hello` field) takes its names from TRANSPORTS, and both sides'
# factories load the backend module of that name: host_daemon/transports/<name>.py (a `Notifier` class) and
# guest_agent/transports/<name>.py (a `Transport` class, on guest_agent/transports/__init__.py's base). Adding a
# transport is this tuple and those two modules, and nothing else; tests/test_layout.py checks that both sides have
# a backend for every name.
from __future__ import annotations

from typing import Final, Protocol

TRANSPORTS: Final = ("socket", "signal")
DESCRIPTIONS: Final = {
    "socket": "exceptions and interrupts are msgpack frames on the vCPU's socket",
    "signal": "exceptions and interrupts are POSIX real-time signals, their payload in the control block",
}


class Notifier(Protocol):
    """The host's end: one per connection, made at the handshake (host_daemon/transports/__init__.py)."""

    transport: str

    async def inject_exception(self, vector: int, cr2: int) -> None:
        """An exception at the vCPU's entry (14: #PF, CR2 the token of a not-present); for an EPT-violation exit it
        is the exit's reply."""

    async def interrupt(self, vector: int) -> None:
        """Raise `vector`: the guest takes it when its IF and context allow."""

    def close(self) -> None:
        """The connection ended: nothing is delivered any more."""

