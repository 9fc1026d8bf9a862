# `apf-emu logs list|prune` (apf_emu/logdirs.py): only directories holding apf-emu logs count; prune keeps the
# newest N and touches nothing else.
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from apf_emu.logdirs import log_dirs, prune

ROOT = Path(__file__).resolve().parents[2]


def make(root: Path, name: str, age_s: int, files: tuple[str, ...] = ("host.jsonl", "guest-0.jsonl")) -> Path:
    d = root / name
    d.mkdir()
    for f in files:
        (d / f).write_bytes(b'{"event": "e", "mono_ns": 1}\n')
        os.utime(d / f, (1_700_000_000 - age_s, 1_700_000_000 - age_s))
    return d


def test_prune_keeps_the_newest_log_directories_and_nothing_else_is_touched(tmp_path):
    old, mid, new = make(tmp_path, "run1", 300), make(tmp_path, "chaos2", 200, ("host.9.jsonl.gz",)), \
        make(tmp_path, "run3", 100)
    mixed = make(tmp_path, "run0", 400, ("host.jsonl", "guest-1.4.jsonl.gz", "harness.jsonl", "notes.txt"))
    others = [make(tmp_path, "notes", 1000, ("README.txt",)), make(tmp_path, "proj", 900, ("build.log", "main.c")),
              make(tmp_path, "data", 800, ("data.jsonl",))]
    assert [d.path for d in log_dirs(tmp_path)] == [mixed, old, mid, new]
    removed = prune(tmp_path, keep=2)
    assert [d.path for d in removed] == [mixed, old]
    assert not old.exists() and mid.exists() and new.exists()
    assert sorted(p.name for p in mixed.iterdir()) == ["notes.txt"]  # not apf-emu's: kept, and so the directory
    assert all(sorted(p.name for p in d.iterdir()) for d in others)  # untouched
    assert (tmp_path / "proj" / "build.log").exists() and (tmp_path / "data" / "data.jsonl").exists()
    assert prune(tmp_path, keep=5) == []


def test_logs_command_lists_and_prunes(tmp_path):
    make(tmp_path, "run1", 300)
    make(tmp_path, "run2", 100)
    listing = subprocess.run([sys.executable, "-m", "apf_emu", "logs", "list", "--root", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "run1" in listing.stdout and "2 log directories" in listing.stdout
    pruned = subprocess.run([sys.executable, "-m", "apf_emu", "logs", "prune", "--keep", "1", "--root",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert pruned.returncode == 0 and "removed 1 log directories" in pruned.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run2"]
