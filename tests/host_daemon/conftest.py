# A VM's memory in one process over real shm: guest RAM, the backing store and the published EPT, as the host daemon
# builds them, for the tests of the memory model, the pager and the backing store.
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from host_daemon.backing_store import BackingStore
from host_daemon.guest_views import PublishedEpt
from host_daemon.memory import GuestMemory
from shared.guest_ram import GuestRam, RamLayout
from tests.conftest import EventLog


@dataclass
class Vm:
    vm_id: str
    pages: int
    ram: GuestRam
    backing: BackingStore
    ept: PublishedEpt
    log: EventLog = field(default_factory=EventLog)
    extra: list[BackingStore] = field(default_factory=list)

    def memory(self, resident: int, *, recover: bool = False) -> GuestMemory:
        """A memory model; with recover=True, as a restarted host builds it from what survived."""
        backing = self.backing
        if recover:
            backing = BackingStore(self.vm_id, self.pages, recover=True)
            self.extra.append(backing)
        return GuestMemory(self.ram, self.ept.u32, backing, resident, self.log, recover=recover)

    def close(self) -> None:
        for b in self.extra:
            b.close(unlink_it=False)
        self.ept.close()
        self.ram.close()
        self.backing.close(unlink_it=True)


@pytest.fixture
def make_vm(vm_id: str) -> Iterator[type]:
    made: list[Vm] = []

    def make(pages: int) -> Vm:
        vm = Vm(vm_id, pages, GuestRam.create(vm_id, RamLayout(pages)), BackingStore(vm_id, pages, recover=False),
                PublishedEpt(vm_id, pages))
        made.append(vm)
        return vm

    yield make  # type: ignore[misc]
    for vm in made:
        vm.close()
