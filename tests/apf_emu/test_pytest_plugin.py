# The pytest plugin (apf_emu/pytest_plugin.py), run as a VMM project would run it: a pytest of its own (pytester,
# in a subprocess, the plugin loaded from its entry point) on real processes. The README's example test runs as it
# stands; a violation fails the test at teardown; a failing or interrupted test leaves no process, shm object or
# socket behind.
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import processes_mentioning
from tests.integration.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- example: pytest plugin -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md has no pytest plugin example"
    return m.group(1)


def run_pytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=240)


def leftovers(vm: str, socket: str) -> list[str]:
    found = [f"process {pid}" for pid in processes_mentioning(vm)]
    found += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(f"apf-emu-{vm}-")]
    if os.path.exists(socket):
        found.append(socket)
    return found


def test_readme_example_runs_and_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vmm=readme_example())
    result = run_pytest(pytester)
    result.assert_outcomes(passed=2)


# A test that records where its VM lives, so that the outer test can look for what it left.
RECORDING = '''
import json, pathlib, pytest

def record(vm):
    pathlib.Path("vm.json").write_text(json.dumps({"vm": vm.name, "socket": str(vm.socket),
                                                  "pids": [vm.host.pid] + [v.pid for v in vm.vcpus]}))
'''


def test_violation_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    # token-zero (shared/bugs.py): the host before alloc_apf_token's fix hands out token 0 on vCPU 0.
    pytester.makepyfile(test_bug=RECORDING + '''
@pytest.mark.apf_vm(vcpus=1, pages=64, resident=16, bugs="token-zero")
def test_runs(apf_vm):
    record(apf_vm)
    apf_vm.wait_for("kvm_async_pf_not_present", n=300)
''')
    result = run_pytest(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*apf-emu: * violations over * events:*", "*token_format: *",
                                 "*apf-emu: logs in *apf-emu-logs*"])
    info = json.loads((pytester.path / "vm.json").read_text())
    assert leftovers(info["vm"], info["socket"]) == []


def test_failing_test_leaves_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fail=RECORDING + '''
def test_fails(apf_vm):
    record(apf_vm)
    apf_vm.wait_for("guest_apf_wake", n=5)
    assert False, "the VMM under test broke"
''')
    result = run_pytest(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the VMM under test broke*"])
    info = json.loads((pytester.path / "vm.json").read_text())
    assert len(info["pids"]) == 3
    assert leftovers(info["vm"], info["socket"]) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_test_leaves_nothing(pytester: pytest.Pytester, signum: int) -> None:
    """Ctrl-C: the fixture's teardown stops the VM. SIGKILL of pytest itself: no teardown runs, but every process
    of the VM was told to get SIGTERM when its parent dies (PR_SET_PDEATHSIG), and the host then removes its shm
    objects and socket."""
    pytester.makepyfile(test_hang=RECORDING + '''
def test_hangs(apf_vm):
    apf_vm.wait_for("guest_apf_wake", n=5)
    record(apf_vm)
    apf_vm.wait_for("never_logged", timeout=600)
''')
    # Its output goes to a file, not a pipe: the VM's processes inherit it, and a pipe would stay open (and a
    # read of it blocked) until the last of them is gone.
    output = pytester.path / "pytest.out"
    with output.open("wb") as out_file:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
                                cwd=pytester.path, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True)
    info_file = pytester.path / "vm.json"
    try:
        wait_until(lambda: info_file.exists() or proc.poll() is not None, 60, "the VM to start under pytest")
        assert proc.poll() is None, output.read_text()
        info = json.loads(info_file.read_text())
        assert processes_mentioning(info["vm"]), "the VM's processes are not running"
        proc.send_signal(signum)
        proc.wait(timeout=60)
        out = output.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in out, out
    # The VM's processes stop on their own (SIGTERM from the plugin or from their parent's death): wait for them.
    wait_until(lambda: not leftovers(info["vm"], info["socket"]), 30, "the VM's processes, shm and socket to go")
    for pid in info["pids"]:
        assert not Path(f"/proc/{pid}").exists() or info["vm"].encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
