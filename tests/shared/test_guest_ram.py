from __future__ import annotations

import os
import stat

import posix_ipc
import pytest

from shared.guest_ram import GuestRam, RamLayout, check_vm_id, shm_name


def test_create_open_share_and_unlink(vm_id):
    layout = RamLayout(16)
    host = GuestRam.create(vm_id, layout)
    try:
        mode = os.stat(f"/dev/shm{shm_name(vm_id)}").st_mode
        assert stat.S_IMODE(mode) == 0o600
        guest = GuestRam.open(vm_id, layout)
        host.page(3)[:4] = b"abcd"
        assert bytes(guest.page(3)[:4]) == b"abcd"
        guest.page(5)[:4] = b"efgh"
        assert bytes(host.page(5)[:4]) == b"efgh"
        # guest RAM and nothing else: no EPT, no control block lives where guests write
        assert os.stat(f"/dev/shm{shm_name(vm_id)}").st_size == 16 * 4096
        guest.close()
        assert os.path.exists(f"/dev/shm{shm_name(vm_id)}")  # a guest never unlinks
    finally:
        host.close()
    assert not os.path.exists(f"/dev/shm{shm_name(vm_id)}")
    host.close()  # idempotent


def test_create_replaces_a_stale_segment(vm_id):
    stale = posix_ipc.SharedMemory(shm_name(vm_id), posix_ipc.O_CREX, size=4096)
    stale.close_fd()
    ram = GuestRam.create(vm_id, RamLayout(4))
    assert ram.layout.ram_size == 4 * 4096
    ram.close()


def test_open_without_host_fails(vm_id):
    with pytest.raises(posix_ipc.ExistentialError):
        GuestRam.open(vm_id, RamLayout(4))


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 49, "sp ace", "../x"])
def test_vm_ids_are_checked(bad):
    with pytest.raises(ValueError):
        check_vm_id(bad)
