# Handshake against the real host daemon: a guest that names neither its vCPU nor its boot (a compose replica, a
# guest started by hand) is given both, the next boot of a vCPU is numbered after the last one the host saw, and a
# reconnecting guest keeps what it was given.
from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from apf_emu.checker import check_events
from apf_emu.logs import read_merged
from shared.wire import ErrorReply, Welcome

from .helpers import ROOT, GuestProcess, HostProcess, WireClient, read_events, wait_until


@pytest.fixture
def host(tmp_path, vm_id):
    h = HostProcess(tmp_path, vm_id, "--vcpus", "2", "--pages", "64", "--resident", "40",
                    "--page-in-latency", "fixed:1ms")
    yield h
    assert h.stop() == 0
    assert not h.shm_exists()


def disconnected(host: HostProcess, vcpu: int, boot: int) -> bool:
    return any(e["event"] == "vcpu_disconnect" and e["vcpu"] == vcpu and e["boot"] == boot for e in host.events())


def test_host_assigns_vcpu_and_boot(host, vm_id):
    a, b = WireClient(host.socket), WireClient(host.socket)
    wa, wb = a.hello(vm_id, vcpu=None, boot=0), b.hello(vm_id, vcpu=None, boot=0)
    assert (wa.vcpu, wa.boot) == (0, 1)
    assert (wb.vcpu, wb.boot) == (1, 1)
    c = WireClient(host.socket)
    refused = c.hello(vm_id, vcpu=None, boot=0)
    assert isinstance(refused, ErrorReply) and refused.code == "no_vcpu"
    c.close()
    # vCPU 0's guest dies; the next guest that asks gets vCPU 0 as boot 2.
    a.close()
    wait_until(lambda: disconnected(host, 0, 1), 5, "the host to see vCPU 0's guest go")
    a2 = WireClient(host.socket)
    w = a2.hello(vm_id, vcpu=None, boot=0)
    assert (w.vcpu, w.boot) == (0, 2)
    # Naming the vCPU but not the boot asks for a newer boot, but the guest connected there is alive: refused.
    b2 = WireClient(host.socket)
    w = b2.hello(vm_id, vcpu=1, boot=0)
    assert isinstance(w, ErrorReply) and w.code == "vcpu_busy" and "live guest" in w.message
    # An explicit boot is taken as given.
    a2.close()
    wait_until(lambda: disconnected(host, 0, 2), 5, "the host to see vCPU 0's second guest go")
    a3 = WireClient(host.socket)
    w = a3.hello(vm_id, vcpu=0, boot=7)
    assert (w.vcpu, w.boot) == (0, 7)
    bad = WireClient(host.socket)
    refused = bad.hello(vm_id, vcpu=None, boot=-1)
    assert isinstance(refused, ErrorReply) and refused.code == "bad_field"
    for c in (a3, b, b2, bad):
        c.close()


def test_killed_guest_comes_back_as_the_next_boot(host, vm_id, tmp_path):
    """The compose topology natively: guests with no --vcpu/--boot, one SIGKILLed and started again."""
    g0 = GuestProcess(host, 0, "--duration", "30", "--seed", "3", vcpu_arg=False)
    wait_until(lambda: any(e["event"] == "vcpu_connect" for e in host.events()), 10, "the first guest")
    g1 = GuestProcess(host, 1, "--duration", "30", "--seed", "3", vcpu_arg=False)
    wait_until(lambda: sum(e["event"] == "vcpu_connect" for e in host.events()) == 2, 10, "both guests")
    first = {e["guest_pid"]: e for e in host.events() if e["event"] == "vcpu_connect"}
    killed = first[g0.proc.pid]
    assert killed["boot"] == 1 and killed["assigned"] is True
    wait_until(lambda: any(e["event"] == "kvm_async_pf_ready" and e["vcpu"] == killed["vcpu"]
                           for e in host.events()), 20,
               "APF traffic on the vCPU to kill")
    g0.signal(signal.SIGKILL)
    assert g0.wait() == -signal.SIGKILL
    wait_until(lambda: disconnected(host, killed["vcpu"], 1), 5, "the host to see the guest die")
    g2 = GuestProcess(host, 0, "--duration", "30", "--seed", "3", vcpu_arg=False)
    wait_until(lambda: any(e["event"] == "vcpu_connect" and e["guest_pid"] == g2.proc.pid for e in host.events()),
               10, "the restarted guest")
    again = next(e for e in host.events() if e["event"] == "vcpu_connect" and e["guest_pid"] == g2.proc.pid)
    assert (again["vcpu"], again["boot"]) == (killed["vcpu"], 2)
    wait_until(lambda: any(e["event"] == "kvm_async_pf_ready" and e["vcpu"] == killed["vcpu"] and e["boot"] == 2
                           for e in host.events()), 20, "APF traffic in boot 2")
    for g in (g1, g2):
        g.signal(signal.SIGTERM)
        assert g.wait() == 0
    assert host.stop() == 0
    guest_log = read_events(tmp_path / f"guest-{killed['vcpu']}.jsonl")
    assert [e["boot"] for e in guest_log if e["event"] == "guest_boot"] == [1, 2]
    violations = check_events(list(read_merged([str(tmp_path)])))
    assert violations == [], violations


GHOST = """
import os, socket, sys
from shared.blocking_channel import BlockingChannel
from shared.wire import PROTOCOL_VERSION, HOST_TO_GUEST, Hello, Welcome
path, vm, back = sys.argv[1], sys.argv[2], int(sys.argv[3])
chan = BlockingChannel(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), HOST_TO_GUEST)
chan.sock.connect(path)
reply = chan.request(Hello(PROTOCOL_VERSION, vm, 1, 1, "normal", os.getpid(), "socket"))
assert isinstance(reply, Welcome), reply
socket.send_fds(socket.socket(fileno=back), [b"x"], [chan.sock.fileno()])  # the connection outlives us
"""


def test_a_newer_boot_replaces_a_dead_guest_whose_connection_the_host_has_not_seen_end(host, vm_id):
    """The guest process is gone (the kernel says so: its pid does not exist) but its socket is still open
    elsewhere, so the host has read no end of connection: a newer boot takes the vCPU over, resetting the old one."""
    parent, child = socket.socketpair()
    ghost = subprocess.run([sys.executable, "-c", GHOST, str(host.socket), vm_id, str(child.fileno())], cwd=ROOT,
                           pass_fds=[child.fileno()], timeout=30)
    assert ghost.returncode == 0
    _msg, fds, _flags, _addr = socket.recv_fds(parent, 16, 1)
    held = socket.socket(fileno=fds[0])  # the dead guest's connection, still open
    try:
        newer = WireClient(host.socket)
        w = newer.hello(vm_id, vcpu=1, boot=0)
        assert isinstance(w, Welcome) and (w.vcpu, w.boot) == (1, 2)
        assert any(e["event"] == "vcpu_replaced" and e["vcpu"] == 1 for e in host.events())
        newer.close()
    finally:
        held.close()
        parent.close()
        child.close()
