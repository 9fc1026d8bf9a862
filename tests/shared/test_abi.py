from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import abi


def test_msr_numbers_match_the_kernel():
    assert abi.MSR_KVM_ASYNC_PF_EN == 0x4B564D02
    assert abi.MSR_KVM_ASYNC_PF_INT == 0x4B564D06
    assert abi.MSR_KVM_ASYNC_PF_ACK == 0x4B564D07
    assert (abi.KVM_ASYNC_PF_ENABLED, abi.KVM_ASYNC_PF_SEND_ALWAYS) == (1, 2)
    assert (abi.KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT, abi.KVM_ASYNC_PF_DELIVERY_AS_INT) == (4, 8)
    assert abi.KVM_ASYNC_PF_RESERVED == 0x30
    assert abi.KVM_APF_WAKE_ALL_TOKEN == 0xFFFFFFFF
    assert abi.ASYNC_PF_PER_VCPU == 64


@given(st.integers(0, abi.TOKEN_ID_LIMIT - 1), st.integers(0, 4095))
def test_token_format_round_trips(apf_id, vcpu):
    token = abi.make_token(apf_id, vcpu)
    assert token == ((apf_id << 12) | vcpu) & 0xFFFFFFFF
    assert abi.token_vcpu(token) == vcpu
    assert abi.token_id(token) == apf_id


@given(st.integers(0, abi.U32_MAX), st.integers(0, abi.MAX_VCPUS - 1))
def test_alloc_apf_token_never_yields_a_reserved_token(apf_id, vcpu):
    """alloc_apf_token (mmu.c): `if ((id << 12) == 0) id = 1` keeps 0 ("slot free") out of every token."""
    new_id, token = abi.alloc_apf_token(apf_id, vcpu)
    assert abi.token_is_well_formed(token, vcpu)
    assert new_id == ((apf_id if (apf_id << 12) & abi.U32_MAX else 1) + 1) & abi.U32_MAX


def test_alloc_apf_token_follows_kvm_sequence():
    """KVM starts apf.id at 0: the first token of vCPU 0 is 1 << 12, then 2 << 12, ...; after 2^20 ids the u32
    shift is 0 again and the id restarts at 1."""
    apf_id, tokens = 0, []
    for _ in range(3):
        apf_id, token = abi.alloc_apf_token(apf_id, 0)
        tokens.append(token)
    assert tokens == [1 << 12, 2 << 12, 3 << 12]
    assert abi.alloc_apf_token(abi.TOKEN_ID_LIMIT, 0) == (2, 1 << 12)
    assert abi.alloc_apf_token(abi.TOKEN_ID_LIMIT - 1, 5) == (abi.TOKEN_ID_LIMIT, 0xFFFFF005)


def test_token_is_well_formed_rejects_other_vcpus_and_reserved_values():
    assert not abi.token_is_well_formed(0, 0)
    assert not abi.token_is_well_formed(0xFFFFFFFF, 0xFFF)
    assert not abi.token_is_well_formed(abi.make_token(5, 1), 2)
    assert abi.token_is_well_formed(abi.make_token(5, 1), 1)


def test_en_decoding():
    v = abi.async_pf_en_value(0x1000, send_always=True)
    en = abi.AsyncPfEn(v)
    assert en.gpa == 0x1000 and en.enabled_bit and en.send_always and en.delivery_as_int and en.apf_enabled
    assert not abi.AsyncPfEn(0x1000 | abi.KVM_ASYNC_PF_ENABLED).apf_enabled  # 5.9+: no INT delivery, no APF
    with pytest.raises(ValueError):
        abi.async_pf_en_value(0x1010)
