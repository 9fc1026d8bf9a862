from __future__ import annotations

import ctypes
import mmap

import pytest

from shared.apf_data import KVM_VCPU_PV_APF_DATA_SIZE, KvmVcpuPvApfData


class CStruct(ctypes.Structure):
    """struct kvm_vcpu_pv_apf_data as the kernel's uapi header declares it."""

    _fields_ = [("flags", ctypes.c_uint32), ("token", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 56)]


def test_layout_matches_the_c_struct():
    buf = mmap.mmap(-1, 4096)
    u32 = memoryview(buf).cast("I")
    area = KvmVcpuPvApfData(u32, 128)
    area.flags = 1
    area.token = 0xABC001
    c = CStruct.from_buffer(buf, 128)
    assert ctypes.sizeof(CStruct) == KVM_VCPU_PV_APF_DATA_SIZE
    assert CStruct.flags.offset == 0 and CStruct.token.offset == 4
    assert (c.flags, c.token) == (1, 0xABC001)
    c.token = 0
    assert area.token == 0
    assert area.read_and_reset_flags() == 1 and area.flags == 0 and c.flags == 0
    del c
    area.release()
    u32.release()
    buf.close()


@pytest.mark.parametrize("gpa", [4, 32, 4096 - 32, 4096, -64])
def test_misaligned_or_outside_areas_are_refused(gpa):
    u32 = memoryview(bytearray(4096)).cast("I")
    with pytest.raises(ValueError):
        KvmVcpuPvApfData(u32, gpa)
