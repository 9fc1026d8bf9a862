# The guest's transports: one module per name in shared/transports.py, guest_agent/transports/<name>.py, each
# defining a `Transport` on base.py's; `open_transport` loads the one the guest was told to use. (This file imports
# no module named like a backend: importing guest_agent.transports.signal sets this package's `signal` attribute.)
from __future__ import annotations

import importlib
from pathlib import Path

from shared.transports import TRANSPORTS

from .base import ExitReply, GuestError, HostGone, MsrReply, Transport

__all__ = ["ExitReply", "GuestError", "HostGone", "MsrReply", "Transport", "open_transport"]


def open_transport(name: str, path: Path, connect_timeout: float, reconnect_timeout: float = 30.0) -> Transport:
    """The `Transport` of guest_agent/transports/<name>.py, connected to the host."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}")
    module = importlib.import_module(f"{__name__}.{name}")
    transport: Transport = module.Transport(path, connect_timeout, reconnect_timeout)
    return transport
