# The verdict on logs: every event read in order (apf_emu/logs.py) is fed to the checker and to the statistics
# alike, so that `run`, `chaos`, `compare` and `scenario` judge logs the same way; `check` reads with
# apf_emu/shards.py, the same checker split by vCPU, and `stats` feeds the statistics only.
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared import config

from .checker import Checker, Violation
from .logs import LogInputError, ReadReport, read_merged
from .stats import Stats


def analyse(paths: Sequence[str], *, check: bool = True,
            **checker_options: Any) -> tuple[list[Violation], Stats, ReadReport, Checker]:
    """Violations and statistics in one read (`check=False`: the statistics only, the checker left unfed)."""
    report = ReadReport()
    checker = Checker(**checker_options)
    stats = Stats()
    if check:
        for ev in read_merged(paths, report):
            checker.feed(ev)
            stats.feed(ev)
    else:
        for ev in read_merged(paths, report):
            stats.feed(ev)
    return checker.finish(), stats, report, checker


def analyse_run(log_dir: Path) -> tuple[list[Violation], Stats, ReadReport, Checker]:
    """The verdict on a run's own logs, judged with the settings it recorded. Logs that are not there yet (a run
    stopped before anything logged) check nothing, which the verdict says."""
    try:
        return analyse([str(log_dir)])
    except LogInputError:
        return [], Stats(), ReadReport(), Checker()


def verdict_status(violations: list[Violation], checker: Checker, *, failed: bool, interrupted: bool) -> int:
    """The exit status of `run` and `chaos`: 1 violations, 3 a process failed (or nothing was checked), 130 stopped
    by a signal before anything could be checked, else 0 (a run stopped by SIGINT or SIGTERM is judged as far as it
    got)."""
    if violations:
        return config.EXIT_VIOLATIONS
    if failed:
        return config.EXIT_FAILED
    if not checker.protocol_events:
        return config.EXIT_INTERRUPTED if interrupted else config.EXIT_FAILED
    return config.EXIT_OK
