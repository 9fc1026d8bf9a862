# How the host gets into a guest, per transport (shared/transports.py names them and defines the `Notifier`
# interface): one module per transport, host_daemon/transports/<name>.py, each defining a `Notifier` class;
# `make_notifier` loads the one a guest's hello names.
from __future__ import annotations

import importlib

from shared.channel import MessageChannel
from shared.transports import TRANSPORTS, Notifier

__all__ = ["Notifier", "make_notifier"]


def make_notifier(transport: str, chan: MessageChannel, ctl: memoryview, pid: int) -> Notifier:
    """The notifier of `transport` for one connection; OSError if it cannot be made (e.g. no pidfd for pid)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    module = importlib.import_module(f"{__name__}.{transport}")
    notifier: Notifier = module.Notifier(chan, ctl, pid)
    return notifier
