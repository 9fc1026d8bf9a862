# The ABI axis (shared/abis.py): every ABI has its CPUID and description, and the option takes exactly those names.
from __future__ import annotations

import pytest

from shared import abis, config
from shared.abi import KVM_FEATURE_ASYNC_PF, KVM_FEATURE_ASYNC_PF_INT, KVM_FEATURE_ASYNC_PF_VE


def test_every_abi_is_described_and_advertised():
    assert set(abis.CPUID) == set(abis.DESCRIPTIONS) == set(abis.ABIS) and abis.DEFAULT_ABI in abis.ABIS
    for name in abis.ABIS:
        assert abis.CPUID[name] & KVM_FEATURE_ASYNC_PF
        # a 5.7 host (`pf`) knows nothing of interrupt delivery: a 5.8+ guest then runs without APF
        assert bool(abis.CPUID[name] & KVM_FEATURE_ASYNC_PF_INT) == (name != "pf")
    assert abis.CPUID["ve"] & KVM_FEATURE_ASYNC_PF_VE and not abis.CPUID["int"] & KVM_FEATURE_ASYNC_PF_VE


@pytest.mark.parametrize("name", abis.ABIS)
def test_the_abi_option_takes_each_name_on_both_sides(name):
    assert config.parse(config.HostOptions, ["--abi", name]).abi == name
    assert config.parse(config.GuestOptions, ["--abi", name]).abi == name
    with pytest.raises(config.ConfigError, match="--abi"):
        config.parse(config.HostOptions, ["--abi", name + "x"])
