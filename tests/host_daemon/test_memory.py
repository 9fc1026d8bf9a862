# The host's memory model in one process over real shm: residency limit, FIFO eviction, backing store contents.
from __future__ import annotations

import random

import pytest
import trio

from host_daemon.backing_store import BackingStore
from host_daemon.memory import POISON, GuestMemory, PageInLatency
from shared.guest_ram import GuestRam, RamLayout


@pytest.fixture
def ram(vm_id):
    r = GuestRam.create(vm_id, RamLayout(16))
    yield r
    r.close()


@pytest.fixture
def backing(vm_id):
    b = BackingStore(vm_id, 16, recover=False)
    yield b
    b.close(unlink_it=True)


@pytest.mark.parametrize(
    "spec,kind,a,b",
    [("0", "fixed", 0, 0), ("fixed:2ms", "fixed", 0.002, 0), ("exp:150us", "exp", 150e-6, 0),
     ("uniform:1ms:3ms", "uniform", 0.001, 0.003), ("fixed:0.5s", "fixed", 0.5, 0), ("fixed:3", "fixed", 0.003, 0)],
)
def test_latency_specs(spec, kind, a, b):
    lat = PageInLatency.parse(spec)
    assert (lat.kind, lat.a, lat.b) == (kind, pytest.approx(a), pytest.approx(b))
    s = lat.sample(random.Random(0))
    assert s >= 0 and (kind != "uniform" or a <= s <= b)


@pytest.mark.parametrize("spec", ["", "exp", "fixed:-1ms", "uniform:3ms:1ms", "gauss:1ms", "fixed:1h", "fixed:61s"])
def test_bad_latency_specs_are_refused(spec):
    with pytest.raises(ValueError, match="page-in latency"):
        PageInLatency.parse(spec)


async def test_boot_state_and_residency_limit(ram, backing):
    mem = GuestMemory(ram, 6, PageInLatency.parse("0"), random.Random(0), backing)
    assert [mem.present(g) for g in range(16)] == [True] * 6 + [False] * 10
    async with trio.open_nursery() as nursery:
        for gfn in range(6, 16):
            await mem.fault_in(gfn, nursery)
            assert mem.present(gfn)
            assert mem.resident == 6
            assert sum(mem.present(g) for g in range(16)) == 6


async def test_page_in_brings_back_exactly_what_was_evicted(ram, backing):
    mem = GuestMemory(ram, 4, PageInLatency.parse("0"), random.Random(0), backing)
    rng = random.Random(1)
    contents = {g: rng.randbytes(4096) for g in range(4)}
    for g, data in contents.items():
        ram.page(g)[:] = data
    async with trio.open_nursery() as nursery:
        for g in range(4, 16):  # evicts 0..3 (FIFO) and more
            await mem.fault_in(g, nursery)
        for g in range(4):
            assert not mem.present(g)
            assert bytes(ram.page(g)) == POISON  # an evicted page is not readable in guest RAM
        for g in range(4):
            await mem.fault_in(g, nursery)
        assert all(bytes(ram.page(g)) == contents[g] for g in range(4))


async def test_pinned_pages_are_never_evicted(ram, backing):
    mem = GuestMemory(ram, 4, PageInLatency.parse("0"), random.Random(0), backing)
    mem.pin(0)
    async with trio.open_nursery() as nursery:
        for g in range(4, 16):
            await mem.fault_in(g, nursery)
            assert mem.present(0)
    mem.unpin(0)


async def test_concurrent_page_ins_of_one_gfn_share_one_copy(ram, backing):
    mem = GuestMemory(ram, 4, PageInLatency.parse("fixed:5ms"), random.Random(0), backing)
    async with trio.open_nursery() as nursery:
        e1 = mem.start_page_in(9, nursery)
        e2 = mem.start_page_in(9, nursery)
        assert e1 is e2 and mem.paging_in(9)
        await e1.wait()
    assert mem.stats.page_ins == 1 and mem.present(9)


async def test_a_vcpu_stuck_inside_an_access_cannot_block_eviction_forever(ram, backing):
    """A SIGSTOPped guest inside an access to the victim: the host gives up on that page and evicts another."""
    mem = GuestMemory(ram, 4, PageInLatency.parse("0"), random.Random(0), backing)
    ram.u32[ram.layout.in_access_index(2)] = 0 + 1  # vCPU 2 is "inside" an access to gfn 0, the oldest page
    async with trio.open_nursery() as nursery:
        await mem.fault_in(10, nursery)
    assert mem.present(0) and mem.present(10) and not mem.present(1)
    assert mem.stats.shootdown_aborts == 1
    mem.clear_in_access(2)
