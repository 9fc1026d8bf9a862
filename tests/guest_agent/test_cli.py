# apf-guest's options from APF_EMU_* variables (compose replicas are configured that way): same defaults, clear
# usage errors for bad values; with neither --vcpu nor --boot the host assigns both.
from __future__ import annotations

import pytest

from guest_agent.cli import build_parser


def test_defaults_leave_vcpu_and_boot_to_the_host():
    args = build_parser().parse_args([])
    assert args.vcpu == -1 and args.boot == 0 and args.tasks == 4 and args.vector == 0xF3


def test_environment_supplies_defaults(monkeypatch):
    monkeypatch.setenv("APF_EMU_TASKS", "6")
    monkeypatch.setenv("APF_EMU_VECTOR", "0xec")
    monkeypatch.setenv("APF_EMU_TRANSPORT", "signal")
    args = build_parser().parse_args([])
    assert (args.tasks, args.vector, args.transport) == (6, 0xEC, "signal")


def test_bad_environment_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("APF_EMU_KERNEL_RATIO", "most")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code == 2 and "--kernel-ratio" in capsys.readouterr().err
