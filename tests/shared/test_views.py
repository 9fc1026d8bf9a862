# What the host shares with a guest besides RAM (shared/views.py, host_daemon/guest_views.py): the published EPT is
# readable and cannot be written by any means a guest has; the control block is the guest's; both travel as file
# descriptors with a frame.
from __future__ import annotations

import mmap
import os
import socket

import pytest
import trio

from host_daemon.guest_views import ControlBlock, PublishedEpt
from shared.blocking_channel import BlockingChannel
from shared.channel import MessageChannel
from shared.views import CTL_IN_ACCESS, GuestViews, ept_entry, ept_size
from shared.wire import GUEST_TO_HOST, Interrupt, Resume

PAGES = 64


@pytest.fixture
def ept(vm_id):
    e = PublishedEpt(vm_id, PAGES)
    yield e
    e.close()


def test_the_published_ept_cannot_be_written_by_a_guest(ept):
    ept.u32[5] = ept_entry(3, present=True)  # the host's own mapping stays writable
    fd = os.dup(ept.fd)  # what a guest receives with welcome
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, ept_size(PAGES))  # a shared writable mapping
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"\xff" * 4, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # opening it afresh does not help
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(reopened, ept_size(PAGES))
        finally:
            os.close(reopened)
        private = mmap.mmap(fd, ept_size(PAGES), flags=mmap.MAP_PRIVATE)  # a private copy: only the writer sees it
        private[20:24] = b"\xff\xff\xff\xff"
        private.close()
        readonly = mmap.mmap(fd, ept_size(PAGES), prot=mmap.PROT_READ)
        assert readonly[20:24] == ept_entry(3, present=True).to_bytes(4, "little")
        readonly.close()
    finally:
        os.close(fd)
    assert ept.u32[5] == ept_entry(3, present=True)


def test_guest_views_map_the_ept_read_only_and_the_control_block_read_write(ept, vm_id):
    ctl = ControlBlock(vm_id, 0)
    views = GuestViews([os.dup(ept.fd), os.dup(ctl.fd)], PAGES)
    try:
        ept.u32[9] = 0x13
        assert views.ept.u32[9] == 0x13
        with pytest.raises(TypeError):
            views.ept.u32[9] = 0  # a read-only mapping
        views.ctl.u32[CTL_IN_ACCESS] = 10
        assert ctl.u32[CTL_IN_ACCESS] == 10
    finally:
        views.close()
        ctl.close()


def test_guest_views_refuse_a_wrong_set_of_fds(ept):
    fd = os.dup(ept.fd)
    with pytest.raises(ValueError, match="1 file descriptors"):
        GuestViews([fd], PAGES)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, not leaked


async def test_descriptors_travel_with_their_frame(ept, vm_id):
    host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl = ControlBlock(vm_id, 1)
    chan = MessageChannel(trio.SocketStream(trio.socket.from_stdlib_socket(host_sock)), GUEST_TO_HOST)
    guest = BlockingChannel(guest_sock)
    try:
        await chan.send(Interrupt(0xF3))
        await chan.send_with_fds([ept.fd, ctl.fd], Resume(4096))
        assert guest.receive() == Interrupt(0xF3)
        assert guest.receive() == Resume(4096)
        fds = guest.take_fds()  # there once the frame they came with has been read (perhaps earlier)
        assert len(fds) == 2
        views = GuestViews(fds, PAGES)
        views.ctl.u32[CTL_IN_ACCESS] = 77
        assert ctl.u32[CTL_IN_ACCESS] == 77
        views.close()
        await chan.send_with_fds([ctl.fd], Resume(0))
    finally:
        guest.close()  # closes the fds nobody took
        await chan.aclose()
        ctl.close()
