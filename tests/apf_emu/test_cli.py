# apf-emu's command line: an option value outside its range is one line naming the option, exit 2, before anything
# starts (the table of every option of every command is the command-line issue's; these are the options added with
# shared pages).
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["run", "chaos"])
@pytest.mark.parametrize("value", ["1.5", "-0.1", "half", "nan"])
def test_a_bad_shared_ratio_is_a_usage_error(command, value):
    proc = subprocess.run([sys.executable, "-m", "apf_emu", command, "--shared-ratio", value], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--shared-ratio" in proc.stderr and "Traceback" not in proc.stderr
