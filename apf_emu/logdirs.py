# `apf-emu logs`: the log directories that `run` and `chaos` leave under apf-emu-logs/ (one per VM), listed with
# their size, or pruned to the newest N. A directory counts only if it holds files named as apf-emu names its logs
# (host*.jsonl[.gz], guest-N*.jsonl[.gz], harness.jsonl); pruning removes those files, and the directory only if
# nothing else is left in it.
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from shared.logfile import log_files

DEFAULT_ROOT = Path("apf-emu-logs")


@dataclass(frozen=True)
class LogDir:
    path: Path
    files: tuple[Path, ...]
    size: int  # bytes
    mtime: float  # the newest file's

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.mtime))
        return f"{self.path.name:32} {human_size(self.size):>10} {len(self.files):6} files  {when}"


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def volume(path: Path) -> tuple[int, int]:
    """apf-emu's log files and their bytes in one directory."""
    files = log_files(path, apf_emu_only=True)
    return len(files), sum(f.stat().st_size for f in files)


def log_dirs(root: Path) -> list[LogDir]:
    """The apf-emu log directories under `root`, oldest first."""
    found: list[LogDir] = []
    for d in root.iterdir():
        if not d.is_dir() or d.is_symlink():
            continue
        files = log_files(d, apf_emu_only=True)
        if files:
            stats = [f.stat() for f in files]
            found.append(LogDir(d, tuple(files), sum(s.st_size for s in stats), max(s.st_mtime for s in stats)))
    return sorted(found, key=lambda x: (x.mtime, x.path.name))


def prune(root: Path, keep: int) -> list[LogDir]:
    """Remove the logs of all but the `keep` newest log directories (and each directory, if that empties it);
    returns those pruned."""
    dirs = log_dirs(root)
    doomed = dirs[: max(0, len(dirs) - keep)]
    for d in doomed:
        for f in d.files:
            f.unlink(missing_ok=True)
        if not any(d.path.iterdir()):
            d.path.rmdir()
    return doomed
