# apf_emu/pod.py natively: the three containers of a campaign pod (a host and two guests) as plain processes that
# share only a run directory and a log directory, as a pod's containers share emptyDir volumes (and, natively, the
# IPC and PID namespaces a pod shares). The chaos schedule reaches the other "containers'" guests by their
# supervisors' pid files, the host prints the case's record last and exits with its verdict, the supervisors stop
# when the harness ends the case, and the logs pass `apf-emu check`. tests/compose/test_podman.py runs the same
# pod in real containers.
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from shared.guest_ram import vm_shm_names
from tests.conftest import processes_mentioning

from .helpers import ROOT

CASE = ["--seeds", "4-5", "--index", "1", "--duration", "3", "--vcpus", "2", "--guest-kills", "2",
        "--guest-panics", "1", "--host-kills", "1", "--pauses", "1"]


def test_a_pod_runs_a_case_across_its_containers(tmp_path: Path) -> None:
    dirs = ["--run-dir", str(tmp_path / "run"), "--log-dir", str(tmp_path / "logs")]
    pod = [sys.executable, "-m", "apf_emu", "pod"]
    streams = [(tmp_path / f"guest-{v}.out", tmp_path / f"guest-{v}.err") for v in (0, 1)]
    guests = []
    for v, (out, err) in enumerate(streams):  # files, as a runtime keeps a container's output (a pipe would fill)
        with open(out, "wb") as o, open(err, "wb") as e:
            guests.append(subprocess.Popen([*pod, "guest", "--vcpu", str(v), *dirs, *CASE], cwd=ROOT, stdout=o,
                                           stderr=e, stdin=subprocess.DEVNULL))
    host = subprocess.run([*pod, "host", *dirs, *CASE], cwd=ROOT, capture_output=True, timeout=180,
                          stdin=subprocess.DEVNULL, env={**os.environ, "HOSTNAME": "pod-under-test"})
    codes = [g.wait(timeout=60) for g in guests]
    outs = [(out.read_bytes(), err.read_bytes()) for out, err in streams]
    assert host.returncode == 0, host.stderr.decode()[-3000:]
    assert codes == [0, 0], [err.decode()[-1000:] for _out, err in outs]
    lines = host.stdout.splitlines()
    res = orjson.loads(lines[-1])["apf_emu_case"]
    assert (res["case"], res["verdict"], res["where"]) == ("s5-int", "pass", "pod-under-test")
    assert res["faults"].get("guest_kill", 0) + res["faults"].get("guest_panic", 0) >= 1, res["faults"]
    assert res["faults"].get("host_kill") == 1
    # Each container's stdout holds its processes' log lines, as `kubectl logs` shows them.
    assert any(b'"event":"host_ready"' in line for line in lines)
    assert all(b'"role":"guest"' in out and b'"vcpu":%d' % v in out for v, (out, _err) in enumerate(outs))
    check = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(tmp_path / "logs")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout[-2000:]
    assert "recorded by apf-emu chaos" in check.stdout  # judged with the limit the harness wrote
    assert processes_mentioning(str(tmp_path / "run")) == []
    assert [n for n in vm_shm_names("case") if os.path.exists(f"/dev/shm{n}")] == []
