# The machine set-up scripts the container tests start from (scripts/prepare-docker, scripts/prepare-podman): each
# prints the image to use as its last line, and exits 77 when what it prepares cannot be had here (the test skips).
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNAVAILABLE = 77


def prepared(script: str, what: str) -> str:
    proc = subprocess.run([str(ROOT / "scripts" / script)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=1200)
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"{what} cannot be had on this machine: {proc.stderr.strip()[-600:]}")
    assert proc.returncode == 0, f"scripts/{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]
