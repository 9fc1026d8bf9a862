# apf-host's options: every one can come from an APF_EMU_* variable (how compose configures it), with the same
# default, and a bad value from either place is a clear usage error, not a traceback.
from __future__ import annotations

import pytest

from host_daemon.cli import build_parser
from host_daemon.pager import PageInLatency


def test_environment_supplies_defaults(monkeypatch):
    defaults = build_parser().parse_args([])
    assert (defaults.vcpus, defaults.pages, defaults.resident) == (2, 512, 384)
    monkeypatch.setenv("APF_EMU_VCPUS", "4")
    monkeypatch.setenv("APF_EMU_PAGE_IN_LATENCY", "fixed:1ms")
    monkeypatch.setenv("APF_EMU_LOG_STDOUT", "1")
    args = build_parser().parse_args([])
    assert args.vcpus == 4 and args.page_in_latency == PageInLatency.parse("fixed:1ms") and args.log_stdout
    assert build_parser().parse_args(["--vcpus", "3"]).vcpus == 3, "the command line wins"


@pytest.mark.parametrize("name,value,option", [("VCPUS", "four", "--vcpus"), ("PAGE_IN_LATENCY", "soon",
                                                                               "--page-in-latency")])
def test_bad_environment_value_is_a_usage_error(monkeypatch, capsys, name, value, option):
    monkeypatch.setenv(f"APF_EMU_{name}", value)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err
