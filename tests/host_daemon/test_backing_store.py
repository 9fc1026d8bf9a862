# The swap is crash-consistent: an eviction or a page-in interrupted at any step leaves a readable copy, and
# recovery (GuestMemory.recover) finds it. Each "crash" below stops the host's sequence after a given step and
# rebuilds the memory model from what is in shared memory, as a host started with --recover does.
from __future__ import annotations

import random

import pytest
import trio

from host_daemon.backing_store import BackingStore
from host_daemon.memory import POISON, GuestMemory, PageInLatency
from shared.guest_ram import EPT_PRESENT, GuestRam, RamLayout

PAGES = 8
GFN = 2


@pytest.fixture
def vm(vm_id):
    ram = GuestRam.create(vm_id, RamLayout(PAGES))
    backing = BackingStore(vm_id, PAGES, recover=False)
    GuestMemory(ram, 6, PageInLatency.parse("0"), random.Random(0), backing)
    yield vm_id, ram, backing
    ram.close()
    backing.close(unlink_it=True)


def recovered(vm_id: str, ram: GuestRam) -> GuestMemory:
    return GuestMemory(ram, 6, PageInLatency.parse("0"), random.Random(0),
                       BackingStore(vm_id, PAGES, recover=True), recover=True)


def ept(ram: GuestRam, gfn: int) -> int:
    return int(ram.u32[ram.layout.ept_index(gfn)])


async def contents_after_recovery(vm_id: str, ram: GuestRam) -> bytes:
    mem = recovered(vm_id, ram)
    async with trio.open_nursery() as nursery:
        await mem.fault_in(GFN, nursery)
    data = bytes(ram.page(GFN))
    mem.backing.close(unlink_it=False)
    return data


@pytest.mark.parametrize("crash_after", ["unmap", "copy", "commit", "poison"])
async def test_an_interrupted_eviction_keeps_the_page(vm, crash_after):
    vm_id, ram, backing = vm
    data = random.Random(1).randbytes(4096)
    ram.page(GFN)[:] = data
    gen = ept(ram, GFN) >> 1
    steps = ["unmap", "copy", "commit", "poison"]
    for step in steps[: steps.index(crash_after) + 1]:  # host_daemon/memory.py GuestMemory.evict, step by step
        if step == "unmap":
            ram.u32[ram.layout.ept_index(GFN)] = (gen + 1) << 1
        elif step == "copy":
            slot = 1 - (backing.state(GFN) & 1)
            off = backing._slot_off(GFN, slot)
            backing.mem[off : off + 4096] = bytes(ram.page(GFN))
        elif step == "commit":
            backing.u32[backing._state0 + GFN] = ((gen + 1) << 1) | (1 - (backing.state(GFN) & 1))
        else:
            ram.page(GFN)[:] = POISON
    assert await contents_after_recovery(vm_id, ram) == data


async def test_an_interrupted_page_in_is_redone_from_the_swap(vm):
    vm_id, ram, backing = vm
    mem = recovered(vm_id, ram)
    data = random.Random(2).randbytes(4096)
    ram.page(GFN)[:] = data
    assert await mem.evict(GFN)
    ram.page(GFN)[:2048] = b"\x00" * 2048  # the page-in copy was cut halfway; the EPT still says not present
    mem.backing.close(unlink_it=False)
    assert not ept(ram, GFN) & EPT_PRESENT
    assert await contents_after_recovery(vm_id, ram) == data


async def test_saved_vcpu_registers_survive(vm):
    vm_id, _ram, backing = vm
    backing.save_vcpu(3, boot=7, msr_en=(1 << 40) | 0x49, msr_int=0xF3, apf_id=1234)
    again = BackingStore(vm_id, PAGES, recover=True)
    saved = again.saved_vcpu(3)
    assert saved is not None and (saved.boot, saved.msr_en, saved.msr_int, saved.apf_id) == (
        7, (1 << 40) | 0x49, 0xF3, 1234)
    assert again.saved_vcpu(4) is None
    again.close(unlink_it=False)


def test_recover_refuses_a_foreign_or_missing_object(vm_id):
    import posix_ipc

    with pytest.raises(posix_ipc.ExistentialError):
        BackingStore(vm_id, PAGES, recover=True)
    b = BackingStore(vm_id, PAGES, recover=False)
    with pytest.raises(ValueError):
        BackingStore(vm_id, PAGES * 2, recover=True)
    b.close(unlink_it=True)
