# The VMM's snapshot and restore of a VM (shared/snapshot.py has the directory's format and the MSR lists).
#
# Snapshot (a `vmm_snapshot` request on a connection of its own): the VMM pauses every vCPU, here by stopping its
# guest process (SIGSTOP through a pidfd, then waiting until /proc says it is stopped), then, with no await in
# between, so that nothing of the host changes meanwhile, reads each vCPU's MSRs of the list (RDMSR: an MSR the
# vCPU does not have is left out, as KVM_GET_MSRS would fail it), its interrupt state, and copies guest RAM and the
# backing store into the directory. The page-ins in flight are not waited for: as with KVM, async work does not
# survive a restore, and the wake-all of the restored enabling write makes its sleepers retry. The host then stops
# and leaves guest RAM and the swap behind, as a killed host does, for the host that restores it; the guests stay
# paused.
#
# Restore (`apf-host --restore DIR`, what `apf-emu restore DIR` runs): guest RAM and the backing store get the
# snapshot's images (in the objects the paused guests still map, or new ones), each vCPU's saved registers become
# what its MSR list saved (an MSR it left out is 0, as on a new vCPU), and the host then takes the VM over as
# --recover does: guests reconnect as the same boots and get their registers back. Once it listens, it resumes the
# paused guests (SIGCONT). apf-emu keeps one thing a new KVM would not: each vCPU's token ids go on from where they
# were (vcpu->arch.apf.id), so that no token is handed out twice in one boot.
from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import posix_ipc
import trio

from shared.guest_ram import GuestRam, RamLayout
from shared.snapshot import MANIFEST, RAM, SWAP, Manifest, VcpuState, read_manifest, read_regular

from .backing_store import MAGIC, VERSION, BackingStore, store_size
from .memory import GuestMemory
from .vcpu_conn import VcpuConnection

PAUSE_TIMEOUT_S = 5.0


class SnapshotError(Exception):
    """A snapshot or restore that cannot be done: the message says why (nothing was changed, or it was undone)."""


class VmView(Protocol):
    memory: GuestMemory
    vcpus: dict[int, VcpuConnection]


def _signal(pid: int, signum: int) -> bool:
    """Send `signum` to `pid` through a pidfd (no reused pid is hit); False if that cannot be done (the process is
    gone, or it is not ours to signal)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        signal.pidfd_send_signal(fd, signum)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _stopped(pid: int) -> bool:
    """/proc/<pid>/stat says the process is stopped (T) or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith(("T", "t", "Z", "X"))


def start_time(pid: int) -> int:
    """The process's start time (/proc/<pid>/stat field 22, clock ticks since boot); 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def resume(pids: Iterable[int]) -> list[int]:
    """SIGCONT each guest; returns those that were still there."""
    return [pid for pid in pids if pid and _signal(pid, signal.SIGCONT)]


def resume_paused(states: Iterable[VcpuState]) -> list[int]:
    """SIGCONT the guests of a restored snapshot: only a process that is the one saved (same start time, not a
    reused pid) and is stopped, since a snapshot is input and names pids."""
    return resume(s.guest_pid for s in states
                  if s.guest_pid and start_time(s.guest_pid) == s.guest_start and _stopped(s.guest_pid))


async def pause(vm: VmView) -> dict[int, int]:
    """SIGSTOP every attached guest and wait until each is stopped: vCPU -> pid. SnapshotError (and every guest
    resumed) if one cannot be paused: the host cannot see it (another PID namespace) or it does not stop."""
    pids = {vcpu: conn.peer_pid for vcpu, conn in sorted(vm.vcpus.items())}
    hidden = [vcpu for vcpu, pid in pids.items() if not pid]
    if hidden:
        raise SnapshotError(f"vCPU {hidden[0]}'s guest is in a PID namespace the host cannot see: it cannot be "
                            "paused")
    stopped = [pid for pid in pids.values() if _signal(pid, signal.SIGSTOP)]
    if len(stopped) != len(pids):
        resume(stopped)
        raise SnapshotError("a guest could not be sent SIGSTOP (gone, or not the host's to signal)")
    try:
        with trio.move_on_after(PAUSE_TIMEOUT_S):
            while not all(_stopped(pid) for pid in stopped):
                await trio.sleep(0.005)  # polling another process's state in /proc
    except BaseException:  # the host is stopping (SIGTERM) meanwhile: no guest stays stopped
        resume(stopped)
        raise
    if not all(_stopped(pid) for pid in stopped):
        resume(stopped)
        raise SnapshotError(f"a guest did not stop within {PAUSE_TIMEOUT_S} s")
    return pids


def save(vm: VmView, directory: Path, manifest: Manifest, msrs: tuple[int, ...], paused: dict[int, int]) -> Manifest:
    """Everything at once, with the vCPUs of `paused` stopped: the manifest with each one's MSRs and interrupt state,
    guest RAM and the backing store. Synchronous: the host changes nothing while it runs. SnapshotError, and no file
    left behind, if the directory cannot take it."""
    running = sorted(set(vm.vcpus) - set(paused))
    if running:
        raise SnapshotError(f"vCPU {running[0]} connected while the others were being paused")
    states = []
    for vcpu in sorted(paused):
        conn = vm.vcpus.get(vcpu)
        if conn is None:
            continue  # its guest went away while the others were being paused
        conn.save_registers()
        values = {}
        for msr in msrs:
            result = conn.apf.read_msr(msr)
            if result.ok and result.value is not None:
                values[msr] = result.value
        states.append(VcpuState(vcpu, conn.boot, conn.peer_pid, values, conn.apf.spiv, conn.apf.pageready_pending,
                                start_time(conn.peer_pid)))
    full = Manifest(manifest.vm, manifest.pages, manifest.vcpus, manifest.abi, msrs, tuple(states),
                    manifest.host_args)
    created: list[Path] = []
    try:
        for name, data in ((RAM, vm.memory.ram.mem), (SWAP, vm.memory.backing.mem),
                           (MANIFEST, full.text().encode())):
            with open(directory / name, "xb") as f:  # never over a file another writer made
                created.append(directory / name)
                f.write(data)
    except OSError as exc:
        for path in created:  # only what this call made
            with contextlib.suppress(OSError):
                path.unlink()
        raise SnapshotError(f"cannot write the snapshot into {directory}: {exc.strerror or exc}") from None
    return full


def check_directory(directory: str) -> Path:
    """Where a snapshot may go: an absolute path of an existing, writable directory with no snapshot in it."""
    path = Path(directory)
    if not path.is_absolute():
        raise SnapshotError(f"snapshot directory {directory!r} is not an absolute path")
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise SnapshotError(f"snapshot directory {directory} does not exist or is not writable")
    if any((path / name).exists() for name in ("snapshot.json", RAM, SWAP)):
        raise SnapshotError(f"snapshot directory {directory} already holds a snapshot")
    return path


def restore_images(directory: Path, vm: str, pages: int, vcpus: int, abi: str) -> Manifest:
    """Put the snapshot in `directory` back into the VM's shm objects (opened if they are there, which the paused
    guests map, else created), and make each vCPU's saved registers those its MSR list saved. Everything is checked
    before anything is written: SnapshotError, and nothing changed, if the snapshot is not one of this VM (`vm`,
    `pages`, `vcpus`, `abi`) or is damaged."""
    try:
        manifest = read_manifest(directory)
    except ValueError as exc:
        raise SnapshotError(str(exc)) from None
    found = (manifest.vm, manifest.pages, manifest.vcpus, manifest.abi)
    if found != (vm, pages, vcpus, abi):
        raise SnapshotError(f"{directory}: a snapshot of VM {found[0]!r} ({found[1]} pages, {found[2]} vCPUs, ABI "
                            f"{found[3]}), not of {vm!r} ({pages} pages, {vcpus} vCPUs, ABI {abi})")
    layout = RamLayout(pages)
    try:
        ram_image = read_regular(directory / RAM, layout.ram_size)
        swap_image = read_regular(directory / SWAP, store_size(pages))
    except ValueError as exc:
        raise SnapshotError(str(exc)) from None
    if struct.unpack_from("=3I", swap_image) != (MAGIC, VERSION, pages):
        raise SnapshotError(f"{directory / SWAP} is not the backing store of a {pages}-page apf-emu VM (its header)")
    try:
        try:
            ram = GuestRam.open(vm, layout)
        except (posix_ipc.ExistentialError, ValueError):
            ram = GuestRam.create(vm, layout)
        try:
            ram.mem[:] = ram_image
        finally:
            ram.close_keep()
        try:
            backing = BackingStore(vm, pages, recover=True)
        except (posix_ipc.ExistentialError, ValueError):
            backing = BackingStore(vm, pages, recover=False)
    except (posix_ipc.Error, OSError) as exc:
        raise SnapshotError(f"cannot put the snapshot back into the VM's shared memory: {exc}") from None
    try:
        backing.mem[:] = swap_image
        for state in manifest.vcpu_states:
            apf_id = backing.apf_id(state.vcpu)
            en, int_, ve = state.restored_registers
            backing.save_vcpu(state.vcpu, state.boot, en, int_, apf_id, state.spiv, ve)  # KVM_SET_MSRS, _SET_LAPIC
    finally:
        backing.close(unlink_it=False)
    return manifest
