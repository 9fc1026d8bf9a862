# The Kubernetes manifests of `apf-emu campaign --kubernetes` run for real, without a cluster: podman plays the
# generated Pod of one case (a host container and two guest containers sharing the pod's IPC and PID namespaces
# and two emptyDir volumes, the compose image), the case runs its chaos schedule across the containers to its end,
# `apf-emu campaign collect --podman` reads the pod back into a campaign DIR, and the collected logs pass
# `apf-emu check`. scripts/prepare-podman installs podman, catatonit and the ulimits podman needs here and moves
# the compose image into podman; the test skips only if it says podman or the image cannot be had.
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from .prepare import prepared

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def podman_image() -> str:
    return prepared("prepare-podman", "podman or the compose image")


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def apf_emu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apf_emu", *args], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_a_generated_pod_runs_in_podman_and_its_logs_pass_check(podman_image: str, tmp_path: Path) -> None:
    out = tmp_path / "campaign"
    made = apf_emu("campaign", "--kubernetes", "--seeds", "1-2", "--duration", "4", "--vcpus", "2", "--out",
                   str(out), "--pod", "1", "--image", podman_image, "--name", f"apf-podman-{os.getpid()}")
    assert made.returncode == 0, made.stderr
    manifest = out / "pod-1.yaml"
    name = yaml.safe_load(manifest.read_text())["metadata"]["name"]
    try:
        podman("kube", "play", str(manifest))
        waited = podman("wait", f"{name}-host", timeout=300)
        assert waited.stdout.strip() == "0", podman("logs", f"{name}-host", check=False).stderr[-3000:]
        for vcpu in (0, 1):
            assert podman("wait", f"{name}-guest-{vcpu}", timeout=120).stdout.strip() == "0"
        collected = apf_emu("campaign", "collect", str(out), "--podman", "--keep-logs", "all")
        assert collected.returncode == 0, collected.stderr
        assert f"s2-int: PASS [{name}]" in collected.stdout
    finally:
        podman("kube", "play", "--down", str(manifest), check=False)
    assert podman("ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}").stdout.strip() == ""
    assert podman("pod", "exists", name, check=False).returncode != 0

    res = orjson.loads((out / "results.jsonl").read_bytes().splitlines()[-1])
    assert (res["case"], res["verdict"], res["where"]) == ("s2-int", "pass", name)
    assert res["apfs"] > 100 and res["faults"].get("host_kill") == 1, res  # the guests used the host's shm
    assert res["faults"].get("guest_kill", 0) + res["faults"].get("guest_panic", 0) >= 1  # across containers
    logs = out / "cases" / "s2-int"
    for vcpu in (0, 1):
        assert b'"role":"guest"' in (logs / f"guest-{vcpu}.jsonl").read_bytes()
    check = apf_emu("check", str(logs))
    assert check.returncode == 0, check.stdout[-3000:]
    assert "recorded by apf-emu chaos" in check.stdout
