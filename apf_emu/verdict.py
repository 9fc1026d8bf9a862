# The verdict on logs: every event read in order (apf_emu/logs.py) is fed to the checker and to the statistics
# alike, so that `run`, `chaos`, `check`, `compare` and `scenario` judge logs the same way.
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checker import Checker, Violation
from .logs import LogInputError, ReadReport, read_merged
from .stats import Stats


def analyse(paths: Sequence[str], **checker_options: Any) -> tuple[list[Violation], Stats, ReadReport, Checker]:
    report = ReadReport()
    checker = Checker(**checker_options)
    stats = Stats()
    for ev in read_merged(paths, report):
        checker.feed(ev)
        stats.feed(ev)
    return checker.finish(), stats, report, checker


def analyse_run(log_dir: Path) -> tuple[list[Violation], Stats, ReadReport, Checker]:
    """The verdict on a run's own logs, judged with the settings it recorded. Logs that are not there yet (a run
    stopped before anything logged) check nothing, which the verdict says."""
    try:
        return analyse([str(log_dir)])
    except LogInputError:
        return [], Stats(), ReadReport(), Checker()
