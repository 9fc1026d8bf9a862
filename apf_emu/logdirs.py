# `apf-emu logs`: the log directories that `run` and `chaos` leave under apf-emu-logs/ (one per VM), listed with
# their size, or pruned to the newest N. Only a directory that holds apf-emu logs counts as one; nothing else
# under the root is listed or removed.
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shared.logfile import is_log_file

DEFAULT_ROOT = Path("apf-emu-logs")


@dataclass(frozen=True)
class LogDir:
    path: Path
    files: int
    size: int  # bytes
    mtime: float  # the newest file's

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.mtime))
        return f"{self.path.name:32} {human_size(self.size):>10} {self.files:6} files  {when}"


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def volume(path: Path) -> tuple[int, int]:
    """Log files and their bytes in one directory."""
    files = [f for f in path.iterdir() if f.is_file() and is_log_file(f)]
    return len(files), sum(f.stat().st_size for f in files)


def log_dirs(root: Path) -> list[LogDir]:
    """The apf-emu log directories under `root`, oldest first."""
    found: list[LogDir] = []
    if not root.is_dir():
        return found
    for d in root.iterdir():
        if not d.is_dir() or d.is_symlink():
            continue
        files = [f for f in d.iterdir() if f.is_file() and is_log_file(f)]
        if files:
            stats = [f.stat() for f in files]
            found.append(LogDir(d, len(files), sum(s.st_size for s in stats), max(s.st_mtime for s in stats)))
    return sorted(found, key=lambda x: (x.mtime, x.path.name))


def prune(root: Path, keep: int) -> list[LogDir]:
    """Remove all but the `keep` newest log directories; returns those removed."""
    dirs = log_dirs(root)
    doomed = dirs[: max(0, len(dirs) - keep)]
    for d in doomed:
        shutil.rmtree(d.path)
    return doomed
