# `apf-emu snapshot` and `apf-emu restore`: the VMM's side of a snapshot (shared/snapshot.py has the format,
# host_daemon/snapshot.py what the host does). `snapshot` sends the running host one `vmm_snapshot` request on a
# connection of its own and waits for `vmm_done`; `restore` becomes the host that restores it (`apf-host
# --restore`), with the options the snapshot recorded and those given on its command line after them.
from __future__ import annotations

import os
import sys
from pathlib import Path

from shared.blocking_channel import BlockingChannel, ChannelClosed, NoHost, connect
from shared.config import HostOptions, vmm_socket
from shared.snapshot import MANIFEST, read_manifest
from shared.wire import PROTOCOL_VERSION, ErrorReply, VmmDone, VmmSnapshot, WireError

SNAPSHOT_TIMEOUT_S = 120.0


class VmmError(Exception):
    """The snapshot could not be taken; the message says why."""


def snapshot(sock_path: Path, directory: Path, msrs: str) -> VmmDone:
    """Ask the host whose guests' socket is `sock_path` (on its VMM socket beside it) for a snapshot into
    `directory` (made if missing; it must hold no snapshot)."""
    directory = directory.resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VmmError(f"cannot make {directory}: {exc.strerror or exc}") from None
    if (directory / MANIFEST).exists():
        raise VmmError(f"{directory} already holds a snapshot")
    path = vmm_socket(sock_path)
    try:
        sock = connect(path, timeout=2.0)
    except (NoHost, OSError) as exc:
        raise VmmError(f"no host listens on {path}, the VMM socket beside {sock_path} ({exc})") from None
    sock.settimeout(SNAPSHOT_TIMEOUT_S)
    chan = BlockingChannel(sock)
    try:
        reply = chan.request(VmmSnapshot(PROTOCOL_VERSION, str(directory), msrs))
    except (TimeoutError, ChannelClosed, WireError, OSError) as exc:
        raise VmmError(f"the host did not answer the snapshot request ({exc})") from None
    finally:
        chan.close()
    if isinstance(reply, ErrorReply):
        raise VmmError(f"the host refused: {reply.message}")
    if not isinstance(reply, VmmDone):
        raise VmmError(f"the host answered {reply.TYPE}, not vmm_done")
    return reply


def restore_command(directory: Path, extra: list[str]) -> list[str]:
    """The host command that restores the snapshot in `directory`: its recorded options, then `extra`."""
    try:
        manifest = read_manifest(directory)
    except ValueError as exc:
        raise VmmError(str(exc)) from None
    return [sys.executable, "-m", HostOptions.MODULE, *manifest.host_args, *extra, "--restore",
            str(directory.resolve())]


def exec_restore(directory: Path, extra: list[str]) -> None:
    """Become the restoring host (its exit status, its signals, its output)."""
    argv = restore_command(directory, extra)
    os.execv(argv[0], argv)
