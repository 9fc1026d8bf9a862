# The registry of historical host bugs (shared/bugs.py): names parse, print back, and each names its fix.
from __future__ import annotations

import pytest

from shared import bugs


def test_parse_and_spec_round_trip():
    assert bugs.parse("none") == frozenset() and bugs.spec(frozenset()) == "none"
    every = frozenset(bugs.NAMES)
    assert bugs.parse(bugs.spec(every)) == every
    assert bugs.parse(" Token-Zero , bz208081 ") == {"token-zero", "bz208081"}


def test_an_unknown_bug_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown host bug 'bz1'.*known are bz208081"):
        bugs.parse("bz208081,bz1")


@pytest.mark.parametrize("name", bugs.NAMES)
def test_every_bug_names_its_kernel_function_and_its_fix(name):
    bug = bugs.BUGS[name]
    assert bug.function.startswith(("kvm_", "alloc_apf_token")) and bug.fix and bug.what
