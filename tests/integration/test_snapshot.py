# VMM snapshot and restore on real processes (host_daemon/snapshot.py, apf_emu/vmm.py): `apf-emu snapshot` pauses
# the guests and saves the VM, the host stops; `apf-emu restore` starts a host from the directory and resumes the
# guests, which reconnect as the same boots. With KVM's whole MSR range nothing is lost: every task wakes, every data
# check passes. With Firecracker's list before PR 3064 (no MSR_KVM_ASYNC_PF_INT) the restored vector is 0, the
# wake-all that should wake the tasks asleep across the restore is lost, and so is every page-ready after it.
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apf_emu.checker import check_events
from apf_emu.logs import read_merged
from shared.abi import MSR_KVM_ASYNC_PF_INT
from shared.snapshot import read_manifest
from shared.wire import PROTOCOL_VERSION, ErrorReply, VmmSnapshot

from .helpers import (
    ROOT,
    STARTED,
    GuestProcess,
    HostProcess,
    WireClient,
    end_run,
    read_events,
    reconnect_and_go_on,
    wait_for_events,
    wait_until,
)

HOST_ARGS = ("--vcpus", "2", "--pages", "256", "--resident", "64", "--page-in-latency", "exp:2ms")


class RestoredHost:
    """`apf-emu restore DIR`, which becomes the host: the same handles as HostProcess."""

    def __init__(self, old: HostProcess, directory: Path) -> None:
        self.vm, self.socket, self.log_dir = old.vm, old.socket, old.log_dir
        self.proc = subprocess.Popen([sys.executable, "-m", "apf_emu", "restore", str(directory)], cwd=ROOT,
                                     start_new_session=True)
        STARTED.append(self.proc)
        wait_until(lambda: self.proc.poll() is not None or self.socket.exists(), 10, "the restored host's socket")
        assert self.proc.poll() is None, f"the restored host exited with {self.proc.returncode}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def snapshot(host: HostProcess, directory: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "snapshot", "--socket", str(host.socket), *args,
                           str(directory)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert host.proc.wait(15) == 0, "the host stops once the snapshot is taken"
    assert host.shm_exists(), "guest RAM stays for the restoring host"


@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_snapshot_and_restore_with_the_whole_kvm_range_lose_nothing(tmp_path, vm_id, transport):
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS)
    guests = [GuestProcess(host, v, "--transport", transport) for v in (0, 1)]
    restored = None
    try:
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait", 50)
        snap = tmp_path / "snap"
        snapshot(host, snap)
        assert [state(g.proc.pid) for g in guests] == ["T", "T"], "the guests are paused"
        manifest = read_manifest(snap)
        assert [s.vcpu for s in manifest.vcpu_states] == [0, 1]
        assert all(s.msrs[MSR_KVM_ASYNC_PF_INT] == 0xF3 for s in manifest.vcpu_states)
        restored = RestoredHost(host, snap)
        reconnect_and_go_on(guests, 50)
        for g in guests:
            assert g.stop() == 0
    finally:
        end_run(guests, restored or host)
    assert not host.shm_exists()
    events = list(read_merged([str(tmp_path)]))
    assert [(v.invariant, v.message) for v in check_events(events)][:5] == []
    shutdowns = [e for e in events if e["event"] == "guest_shutdown"]
    assert len(shutdowns) == 2 and all(e["data_check_failures"] == 0 and e["sleepers"] == 0 for e in shutdowns)
    host_events = read_events(tmp_path / "host.jsonl")
    assert [e["recovered"] for e in host_events if e["event"] == "host_ready"] == [False, True]
    assert [e["event"] for e in host_events if e["event"].startswith("vmm_")] == ["vmm_snapshot", "vmm_restore"]
    assert [e["restored"] for e in events if e["event"] == "vcpu_connect"].count(True) == 2
    resume = next(e for e in host_events if e["event"] == "vmm_restore")
    assert sorted(resume["resumed"]) == sorted(g.proc.pid for g in guests)
    assert sum(1 for e in events if e["event"] == "guest_data_check" and e["mono_ns"] > resume["mono_ns"]) > 50


def test_restore_of_a_list_without_msr_kvm_async_pf_int_strands_the_sleepers(tmp_path, vm_id):
    """Firecracker before PR 3064 (#3020): the restored MSR_KVM_ASYNC_PF_INT is 0, so the page-readies after the
    restore are raised on vector 0, which Linux takes as spurious; the slot is never released and the tasks asleep
    stay asleep. The guests' drain then times out and the checker reports them."""
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS)
    guests = [GuestProcess(host, v, "--drain-timeout", "1") for v in (0, 1)]
    restored = None
    try:
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait", 50)
        snap = tmp_path / "snap"
        snapshot(host, snap, "--msrs", "firecracker-1.1")
        assert all(MSR_KVM_ASYNC_PF_INT not in s.msrs for s in read_manifest(snap).vcpu_states)
        restored = RestoredHost(host, snap)
        for g in guests:
            wait_for_events(g.log, "guest_reconnect")
        wait_until(lambda: any(e["event"] == "kvm_async_pf_ready" and e.get("vector") == 0
                               for e in read_events(tmp_path / "host.jsonl")), 20, "a page-ready on vector 0")
        for g in guests:
            g.stop()
    finally:
        end_run(guests, restored or host)
    invariants = {v.invariant for v in check_events(list(read_merged([str(tmp_path)])))}
    assert "wait_woken" in invariants, invariants


def test_bad_snapshot_requests_and_damaged_snapshots_are_refused_and_change_nothing(tmp_path, vm_id):
    """A guest's socket does not take vmm_snapshot; a directory that holds a snapshot is refused with the guests
    left running; a restore from a damaged snapshot (an MSR value KVM_SET_MSRS would refuse, a truncated RAM image)
    fails before it writes anything, and the same snapshot repaired then restores."""
    host = HostProcess(tmp_path, vm_id, *HOST_ARGS)
    guests = [GuestProcess(host, v) for v in (0, 1)]
    restored = None
    try:
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait", 20)
        client = WireClient(host.socket)
        client.chan.send(VmmSnapshot(PROTOCOL_VERSION, str(tmp_path / "x"), "kvm"))
        reply = client.chan.receive()
        assert isinstance(reply, ErrorReply) and reply.code == "unexpected" and "VMM socket" in reply.message
        client.chan.close()
        snap = tmp_path / "snap"
        snap.mkdir()
        (snap / "snapshot.json").write_text("{}")
        proc = subprocess.run([sys.executable, "-m", "apf_emu", "snapshot", "--socket", str(host.socket), str(snap)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3 and "already holds a snapshot" in proc.stderr, proc.stderr
        assert host.proc.poll() is None and [state(g.proc.pid) for g in guests] != ["T", "T"]
        (snap / "snapshot.json").unlink()
        snapshot(host, snap)
        manifest_text = (snap / "snapshot.json").read_text()
        ram_image = (snap / "ram.bin").read_bytes()
        (snap / "snapshot.json").write_text(manifest_text.replace('"MSR_KVM_ASYNC_PF_INT": 243',
                                                                  '"MSR_KVM_ASYNC_PF_INT": 499'))
        # A manifest `apf-emu restore` cannot read, or images the host refuses: the restore could not run (3).
        for damage, words, status in (("msr", "cannot hold 499", 3), ("ram", "bytes, not the", 3)):
            if damage == "ram":
                (snap / "snapshot.json").write_text(manifest_text)
                (snap / "ram.bin").write_bytes(ram_image[:4096])
            proc = subprocess.run([sys.executable, "-m", "apf_emu", "restore", str(snap)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == status and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
            assert host.shm_exists() and [state(g.proc.pid) for g in guests] == ["T", "T"]
        (snap / "ram.bin").write_bytes(ram_image)
        restored = RestoredHost(host, snap)
        reconnect_and_go_on(guests, 20)
        for g in guests:
            assert g.stop() == 0
    finally:
        end_run(guests, restored or host)
    events = list(read_merged([str(tmp_path)]))
    assert [(v.invariant, v.message) for v in check_events(events)][:5] == []
