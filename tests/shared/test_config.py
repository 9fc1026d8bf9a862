# The one home of options (shared/config.py): defaults, ranges, APF_EMU_* variables, cross-checks, and the command
# lines built from typed options, which parse back to the same options.
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import config as c

ROOT = Path(__file__).resolve().parents[2]


def parse(cls, table, argv, environ=None):
    parser = argparse.ArgumentParser()
    c.add_options(parser, table, defaults=c.env_defaults(table, environ or {}))
    return c.from_args(cls, parser.parse_args(argv))


def test_defaults_are_the_dataclass_defaults():
    assert parse(c.HostOptions, c.HOST_OPTIONS, []) == c.HostOptions()
    assert parse(c.GuestOptions, c.GUEST_OPTIONS, []) == c.GuestOptions()
    assert c.GuestOptions().vector == 0xF3 and c.GuestOptions().vcpu is None and c.GuestOptions().boot == 0


def test_environment_supplies_defaults_and_the_command_line_wins():
    env = {"APF_EMU_VCPUS": "4", "APF_EMU_PAGE_IN_LATENCY": "fixed:1ms", "APF_EMU_LOG_STDOUT": "1"}
    opts = parse(c.HostOptions, c.HOST_OPTIONS, [], env)
    assert (opts.vcpus, opts.page_in_latency, opts.log_stdout) == (4, c.PageInLatency("fixed", 0.001), True)
    assert parse(c.HostOptions, c.HOST_OPTIONS, ["--vcpus", "3"], env).vcpus == 3
    guest = parse(c.GuestOptions, c.GUEST_OPTIONS, [], {"APF_EMU_VECTOR": "0xec", "APF_EMU_TRANSPORT": "signal"})
    assert (guest.vector, guest.transport) == (0xEC, "signal")


@pytest.mark.parametrize("name,value", [("VCPUS", "four"), ("VCPUS", "0"), ("PAGE_IN_LATENCY", "soon"),
                                        ("LOG_STDOUT", "maybe")])
def test_a_bad_environment_value_names_the_variable(name, value):
    with pytest.raises(c.ConfigError, match=f"APF_EMU_{name}"):
        c.env_defaults(c.HOST_OPTIONS, {f"APF_EMU_{name}": value})


@pytest.mark.parametrize("argv,option", [
    (["--vcpus", "65"], "--vcpus"), (["--pages", "1"], "--pages"), (["--page-in-latency", "uniform:5ms:1ms"],
                                                                      "--page-in-latency"),
    (["--pages", "10", "--resident", "20"], "--resident"), (["--vm", "a/b"], "--vm"),
])
def test_a_bad_host_value_is_a_usage_error_naming_the_option(argv, option):
    proc = subprocess.run([sys.executable, "-m", "host_daemon", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == c.EXIT_USAGE
    assert option in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,option", [
    (["--tasks", "0"], "--tasks"), (["--vector", "300"], "--vector"), (["--kernel-ratio", "1.5"], "--kernel-ratio"),
    (["--transport", "pigeon"], "--transport"), (["--apf-reinit-every", "-1"], "--apf-reinit-every"),
])
def test_a_bad_guest_value_is_a_usage_error_naming_the_option(argv, option):
    proc = subprocess.run([sys.executable, "-m", "guest_agent", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == c.EXIT_USAGE
    assert option in proc.stderr and "Traceback" not in proc.stderr and "<lambda>" not in proc.stderr


def test_environment_errors_of_the_daemons_name_the_variable():
    proc = subprocess.run([sys.executable, "-m", "guest_agent"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"APF_EMU_KERNEL_RATIO": "most", "PATH": "/usr/bin"})
    assert proc.returncode == c.EXIT_USAGE and "APF_EMU_KERNEL_RATIO" in proc.stderr


@given(vcpus=st.integers(1, 64), pages=st.integers(3, 1 << 20), data=st.data(),
       latency=st.sampled_from(["0", "fixed:2ms", "exp:150us", "uniform:1ms:3ms", "exp:0.123456789ms"]))
def test_host_command_lines_parse_back_to_their_options(vcpus, pages, data, latency):
    resident = data.draw(st.integers(2, pages - 1))
    opts = c.HostOptions(vcpus=vcpus, pages=pages, resident=resident, page_in_latency=c.PageInLatency.parse(latency),
                         vm="x.y-1", seed=data.draw(st.integers(0, 2**63 - 1)), recover=data.draw(st.booleans()))
    argv = opts.argv()
    assert argv[:3] == [sys.executable, "-m", "host_daemon"]
    assert parse(c.HostOptions, c.HOST_OPTIONS, argv[3:]) == opts


@given(vcpu=st.none() | st.integers(0, 63), vector=st.integers(0, 255), ratio=st.floats(0, 1),
       transport=st.sampled_from(["socket", "signal"]), flags=st.lists(st.booleans(), min_size=3, max_size=3),
       reinit=st.none() | st.floats(0.001, 100))
def test_guest_command_lines_parse_back_to_their_options(vcpu, vector, ratio, transport, flags, reinit):
    opts = c.GuestOptions(vcpu=vcpu, vector=vector, shared_ratio=ratio, transport=transport, send_always=flags[0],
                          no_apf=flags[1], kdump_no_kvmapf=flags[2], apf_reinit_every=reinit)
    assert parse(c.GuestOptions, c.GUEST_OPTIONS, opts.argv()[3:]) == opts
