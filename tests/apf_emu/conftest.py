from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def clean_logs(tmp_path_factory) -> Path:
    """The logs of a real, clean two-vCPU run on the signal transport (shared by the log-tool tests)."""
    log_dir = tmp_path_factory.mktemp("clean")
    proc = subprocess.run(
        [sys.executable, "-m", "apf_emu", "run", "--vcpus", "2", "--duration", "2", "--transport", "signal",
         "--log-dir", str(log_dir)],
        cwd=ROOT, capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    return log_dir
