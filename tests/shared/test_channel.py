# shared/channel.py over a real socket pair: a frame the socket takes whole goes out directly (no send_all), one it
# does not take (a full socket buffer) goes out whole through send_all after the direct part, frames sent while
# another send waits keep their order, and a peer that went away is BrokenResourceError.
from __future__ import annotations

import socket

import pytest
import trio

from shared.channel import MessageChannel
from shared.wire import GUEST_TO_HOST, HOST_TO_GUEST, FrameReader, Interrupt, MsrWrite, decode


def pair() -> tuple[MessageChannel, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return MessageChannel(trio.SocketStream(trio.socket.from_stdlib_socket(a)), GUEST_TO_HOST), b


def read_all(sock: socket.socket) -> list[object]:
    sock.setblocking(False)
    reader, out = FrameReader(), []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        out.extend(decode(f, HOST_TO_GUEST) for f in reader.feed(data))


async def test_a_frame_the_socket_takes_goes_out_directly():
    chan, peer = pair()

    async def no_send_all(data: bytes) -> None:
        raise AssertionError("send_all used for a frame the socket takes at once")

    chan.stream.send_all = no_send_all  # type: ignore[method-assign]
    await chan.send(Interrupt(0xF3))
    assert [m.vector for m in read_all(peer)] == [0xF3]  # type: ignore[attr-defined]
    await chan.aclose()
    peer.close()


async def test_frames_stay_whole_when_the_socket_is_full_and_two_tasks_send():
    chan, peer = pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    per_task = 10000  # far more than the socket buffers hold: sends must wait, and the other task's queue
    async with trio.open_nursery() as nursery:

        async def sender(base: int) -> None:
            for i in range(per_task):
                await chan.send(MsrWrite(base, i))

        nursery.start_soon(sender, 1)
        nursery.start_soon(sender, 2)
        got: list[MsrWrite] = []
        reader = FrameReader()
        peer.setblocking(False)
        while len(got) < 2 * per_task:
            await trio.lowlevel.wait_readable(peer)
            got.extend(decode(f, GUEST_TO_HOST) for f in reader.feed(peer.recv(1 << 16)))
    for base in (1, 2):  # every frame decoded whole, and each task's in its order
        assert [m.value for m in got if m.msr == base] == list(range(per_task))
    await chan.aclose()
    peer.close()


async def test_a_send_to_a_peer_that_went_away_is_a_broken_resource():
    chan, peer = pair()
    await chan.send(Interrupt(1))
    assert [m.vector for m in read_all(peer)] == [1]  # type: ignore[attr-defined]
    peer.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(10):  # the first write after the close may still be taken by the kernel
            await chan.send(Interrupt(2))
    await chan.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await chan.send(Interrupt(3))


async def test_a_cancelled_send_sends_nothing():
    """As trio's own send_all under its lock: a task whose scope is cancelled gets Cancelled, not a frame out."""
    chan, peer = pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await chan.send(Interrupt(7))
    assert scope.cancelled_caught and read_all(peer) == []
    await chan.aclose()
    peer.close()
