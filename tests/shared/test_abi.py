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


@given(st.integers(0, abi.TOKEN_ID_LIMIT - 1), st.integers(0, 63))
def test_next_apf_id_never_yields_a_reserved_token(apf_id, vcpu):
    nxt = abi.next_apf_id(apf_id, vcpu)
    token = abi.make_token(nxt, vcpu)
    assert abi.token_is_well_formed(token, vcpu)
    assert nxt != apf_id


def test_first_token_of_vcpu0_is_not_zero():
    assert abi.make_token(abi.next_apf_id(0, 0), 0) == 1 << 12


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
