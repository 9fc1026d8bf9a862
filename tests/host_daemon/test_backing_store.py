# The swap is crash-consistent: an eviction or a page-in interrupted at any step leaves a readable copy, and
# recovery (GuestMemory._recover) finds it. Each "crash" below stops the host's sequence after a given step and
# rebuilds the memory model from what is in shared memory, as a host started with --recover does.
from __future__ import annotations

import random

import pytest

from host_daemon.backing_store import V_VALID, VCPU_WORDS, BackingStore
from host_daemon.memory import POISON
from shared.views import EPT_PRESENT, ept_entry

PAGES = 8
GFN = 2


@pytest.fixture
def vm(make_vm):
    vm = make_vm(PAGES)
    vm.memory(6)
    return vm


def contents_after_recovery(vm) -> bytes:
    mem = vm.memory(6, recover=True)
    mem.install(GFN)
    return bytes(vm.ram.page(GFN))


@pytest.mark.parametrize("crash_after", ["unmap", "publish", "copy", "commit", "poison"])
def test_an_interrupted_eviction_keeps_the_page(vm, crash_after):
    ram, backing = vm.ram, vm.backing
    data = random.Random(1).randbytes(4096)
    ram.page(GFN)[:] = data
    gen = backing.residency(GFN) >> 1
    steps = ["unmap", "publish", "copy", "commit", "poison"]
    for step in steps[: steps.index(crash_after) + 1]:  # host_daemon/memory.py GuestMemory._evict, step by step
        if step == "unmap":
            backing.set_residency(GFN, ept_entry(gen + 1, present=False))
        elif step == "publish":
            vm.ept.u32[GFN] = ept_entry(gen + 1, present=False)
        elif step == "copy":
            slot = 1 - (backing.state(GFN) & 1)
            off = backing._slot_off(GFN, slot)
            backing.mem[off : off + 4096] = bytes(ram.page(GFN))
        elif step == "commit":
            backing.u32[backing._state0 + GFN] = ((gen + 1) << 1) | (1 - (backing.state(GFN) & 1))
        else:
            ram.page(GFN)[:] = POISON
    assert contents_after_recovery(vm) == data


def test_recovery_publishes_the_master_not_what_guests_saw(vm):
    """The published EPT is rebuilt from the host's master copy: whatever was in it before does not count."""
    for gfn in range(PAGES):
        vm.ept.u32[gfn] = 0xFFFF_FFFF  # what a broken publisher (or anything else) might have left
    mem = vm.memory(6, recover=True)
    assert [vm.ept.u32[g] & EPT_PRESENT for g in range(PAGES)] == [int(mem.present(g)) for g in range(PAGES)]
    assert sum(mem.present(g) for g in range(PAGES)) == 6


def test_an_interrupted_page_in_is_redone_from_the_swap(vm):
    mem = vm.memory(6)
    data = random.Random(2).randbytes(4096)
    vm.ram.page(GFN)[:] = data
    assert mem._evict(GFN)
    vm.ram.page(GFN)[:2048] = b"\x00" * 2048  # the page-in copy was cut halfway; the master still says not present
    assert not vm.backing.residency(GFN) & EPT_PRESENT
    assert contents_after_recovery(vm) == data


def test_saved_vcpu_registers_and_attachment_survive(vm):
    backing = vm.backing
    backing.save_vcpu(3, boot=7, msr_en=(1 << 40) | 0x49, msr_int=0xF3, apf_id=1234, spiv=0x1FF,
                      msr_ve=(1 << 36) | 0x51)
    backing.attach_guest(3, 4321)
    backing.attach_guest(4, 0)  # a guest the host cannot see (another PID namespace)
    backing.attach_guest(6, 99)
    backing.detach_guest(6)
    again = BackingStore(vm.vm_id, PAGES, recover=True)
    vm.extra.append(again)
    saved = again.saved_vcpu(3)
    assert saved is not None and (saved.boot, saved.msr_en, saved.msr_int, saved.apf_id, saved.spiv,
                                  saved.msr_ve) == (7, (1 << 40) | 0x49, 0xF3, 1234, 0x1FF, (1 << 36) | 0x51)
    assert again.saved_vcpu(4) is None
    assert again.connected_guests() == {3: 4321, 4: 0}


def test_the_apf_id_survives_a_register_save_torn_by_a_kill(vm):
    """save_vcpu clears the record's valid word first: a host killed inside it leaves no registers to restore, but
    the next token id (written alone by save_apf_id with each id alloc_apf_token hands out) is still there for the
    host that recovers, so that it never hands out a token again."""
    backing = vm.backing
    backing.save_vcpu(2, boot=1, msr_en=0x49, msr_int=0xF3, apf_id=10, spiv=0x1FF)
    backing.save_apf_id(2, 11)
    backing.u32[backing._vcpu0 + 2 * VCPU_WORDS + V_VALID] = 0  # cleared: the kill came in the middle of the next save
    again = BackingStore(vm.vm_id, PAGES, recover=True)
    vm.extra.append(again)
    assert again.saved_vcpu(2) is None and again.apf_id(2) == 11 and again.apf_id(5) == 0


def test_recover_refuses_a_foreign_or_missing_object(vm_id):
    import posix_ipc

    with pytest.raises(posix_ipc.ExistentialError):
        BackingStore(vm_id, PAGES, recover=True)
    b = BackingStore(vm_id, PAGES, recover=False)
    with pytest.raises(ValueError):
        BackingStore(vm_id, PAGES * 2, recover=True)
    b.close(unlink_it=True)
