# apf-emu's command lines, wrong on purpose: every command, every kind of bad input (values out of range, negative
# counts, bad paths, bad APF_EMU_* variables). Each must end before anything starts: exit 2, one line on stderr that
# names the option, variable or path, no traceback, and nothing left behind (no shm segment, socket, process or
# directory).
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
VM = f"clitest{os.getpid()}"
A_FILE = str(Path(__file__))  # a file where a directory is wanted

CASES = [
    # (program words, extra environment, what the one line must name)
    (["apf_emu", "run", "--page-in-latency", "foo"], {}, "--page-in-latency"),
    (["apf_emu", "run", "--page-in-latency", "uniform:5ms:1ms"], {}, "--page-in-latency"),
    (["apf_emu", "run", "--resident", "1000"], {}, "--resident"),
    (["apf_emu", "run", "--pages", "0"], {}, "--pages"),
    (["apf_emu", "run", "--kernel-ratio", "1.5"], {}, "--kernel-ratio"),
    (["apf_emu", "run", "--shared-ratio", "nan"], {}, "--shared-ratio"),
    (["apf_emu", "run", "--tasks", "0"], {}, "--tasks"),
    (["apf_emu", "run", "--vector", "300"], {}, "--vector"),
    (["apf_emu", "run", "--apf-reinit-every", "-1"], {}, "--apf-reinit-every"),
    (["apf_emu", "run", "--duration", "0"], {}, "--duration"),
    (["apf_emu", "run", "--vm", "no spaces!"], {}, "--vm"),
    (["apf_emu", "run", "--log-dir", "/proc/nope"], {}, "/proc/nope"),
    (["apf_emu", "run", "--log-dir", A_FILE], {}, A_FILE),
    (["apf_emu", "compare", "--abis", "int,nope"], {}, "--abis"),
    (["apf_emu", "compare", "--abis", "pf,pf"], {}, "--abis"),
    (["apf_emu", "compare", "--entry-fault-ratio", "2"], {}, "--entry-fault-ratio"),
    (["apf_emu", "compare", "--log-dir", "/proc/nope"], {}, "/proc/nope"),
    (["apf_emu", "run", "--bugs", "bz208081,nope"], {}, "--bugs"),
    (["apf_emu", "scenario", "run"], {}, "one NAME or --all"),
    (["apf_emu", "scenario", "run", "bz208081", "--all"], {}, "one NAME or --all"),
    (["apf_emu", "scenario", "run", "nope"], {}, "NAME"),
    (["apf_emu", "scenario", "list", "bz208081"], {}, "list takes no scenario"),
    (["apf_emu", "scenario", "run", "bz208081", "--transport", "pigeon"], {}, "--transport"),
    (["apf_emu", "scenario", "run", "bz208081", "--buggy", "--fixed"], {}, "--fixed"),
    (["apf_emu", "scenario", "run", "bz208081", "--log-dir", "/proc/nope"], {}, "/proc/nope"),
    (["apf_emu", "snapshot", "--msrs", "MSR_NOPE", "snap"], {}, "--msrs"),
    (["apf_emu", "snapshot", "--msrs", "0x10-0x5", "snap"], {}, "bad MSR range"),
    (["apf_emu", "restore", "/nonexistent/snap"], {}, "/nonexistent/snap"),
    (["apf_emu", "chaos", "--tasks", "0"], {}, "--tasks"),
    (["apf_emu", "chaos", "--page-in-latency", "bogus"], {}, "--page-in-latency"),
    (["apf_emu", "chaos", "--guest-kills", "-1"], {}, "--guest-kills"),
    (["apf_emu", "chaos", "--log-dir", "/proc/nope"], {}, "/proc/nope"),
    (["apf_emu", "chaos", "--scenario", "firecracker-snapshot-msrs"], {}, "--scenario"),
    (["apf_emu", "chaos", "--scenario", "bz208081:maybe"], {}, "--scenario"),
    (["apf_emu", "campaign"], {}, "--seeds"),
    (["apf_emu", "campaign", "--seeds", "5-1"], {}, "--seeds"),
    (["apf_emu", "campaign", "--seeds", "1", "--scenarios", "nope"], {}, "--scenarios"),
    (["apf_emu", "campaign", "--seeds", "1", "--out", A_FILE], {}, A_FILE),
    (["apf_emu", "campaign", "report", "/nonexistent/campaign"], {}, "/nonexistent/campaign"),
    (["apf_emu", "campaign", "collect", "/nonexistent/campaign"], {}, "/nonexistent/campaign"),
    (["apf_emu", "pod", "host", "--seeds", "1"], {}, "JOB_COMPLETION_INDEX"),
    (["apf_emu", "pod", "guest", "--seeds", "1", "--index", "0"], {}, "--vcpu"),
    (["apf_emu", "pod", "host", "--seeds", "1", "--index", "3"], {}, "index 3"),
    (["apf_emu", "check", "--ready-latency-limit", "-5", "x"], {}, "--ready-latency-limit"),
    (["apf_emu", "check", "--max-violations", "-1", "x"], {}, "--max-violations"),
    (["apf_emu", "check", "/nonexistent/logs"], {}, "/nonexistent/logs"),
    (["apf_emu", "stats", "/nonexistent/logs"], {}, "/nonexistent/logs"),
    (["apf_emu", "trace", ".", "-o", "/nonexistent/dir/x.json"], {}, "/nonexistent/dir"),
    (["apf_emu", "trace", ".", "-o", "/etc"], {}, "/etc"),
    (["apf_emu", "bench", "--json", "/nonexistent/dir/b.json"], {}, "/nonexistent/dir"),
    (["apf_emu", "bench", "--replot", "/nonexistent.json", "--plots", "plots"], {}, "/nonexistent.json"),
    (["apf_emu", "bench", "--quick", "--plots", A_FILE], {}, A_FILE),
    (["apf_emu", "run", "--log-compress", "zip"], {}, "--log-compress"),
    (["apf_emu", "logs", "prune"], {}, "--keep"),
    (["apf_emu", "logs", "prune", "--keep", "-1"], {}, "--keep"),
    (["apf_emu", "logs", "tidy"], {}, "action"),
    (["apf_emu", "run", "--vm", VM], {"APF_EMU_LOG_COMPRESS": "bogus"}, "APF_EMU_LOG_COMPRESS"),
    (["apf_emu", "chaos", "--vm", VM], {"APF_EMU_TASKS": "0"}, "APF_EMU_TASKS"),
    (["apf_emu", "run", "--vm", VM], {"TMPDIR": "<LONG>"}, "TMPDIR"),
    (["apf_emu", "logs", "list", "--root", A_FILE], {}, "--root"),
    (["apf_emu", "trace", "<LOG>", "-o", "<LOG>"], {}, "is one of the logs"),
    (["host_daemon", "--vm", VM, "--socket", "/nonexistent/dir/h.sock"], {}, "/nonexistent/dir"),
    (["host_daemon", "--vm", VM, "--vcpus", "0"], {}, "--vcpus"),
    (["host_daemon", "--vm", VM, "--bugs", "token-one"], {}, "--bugs"),
    (["host_daemon", "--vm", VM, "--log-dir", "/proc/nope"], {}, "/proc/nope"),
    (["host_daemon", "--vm", VM], {"APF_EMU_VCPUS": "abc"}, "APF_EMU_VCPUS"),
    (["host_daemon", "--vm", VM], {"APF_EMU_PAGE_IN_LATENCY": "soon"}, "APF_EMU_PAGE_IN_LATENCY"),
    (["guest_agent", "--vm", VM, "--vector", "999"], {}, "--vector"),
    (["guest_agent", "--vm", VM, "--transport", "pigeon"], {}, "--transport"),
    (["guest_agent", "--vm", VM], {"APF_EMU_TASKS": "0"}, "APF_EMU_TASKS"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths some cases need, outside each case's own (checked-empty) directory: a TMPDIR too long for a Unix
    socket under it, and a log file."""
    base = tmp_path_factory.mktemp("places")
    long = base / ("t" * 100)
    long.mkdir()
    log = base / "host.jsonl"
    log.write_text('{"event": "host_ready", "mono_ns": 1}\n')
    return {"<LONG>": str(long), "<LOG>": str(log)}


@pytest.mark.parametrize("words,env,names", CASES, ids=[" ".join(c[0][1:] or c[0]) + "".join(c[1]) for c in CASES])
def test_a_wrong_input_is_one_line_and_exit_2_before_anything_starts(tmp_path, places, words, env, names):
    words = [places.get(w, w) for w in words]
    env = {k: places.get(v, v) for k, v in env.items()}
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.run([sys.executable, "-m", *words], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("APF_EMU_")},
                               "TMPDIR": str(tmp_path), **env}, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and names in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "<lambda>" not in proc.stderr and "check_vm_id" not in proc.stderr
    assert set(os.listdir("/dev/shm")) == shm_before
    assert list(tmp_path.iterdir()) == [], "something was left in the working or temporary directory"
    assert processes_mentioning(VM) == []
