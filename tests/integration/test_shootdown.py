# Eviction against guest accesses, both at full speed, in two real processes over real shm: no guest write is ever
# lost and no stale (poisoned) read is ever accepted. The host side is host_daemon/memory.py in this test's trio
# loop; the guest side is guest_agent/memory.py in a child process.
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import trio

from host_daemon.backing_store import BackingStore
from host_daemon.memory import GuestMemory, PageInLatency
from shared.guest_ram import GuestRam, RamLayout

PAGES = 64
RESIDENT = 16
ACCESSES = 200_000

ACCESSOR = textwrap.dedent(
    """
    import json, random, sys
    from guest_agent.memory import Access, GuestMemoryAccess
    from shared.guest_ram import GuestRam, RamLayout
    vm, pages, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ram = GuestRam.open(vm, RamLayout(pages))
    mem = GuestMemoryAccess(ram, 0)
    rng = random.Random(1)
    accept = {}
    counts = {"done": 0, "failures": 0, "retries": 0, "exits": 0}
    print("ready", flush=True)
    while counts["done"] < n:
        gfn = rng.randrange(1, pages)
        status, seq, ok, _torn = mem.update_page(gfn, accept.get(gfn), 7)
        if status is Access.DONE:
            counts["done"] += 1
            if not ok:
                counts["failures"] += 1
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
    try:
        memory = GuestMemory(ram, RESIDENT, PageInLatency.parse("0"), random.Random(2), backing)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", ACCESSOR, vm, str(PAGES), str(ACCESSES)], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        buf = b""
        while b"ready\n" not in buf:
            buf += await proc.stdout.receive_some(4096)
        rng = random.Random(3)
        async with trio.open_nursery() as nursery:
            rounds = 0
            while proc.poll() is None:
                # Page in a random non-resident page; making room evicts the oldest resident one.
                gfn = rng.randrange(1, PAGES)
                await memory.start_page_in(gfn, nursery).wait()
                rounds += 1
            nursery.cancel_scope.cancel()
        rest = buf + b"".join([chunk async for chunk in proc.stdout])
        counts = json.loads(rest.decode().split("ready\n", 1)[1])
    finally:
        ram.close()
        backing.close(unlink_it=True)
    assert proc.returncode == 0
    assert counts["done"] == ACCESSES
    assert counts["failures"] == 0, counts
    # The race was really exercised: the guest saw pages vanish under it, and evictions were frequent.
    assert counts["exits"] > 1000, counts
    assert memory.stats.evictions > 1000
    assert counts["retries"] + memory.stats.shootdown_waits > 0, (counts, memory.stats)


async def test_a_broken_shootdown_is_caught_by_the_guest_check():
    """Copy out and poison a page WITHOUT unmapping it: the guest's next access must report a failed check."""
    from guest_agent.memory import Access, GuestMemoryAccess

    vm = f"shootdown{random.randrange(1 << 30)}"
    ram = GuestRam.create(vm, RamLayout(8))
    backing = BackingStore(vm, 8, recover=False)
    try:
        GuestMemory(ram, 6, PageInLatency.parse("0"), random.Random(0), backing)
        mem = GuestMemoryAccess(ram, 0)
        status, seq, ok, _ = mem.update_page(1, None, 1)
        assert (status, ok) == (Access.DONE, True)
        ram.page(1)[:] = b"\xdb" * 4096  # what a racing eviction would leave
        status, _seq, ok, _ = mem.update_page(1, (seq,), 1)
        assert status is Access.DONE and not ok
        del mem
    finally:
        ram.close()
        backing.close(unlink_it=True)


async def test_a_store_to_a_swapped_out_page_exits_instead_of_being_lost():
    from guest_agent.memory import Access, GuestMemoryAccess

    vm = f"shootdown{random.randrange(1 << 30)}"
    ram = GuestRam.create(vm, RamLayout(8))
    backing = BackingStore(vm, 8, recover=False)
    try:
        memory = GuestMemory(ram, 4, PageInLatency.parse("0"), random.Random(0), backing)
        mem = GuestMemoryAccess(ram, 0)
        assert mem.store_u32(4096 * 6 + 8, 7) is Access.EXIT  # gfn 6 starts swapped out
        async with trio.open_nursery() as nursery:
            await memory.fault_in(6, nursery)
        assert mem.store_u32(4096 * 6 + 8, 7) is Access.DONE
        assert ram.u32[(4096 * 6 + 8) // 4] == 7
        del mem
    finally:
        ram.close()
        backing.close(unlink_it=True)
