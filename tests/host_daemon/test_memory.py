# The host's memory model (host_daemon/memory.py) in one process over real shm: residency limit, FIFO eviction,
# the shootdown against vCPUs inside an access, host-private residency, the recovery window; and a hypothesis state
# machine in which guests (modelled step by step: announce, read the EPT, write, leave) and the host (page-ins,
# evictions, vCPUs coming and going) interleave arbitrarily, and no write is ever lost.
from __future__ import annotations

import random
import struct
import subprocess
import sys

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import host_daemon.memory as memory_module
from host_daemon.backing_store import BackingStore
from host_daemon.guest_views import PublishedEpt
from host_daemon.memory import POISON, GuestMemory
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
from shared.views import CTL_IN_ACCESS, CTL_SIZE, EPT_PRESENT, ept_entry
from tests.conftest import EventLog


def ctl_block() -> memoryview:
    return memoryview(bytearray(CTL_SIZE)).cast("I")


def test_boot_state_and_residency_limit(make_vm):
    vm = make_vm(16)
    mem = vm.memory(6)
    assert [mem.present(g) for g in range(16)] == [True] * 6 + [False] * 10
    for gfn in range(6, 16):
        assert mem.install(gfn)
        assert mem.present(gfn) and mem.resident == 6
        assert sum(mem.present(g) for g in range(16)) == 6
    assert mem.stats.evictions == 10 and mem.stats.overcommits == 0


def test_the_published_ept_follows_the_master(make_vm):
    vm = make_vm(16)
    mem = vm.memory(4)
    for gfn in (9, 10, 3, 12):
        mem.install(gfn)
    assert list(vm.ept.u32[:16]) == [vm.backing.residency(g) for g in range(16)]
    assert [bool(vm.ept.u32[g] & EPT_PRESENT) for g in range(16)] == [mem.present(g) for g in range(16)]


def test_page_in_brings_back_exactly_what_was_evicted(make_vm):
    vm = make_vm(16)
    mem = vm.memory(4)
    rng = random.Random(1)
    contents = {g: rng.randbytes(4096) for g in range(4)}
    for g, data in contents.items():
        vm.ram.page(g)[:] = data
    for g in range(4, 16):  # evicts 0..3 (FIFO) and more
        mem.install(g)
    for g in range(4):
        assert not mem.present(g)
        assert bytes(vm.ram.page(g)) == POISON  # an evicted page is not readable in guest RAM
    for g in range(4):
        mem.install(g)
    assert all(bytes(vm.ram.page(g)) == contents[g] for g in range(4))


def test_a_present_page_is_never_paged_in_over_newer_data(make_vm):
    """The lost write: a page whose contents in RAM are newer than its swap copy must not be overwritten by a
    page-in. Only the host's master decides that a page is out, so a fault (a page-in request) on it changes
    nothing, whatever the published EPT says."""
    vm = make_vm(16)
    mem = vm.memory(4)
    vm.ram.page(1)[:] = b"old!" * 1024
    for g in (4, 5):  # evicts 0 and 1: the swap holds 1's old contents
        mem.install(g)
    mem.install(1)
    vm.ram.page(1)[:] = b"new!" * 1024
    assert not mem.install(1)
    assert bytes(vm.ram.page(1)) == b"new!" * 1024


def test_pinned_pages_are_never_evicted(make_vm):
    vm = make_vm(16)
    mem = vm.memory(4)
    mem.pin(0)
    for g in range(4, 16):
        mem.install(g)
        assert mem.present(0)
    mem.unpin(0)  # back at the tail of the FIFO: the fourth eviction from now takes it
    for g in range(1, 5):
        mem.install(g)
    assert not mem.present(0)  # evictable again once unpinned


def test_a_vcpu_inside_an_access_holds_up_that_page_only(make_vm):
    """A SIGSTOPped guest inside an access to the oldest page: it is passed over, with no wait, and the next one is
    evicted. Its contents stay untouched."""
    vm = make_vm(16)
    mem = vm.memory(4)
    ctl = ctl_block()
    mem.attach(2, ctl)
    vm.ram.page(0)[:] = b"live" * 1024
    ctl[CTL_IN_ACCESS] = 0 + 1
    mem.install(10)
    assert mem.present(0) and mem.present(10) and not mem.present(1)
    assert mem.stats.eviction_skips == 1 and mem.stats.shootdown_cancels == 0
    assert bytes(vm.ram.page(0)) == b"live" * 1024
    assert vm.backing.residency(0) == ept_entry(0, present=True)  # never even unmapped


def test_a_vcpu_that_enters_during_the_unmap_cancels_the_eviction(make_vm, monkeypatch):
    """The shootdown proper: a vCPU announced its access after the pre-check but before the unmap was visible.
    The host sees it after its fence, maps the page again under a newer generation (so that the vCPU's re-check
    retries) and evicts another page."""
    vm = make_vm(16)
    mem = vm.memory(4)
    ctl = ctl_block()
    mem.attach(1, ctl)
    vm.ram.page(0)[:] = b"mine" * 1024
    entered = []

    def fence_while_a_guest_enters() -> None:
        if not entered:
            entered.append(True)
            ctl[CTL_IN_ACCESS] = 0 + 1

    monkeypatch.setattr(memory_module, "full_fence", fence_while_a_guest_enters)
    mem.install(10)
    assert mem.stats.shootdown_cancels == 1
    assert mem.present(0) and not mem.present(1)
    assert vm.backing.residency(0) == ept_entry(2, present=True) == vm.ept.u32[0]
    assert bytes(vm.ram.page(0)) == b"mine" * 1024


def test_a_vcpu_that_goes_away_releases_its_page(make_vm):
    vm = make_vm(16)
    mem = vm.memory(4)
    ctl = ctl_block()
    mem.attach(0, ctl)
    ctl[CTL_IN_ACCESS] = 0 + 1
    mem.install(10)
    assert mem.present(0)
    mem.detach(0, ctl)  # killed: its control block is not looked at any more (the value stays in it)
    for g in (11, 12, 13):
        mem.install(g)
    assert not mem.present(0)


def test_an_old_connection_ending_late_does_not_release_the_new_ones_block(make_vm):
    vm = make_vm(16)
    mem = vm.memory(4)
    old, new = ctl_block(), ctl_block()
    mem.attach(0, old)
    mem.attach(0, new)  # a newer boot's connection
    new[CTL_IN_ACCESS] = 0 + 1
    mem.detach(0, old)  # the old connection's end, read after the new one was attached
    mem.install(10)
    assert mem.present(0) and mem.stats.eviction_skips == 1


def test_control_block_garbage_is_ignored_and_reported_once(make_vm):
    vm = make_vm(16)
    mem = vm.memory(4)
    ctl = ctl_block()
    mem.attach(3, ctl)
    ctl[CTL_IN_ACCESS] = 0xDEADBEEF
    for g in range(4, 10):
        mem.install(g)
    assert mem.stats.evictions == 6 and mem.stats.eviction_skips == 0
    assert vm.log.names().count("ctl_garbage") == 1


def test_with_every_page_held_or_pinned_the_page_in_goes_above_the_limit(make_vm):
    vm = make_vm(16)
    mem = vm.memory(3)
    blocks = [ctl_block() for _ in range(2)]
    for v, ctl in enumerate(blocks):
        mem.attach(v, ctl)
        ctl[CTL_IN_ACCESS] = v + 1  # gfns 0 and 1
    mem.pin(2)
    mem.install(9)  # nothing can go: the page-in does not wait for a guest
    assert mem.present(9) and mem.resident == 4 and mem.stats.overcommits == 1
    blocks[0][CTL_IN_ACCESS] = 0
    mem.install(10)  # the next page-in evicts the excess
    assert mem.resident == 3 and not mem.present(0)


def test_the_recovery_window_evicts_nothing_until_the_guests_are_back(make_vm):
    vm = make_vm(16)
    first = vm.memory(4)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    vm.backing.attach_guest(0, 1)  # pid 1 is alive (init): only its reconnect closes its part of the window
    vm.backing.attach_guest(1, int(dead.stdout))  # gone: the window does not wait for it
    vm.backing.attach_guest(2, 0)  # not visible to the host: only a reconnect or a newer boot counts
    del first
    mem = vm.memory(4, recover=True)
    assert mem.awaiting == [0, 1, 2]
    mem.install(9)  # every page-in looks whether the awaited guests still exist
    assert mem.awaiting == [0, 2]
    assert mem.resident == 5 and mem.stats.evictions == 0  # above the limit, nothing evicted
    mem.vcpu_back(2)
    mem.attach(0, ctl_block())  # a reconnect
    assert mem.awaiting == []
    mem.install(10)
    assert mem.resident == 4 and mem.stats.evictions == 2
    assert [e for e, f in vm.log.events if e == "memory_recovery_window"] == ["memory_recovery_window"] * 2


# --- the state machine ------------------------------------------------------------------------------------------
PAGES, RESIDENT, VCPUS = 6, 3, 2
SLOT = struct.Struct("<Q")  # vCPU v writes a u64 at offset 8 * v of a page


class NoWriteIsLost(RuleBasedStateMachine):
    """Guests run the access protocol of guest_agent/memory.py one step per rule; the host pages in (and so evicts)
    in between, and at the worst moment of an eviction (its fence) a guest may have entered the victim. Whatever
    the interleaving, every value a guest wrote inside an access is the page's current value afterwards: in RAM
    while the page is present, in the swap copy while it is not."""

    @initialize()
    def start(self) -> None:
        vm_id = f"nwil{random.randrange(1 << 40)}"
        self.ram = GuestRam.create(vm_id, RamLayout(PAGES))
        self.backing = BackingStore(vm_id, PAGES, recover=False)
        self.ept = PublishedEpt(vm_id, PAGES)
        self.mem = GuestMemory(self.ram, self.ept.u32, self.backing, RESIDENT, EventLog())
        self.ctl = [ctl_block() for _ in range(VCPUS)]
        self.attached = [True] * VCPUS
        for v in range(VCPUS):
            self.mem.attach(v, self.ctl[v])
        self.inside: list[tuple[int, int] | None] = [None] * VCPUS  # (gfn, entry read) while inside an access
        self.expected: dict[tuple[int, int], int] = {}  # (gfn, vcpu) -> last value written
        self.counter = 0
        self.race: int | None = None  # a vCPU that enters the next eviction's victim at its fence
        memory_module.full_fence = self._fence

    def teardown(self) -> None:
        memory_module.full_fence = ORIGINAL_FENCE
        if hasattr(self, "ram"):
            self.ept.close()
            self.ram.close()
            self.backing.close(unlink_it=True)

    def _fence(self) -> None:
        """The host just unmapped a victim (master, then published). A racing vCPU had announced itself and read
        the entry before that store was visible: it is inside with the old, present entry."""
        v, self.race = self.race, None
        if v is None or self.inside[v] is not None or not self.attached[v]:
            return
        victim = next(g for g in range(PAGES) if not self.ept.u32[g] & EPT_PRESENT and self._was_present(g))
        self.ctl[v][CTL_IN_ACCESS] = victim + 1
        self.inside[v] = (victim, ept_entry((self.ept.u32[victim] >> 1) - 1, present=True))

    def _was_present(self, gfn: int) -> bool:
        return bool(self.backing.state(gfn) >> 1 != self.ept.u32[gfn] >> 1)  # unmapped, not yet committed

    @rule(v=st.integers(0, VCPUS - 1), gfn=st.integers(0, PAGES - 1))
    def guest_enters(self, v: int, gfn: int) -> None:
        if self.inside[v] is not None or not self.attached[v]:
            return
        self.ctl[v][CTL_IN_ACCESS] = gfn + 1
        entry = int(self.ept.u32[gfn])
        if not entry & EPT_PRESENT:
            self.ctl[v][CTL_IN_ACCESS] = 0
            self.mem.install(gfn)  # the VM exit: a synchronous fault
            return
        self.inside[v] = (gfn, entry)

    @rule(v=st.integers(0, VCPUS - 1))
    def guest_writes(self, v: int) -> None:
        if self.inside[v] is None:
            return
        gfn, _entry = self.inside[v]  # type: ignore[misc]
        self.counter += 1
        SLOT.pack_into(self.ram.mem, gfn * PAGE_SIZE + 8 * v, self.counter)
        self.expected[(gfn, v)] = self.counter

    @rule(v=st.integers(0, VCPUS - 1))
    def guest_leaves(self, v: int) -> None:
        if self.inside[v] is None:
            return
        gfn, entry = self.inside[v]  # type: ignore[misc]
        if self.ept.u32[gfn] != entry:
            pass  # a real guest retries its access; what it wrote is still the page's newest value (checked below)
        self.ctl[v][CTL_IN_ACCESS] = 0
        self.inside[v] = None

    @rule(gfn=st.integers(0, PAGES - 1))
    def host_pages_in(self, gfn: int) -> None:
        self.mem.install(gfn)

    @rule(v=st.integers(0, VCPUS - 1))
    def next_eviction_races_with(self, v: int) -> None:
        self.race = v

    @rule(v=st.integers(0, VCPUS - 1))
    def vcpu_killed(self, v: int) -> None:
        """Its process dies (inside an access or not): what it wrote stays in RAM, its hold ends."""
        self.mem.detach(v, self.ctl[v])
        self.attached[v] = False
        self.inside[v] = None

    @precondition(lambda self: not all(self.attached))
    @rule()
    def vcpu_reboots(self) -> None:
        v = self.attached.index(False)
        self.ctl[v] = ctl_block()  # a new connection, a new control block
        self.mem.attach(v, self.ctl[v])
        self.attached[v] = True

    @invariant()
    def every_write_is_the_current_value(self) -> None:
        for (gfn, v), value in self.expected.items():
            data = self.ram.mem if self.mem.present(gfn) else self.backing.read(gfn)
            base = gfn * PAGE_SIZE if self.mem.present(gfn) else 0
            (found,) = SLOT.unpack_from(data, base + 8 * v)
            assert found == value, f"page {gfn}, vCPU {v}: {found} instead of {value}"

    @invariant()
    def a_page_a_live_vcpu_is_inside_stays_mapped_for_the_host(self) -> None:
        for v, inside in enumerate(self.inside):
            if inside is not None and self.attached[v]:
                assert self.mem.present(inside[0])

    @invariant()
    def guests_see_exactly_the_master(self) -> None:
        assert all(self.ept.u32[g] == self.backing.residency(g) for g in range(PAGES))


ORIGINAL_FENCE = memory_module.full_fence
TestNoWriteIsLost = NoWriteIsLost.TestCase
