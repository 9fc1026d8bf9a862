# `apf-emu campaign` end to end, as the acceptance asks on a small scale: real cases (each an `apf-emu
# chaos` of real processes), one scenario that injects a failure (bz208081's buggy host), SIGINT in the middle,
# nothing left behind, a resume that runs only what was not recorded, and a report that names every failing seed.
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson

from tests.conftest import processes_mentioning

from .helpers import ROOT, wait_until

CASES = ["--seeds", "1-2", "--scenarios", "none,bz208081", "--duration", "2.5", "--vcpus", "2", "--parallel", "2"]


def campaign(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "apf_emu", "campaign", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})


def recorded(out: Path) -> list[str]:
    path = out / "results.jsonl"
    return [orjson.loads(line)["case"] for line in path.read_bytes().splitlines()] if path.exists() else []


def test_a_campaign_is_interrupted_resumed_and_reports_its_failing_seeds(tmp_path: Path) -> None:
    out = tmp_path / "campaign"
    (tmp_path / "tmp").mkdir()
    first = campaign(tmp_path, *CASES, "--out", str(out))
    wait_until(lambda: len(recorded(out)) >= 1, 120, "the first case's record", interval=0.1)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr.decode()[-2000:]
    assert b"interrupted by SIGINT" in stdout and b"stopping the" in stderr
    # Nothing of the interrupted cases is left: their processes, their shm (VM ids cp<campaign pid>-<index>),
    # their sockets' directories, their partial logs.
    vms = f"cp{first.pid}-"
    assert processes_mentioning(vms) == []
    assert [n for n in os.listdir("/dev/shm") if vms in n] == []
    assert list((tmp_path / "tmp").iterdir()) == []
    done = recorded(out)
    assert 1 <= len(done) < 4, (out / "results.jsonl").read_text()
    assert sorted(p.name for p in (out / "cases").iterdir()) == \
        sorted(c for c in done if c.endswith("bz208081")), \
        ("a stopped case's logs were left", [str(p) for p in (out / "cases").rglob("*")], stderr.decode()[-3000:])

    second = campaign(tmp_path, *CASES, "--out", str(out), "--json")
    stdout, stderr = second.communicate(timeout=180)
    summary = orjson.loads(stdout.splitlines()[-1])
    assert (summary["skipped"], summary["run_now"]) == (len(done), 4 - len(done)), stderr.decode()[-2000:]
    assert second.returncode == 1  # the buggy host's cases fail
    assert Counter(recorded(out)) == Counter({"s1-int": 1, "s2-int": 1, "s1-int-bz208081": 1, "s2-int-bz208081": 1})
    assert sorted(summary["failing"]) == ["s1-int-bz208081", "s2-int-bz208081"]
    assert processes_mentioning(f"cp{second.pid}-") == []

    report = subprocess.run([sys.executable, "-m", "apf_emu", "campaign", "report", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 1, report.stderr
    table = report.stdout.split("failing cases")[0]
    row = next(line for line in table.splitlines() if line.startswith("ready_for_injected_only"))
    assert row.split()[1] == "2" and row.endswith("int bz208081: 1-2"), row  # both failing seeds, by invariant
    for case in ("s1-int-bz208081", "s2-int-bz208081"):
        assert case in report.stdout
    assert "apf-emu chaos --seed 2 --abi int --duration 2.5 --vcpus 2" in report.stdout
    assert "s1-int " not in report.stdout.split("failing cases")[1]  # a passing case is not listed as failing
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
