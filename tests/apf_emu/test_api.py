# The Python API (apf_emu/api.py) on real processes: options checked by the command line's parser, every vCPU and
# host operation, typed events, the checker's verdict, and nothing left behind.
from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest

from apf_emu.api import VM, ApiError, ConfigError, LogEvent, check_logs
from tests.conftest import processes_mentioning


def gone(vm: VM) -> bool:
    return not processes_mentioning(vm.name) and not [n for n in os.listdir("/dev/shm") if vm.name in n] \
        and not vm.socket.exists()


@pytest.mark.parametrize("options,message", [
    ({"vcpu": 2}, "unknown VM option 'vcpu'"),
    ({"vcpus": 0}, "vcpus"),
    ({"abi": "nope"}, "abi"),
    ({"send_always": "yes"}, "a flag: True or False"),
    ({"pages": True}, "not a value for it"),
    ({"resident": 600}, "--resident 600 must be at least 2 and below --pages"),
])
def test_bad_options_are_config_errors_naming_them(options, message):
    with pytest.raises(ConfigError, match=message):
        VM(**options)


def test_every_operation_and_nothing_left(tmp_path):
    with VM(vcpus=2, pages=128, resident=32, page_in_latency="exp:1ms", log_dir=tmp_path) as vm:
        vm.wait_for("guest_apf_wake", n=10)
        with pytest.raises(ApiError, match="still runs"):
            vm.vcpus[0].restart()
        vm.vcpus[0].panic()
        assert vm.vcpus[0].exit_codes == {1: 70}
        vm.vcpus[0].restart()
        assert (vm.vcpus[0].boot, vm.vcpus[0].kind) == (2, "kdump")
        vm.vcpus[0].reboot()
        vm.vcpus[0].restart()
        assert vm.vcpus[0].kind == "normal"
        vm.vcpus[1].kill()
        with pytest.raises(ApiError, match="no running boot"):
            vm.vcpus[1].panic()
        vm.vcpus[1].restart()
        with vm.vcpus[1].paused_for():
            assert vm.vcpus[1].paused
        vm.host.kill()
        vm.host.restart()
        vm.wait_for("vcpu_connect", n=2, restored=True)
        vm.wait_for("guest_apf_wake", vcpu=1, boot=2)
        ready = vm.events("kvm_async_pf_ready", vcpu=1, injected=True)
        assert ready and all(isinstance(e, LogEvent) and e.role == "host" and e.vcpu == 1 for e in ready)
        assert isinstance(ready[0]["token"], int) and ready[0].get("nope", 7) == 7
    assert vm.problems == [] and vm.leftovers == [] and gone(vm)
    result = vm.check()
    result.assert_clean()
    assert result.stats.events["guest_boot"] == 5 and vm.host.starts == 2


def test_a_violation_and_an_empty_log_are_not_clean(tmp_path):
    with VM(vcpus=1, pages=64, resident=16, bugs="token-zero", log_dir=tmp_path / "bug") as vm:
        vm.wait_for("kvm_async_pf_not_present", n=300)
    result = vm.check()
    assert not result.ok and "token_format" in {v.invariant for v in result.violations}
    with pytest.raises(AssertionError, match="violations over"):
        result.assert_clean()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jsonl").write_text("{}\n")
    empty = check_logs(tmp_path / "empty")
    assert not empty.checked and not empty.ok and "NOT CHECKED" in empty.summary()


def test_a_guest_that_cannot_start_is_an_error_and_the_vm_is_stopped(tmp_path):
    vm = VM(vcpus=1, pages=64, resident=16, log_dir=tmp_path, kernel_ratio=0.5)
    # a guest pointed at a socket nobody listens on gives up after its connect timeout
    vm.guest_options = replace(vm.guest_options, connect_timeout=0.5, socket=tmp_path / "nobody.sock")
    with pytest.raises(ApiError, match="guest 0 boot 1 ended"):
        vm.start()
    assert gone(vm)


def test_a_boot_that_ended_on_its_own_is_a_problem_and_a_panic_boots_kdump(tmp_path):
    with VM(vcpus=2, pages=128, resident=32, log_dir=tmp_path) as vm:
        vm.wait_for("guest_apf_wake", n=5)
        os.kill(vm.vcpus[0].pid, signal.SIGUSR1)  # a panic the API did not ask for
        vm.wait_for("guest_crash", vcpu=0)
        vm.vcpus[0].proc.wait(15)
        vm.vcpus[0].restart()
        assert (vm.vcpus[0].boot, vm.vcpus[0].kind) == (2, "kdump")
        os.kill(vm.vcpus[1].pid, signal.SIGKILL)
        vm.vcpus[1].proc.wait(15)
    assert vm.problems == ["guest 1 boot 1 ended on its own: killed by SIGKILL"]
    assert vm.vcpus[0].exit_codes == {1: 70, 2: 0} and gone(vm)
