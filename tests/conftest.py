from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


class EventLog:
    """A stand-in for a structlog bound logger that records (event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def _log(self, event: str, **kw: object) -> None:
        self.events.append((event, kw))

    info = warning = error = _log

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


@pytest.fixture
def event_log() -> EventLog:
    return EventLog()


@pytest.fixture
def vm_id() -> str:
    return f"test{os.getpid()}x{random.randrange(1 << 30)}"


def processes_mentioning(text: str) -> list[int]:
    """PIDs (other than ours) whose command line contains `text`: what a test or a run may have left running."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids
