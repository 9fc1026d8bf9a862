# A safety net under the integration tests: whatever processes and shm segments a test leaves behind (because it
# failed before its own cleanup ran) are removed after it, so one failure does not leak into the machine or into
# other tests. A passing test has cleaned up after itself already; its own assertions say so.
from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.guest_ram import unlink, vm_shm_names

from . import helpers


@pytest.fixture(autouse=True)
def reap_leftovers() -> Iterator[None]:
    yield
    while helpers.STARTED:
        proc = helpers.STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while helpers.VMS:
        vm = helpers.VMS.pop()
        for name in vm_shm_names(vm):
            unlink(name)
