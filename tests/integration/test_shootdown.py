# Eviction against guest accesses, both at full speed, in real processes over real shm: no guest write is ever
# lost and no stale (poisoned) read is ever accepted. The host side is host_daemon/memory.py in this test's trio
# loop; the guest side is guest_agent/memory.py in child processes (two of them, sharing pages as well as writing
# their own), each with its own control block and the read-only EPT passed as file descriptors.
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import trio

from host_daemon.backing_store import BackingStore
from host_daemon.guest_views import ControlBlock, PublishedEpt
from host_daemon.memory import GuestMemory
from host_daemon.pager import PageInLatency, Pager
from shared.guest_ram import GuestRam, RamLayout
from shared.views import GuestViews
from tests.conftest import EventLog

PAGES = 64
RESIDENT = 16
ACCESSES = 100_000
SHARED = range(1, 9)  # both accessors write their slot of these, and check each other's

ACCESSOR = textwrap.dedent(
    """
    import json, random, sys
    from guest_agent.memory import Access, GuestMemoryAccess, SlotCheck
    from shared.guest_ram import GuestRam, RamLayout
    from shared.views import GuestViews
    vm, pages, n, vcpu, ept_fd, ctl_fd = sys.argv[1], *map(int, sys.argv[2:])
    ram = GuestRam.open(vm, RamLayout(pages))
    mem = GuestMemoryAccess(ram, GuestViews([ept_fd, ctl_fd], pages), vcpus=2)
    rng = random.Random(vcpu)
    accept = {}
    counts = {"done": 0, "failures": 0, "retries": 0, "exits": 0, "other_slots": 0, "mid_write": 0}
    print("ready", flush=True)
    while counts["done"] < n:
        if rng.random() < 0.3:
            gfn = rng.randrange(1, 9)  # shared
            others = SlotCheck()
            status, seq, ok, _torn = mem.update_shared(gfn, vcpu, accept.get(gfn), 7, others)
        else:
            gfn = rng.randrange(9 + vcpu, pages, 2)  # this accessor's own pages
            others = None
            status, seq, ok, _torn = mem.update_page(gfn, accept.get(gfn), 7)
        if status is Access.DONE:
            counts["done"] += 1
            if not ok:
                counts["failures"] += 1
            if others is not None:
                counts["failures"] += len(others.bad)
                counts["other_slots"] += others.good
                counts["mid_write"] += others.torn
            accept[gfn] = (seq,)
        elif status is Access.RETRY:
            counts["retries"] += 1
            if gfn in accept:
                accept[gfn] = accept[gfn] + (seq,)
        else:
            counts["exits"] += 1
    mem.leave()
    del mem
    ram.close()
    print(json.dumps(counts), flush=True)
    """
)


async def test_eviction_races_accesses_without_losing_data(tmp_path):
    vm = f"shootdown{random.randrange(1 << 30)}"
    ram = GuestRam.create(vm, RamLayout(PAGES))
    backing = BackingStore(vm, PAGES, recover=False)
    ept = PublishedEpt(vm, PAGES)
    ctls = [ControlBlock(vm, v) for v in range(2)]
    try:
        memory = GuestMemory(ram, ept.u32, backing, RESIDENT, EventLog())
        pager = Pager(memory, PageInLatency.parse("0"), random.Random(2))
        procs = []
        for v, ctl in enumerate(ctls):
            memory.attach(v, ctl.u32)
            procs.append(await trio.lowlevel.open_process(
                [sys.executable, "-c", ACCESSOR, vm, str(PAGES), str(ACCESSES), str(v), str(ept.fd), str(ctl.fd)],
                stdout=subprocess.PIPE, pass_fds=[ept.fd, ctl.fd],
            ))
        bufs = []
        for proc in procs:
            assert proc.stdout is not None
            buf = b""
            while b"ready\n" not in buf:
                buf += await proc.stdout.receive_some(4096)
            bufs.append(buf)
        rng = random.Random(3)
        async with trio.open_nursery() as nursery:
            while any(proc.poll() is None for proc in procs):
                # Page in a random non-resident page; making room evicts the oldest resident one not in use.
                gfn = rng.randrange(1, PAGES)
                await pager.start_page_in(gfn, nursery).wait()
                await trio.sleep(0)
            nursery.cancel_scope.cancel()
        counts = []
        for proc, buf in zip(procs, bufs, strict=False):
            assert proc.stdout is not None
            rest = buf + b"".join([chunk async for chunk in proc.stdout])
            counts.append(json.loads(rest.decode().split("ready\n", 1)[1]))
    finally:
        for ctl in ctls:
            ctl.close()
        ept.close()
        ram.close()
        backing.close(unlink_it=True)
    assert [proc.returncode for proc in procs] == [0, 0]
    for c in counts:
        assert c["done"] == ACCESSES
        assert c["failures"] == 0, counts
        # The race was really exercised: the guest saw pages vanish under it, and evictions were frequent.
        assert c["exits"] > 1000, counts
        assert c["other_slots"] > 1000, counts  # each really checked the other's writes
    assert memory.stats.evictions > 1000
    stats = memory.stats
    assert sum(c["retries"] for c in counts) + stats.eviction_skips + stats.shootdown_cancels > 0, (counts, stats)


@pytest.fixture
def small_vm(vm_id):
    ram = GuestRam.create(vm_id, RamLayout(8))
    backing = BackingStore(vm_id, 8, recover=False)
    ept = PublishedEpt(vm_id, 8)
    ctl = ControlBlock(vm_id, 0)
    views = GuestViews([os.dup(ept.fd), os.dup(ctl.fd)], 8)
    yield ram, backing, ept, ctl, views
    views.close()
    ctl.close()
    ept.close()
    ram.close()
    backing.close(unlink_it=True)


def test_a_broken_shootdown_is_caught_by_the_guest_check(small_vm):
    """Copy out and poison a page WITHOUT unmapping it: the guest's next access must report a failed check."""
    from guest_agent.memory import Access, GuestMemoryAccess, SlotCheck

    ram, backing, ept, _ctl, views = small_vm
    GuestMemory(ram, ept.u32, backing, 6, EventLog())
    mem = GuestMemoryAccess(ram, views, vcpus=2)
    status, seq, ok, _ = mem.update_page(3, None, 1)
    assert (status, ok) == (Access.DONE, True)
    status, sseq, ok, _ = mem.update_shared(1, 0, None, 1, SlotCheck())
    assert (status, ok) == (Access.DONE, True)
    ram.page(3)[:] = b"\xdb" * 4096  # what a racing eviction would leave
    ram.page(1)[:] = b"\xdb" * 4096
    status, _seq, ok, _ = mem.update_page(3, (seq,), 1)
    assert status is Access.DONE and not ok
    others = SlotCheck()
    status, _seq, ok, _ = mem.update_shared(1, 0, (sseq,), 1, others)
    assert status is Access.DONE and not ok
    assert others.bad == [1]  # the other vCPU's slot: a complete copy (seqs equal) that is poison


def test_a_store_to_a_swapped_out_page_exits_instead_of_being_lost(small_vm):
    from guest_agent.memory import Access, GuestMemoryAccess

    ram, backing, ept, _ctl, views = small_vm
    memory = GuestMemory(ram, ept.u32, backing, 4, EventLog())
    mem = GuestMemoryAccess(ram, views)
    assert mem.store_u32(4096 * 6 + 8, 7) is Access.EXIT  # gfn 6 starts swapped out
    memory.install(6)
    assert mem.store_u32(4096 * 6 + 8, 7) is Access.DONE
    assert ram.u32[(4096 * 6 + 8) // 4] == 7


def test_other_slots_are_all_read_in_turn(small_vm):
    """With more vCPUs than OTHER_SLOTS, each access reads a few other slots, and every slot is read in turn."""
    from guest_agent.memory import OTHER_SLOTS, Access, GuestMemoryAccess, SlotCheck

    ram, backing, ept, _ctl, views = small_vm
    GuestMemory(ram, ept.u32, backing, 6, EventLog())
    mem = GuestMemoryAccess(ram, views, vcpus=10)
    ram.page(1)[64 * 7 : 64 * 7 + 4] = b"\x01\x00\x00\x00"  # slot 7: seq_a 1, the rest of it does not match
    found = []
    for _ in range(3):  # 9 other slots, 3 per access: all of them in three accesses
        others = SlotCheck()
        assert mem.update_shared(1, 0, None, 1, others)[0] is Access.DONE
        assert others.good + len(others.bad) + others.torn == OTHER_SLOTS
        found += others.bad
    assert found == []  # seq_a 1 with seq_b 0: caught mid-write, not judged
    ram.page(1)[64 * 7 + 60 : 64 * 7 + 64] = b"\x01\x00\x00\x00"  # now complete, and wrong
    for _ in range(3):
        others = SlotCheck()
        mem.update_shared(1, 0, None, 1, others)
        found += others.bad
    assert found == [7]
