# apf-emu's pytest plugin (the `pytest11` entry point `apf_emu`): fixtures over the Python API (apf_emu/api.py)
# for VMM projects' tests, loaded by pytest wherever apf-emu is installed.
#
#   apf_vm        a running VM; its options come from `@pytest.mark.apf_vm(vcpus=2, abi="pf", ...)` over the
#                 `apf_vm_options` fixture (a project overrides it in its conftest.py for its own defaults). At
#                 teardown the VM is stopped and its logs checked: a violation fails the test (as an error in
#                 teardown, with the checker's messages and the log directory).
#   apf_log_dir   the directory the VM logs into (under the test's tmp_path, which pytest keeps for a few runs).
#   apf_logs      a log directory for a test that starts its own processes (`apf-emu run --log-dir`, a VMM under
#                 test): checked at teardown the same way; logs with nothing to check fail too, as a check that
#                 read nothing has not passed.
# Whatever ends the test (a failed assertion, an exception, Ctrl-C), the VM is stopped and nothing is left behind:
# no process, no shm object, no socket (apf_emu/api.py says how, even when the test process itself is killed).
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .api import VM, CheckResult, check_logs, stop_all

MARK = "apf_vm"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}(**options): the options of the apf_vm fixture's VM (those of "
                            "`apf-emu run`, as keywords: vcpus=2, abi='pf', transport='signal', ...)")


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_all()  # a session cut short (Ctrl-C between a setup and its teardown): no VM outlives it


@pytest.fixture
def apf_vm_options() -> dict[str, Any]:
    """The default options of `apf_vm` (none: `apf-emu run`'s defaults); override it in a conftest.py."""
    return {}


@pytest.fixture
def apf_log_dir(tmp_path: Path) -> Path:
    return tmp_path / "apf-emu-logs"


@pytest.fixture
def apf_vm(request: pytest.FixtureRequest, apf_vm_options: dict[str, Any], apf_log_dir: Path) -> Iterator[VM]:
    """A running VM (host and guests booted); stopped and checked at teardown."""
    options = dict(apf_vm_options)
    for mark in reversed(list(request.node.iter_markers(MARK))):  # the closest mark (the function's) wins
        options.update(mark.kwargs)
    vm = VM(log_dir=apf_log_dir, **options)
    with vm:
        yield vm
    problems = [*vm.problems, *vm.leftovers]
    _judge(check_logs(apf_log_dir), apf_log_dir, problems)


@pytest.fixture
def apf_logs(apf_log_dir: Path) -> Iterator[Path]:
    """A log directory (made) for the test to fill; its logs are checked at teardown."""
    apf_log_dir.mkdir(parents=True, exist_ok=True)
    yield apf_log_dir
    try:
        result = check_logs(apf_log_dir)
    except Exception as exc:  # no logs at all: a LogInputError saying so
        pytest.fail(f"apf-emu: the logs in {apf_log_dir} cannot be checked: {exc}", pytrace=False)
    _judge(result, apf_log_dir, [])


def _judge(result: CheckResult, log_dir: Path, problems: list[str]) -> None:
    lines = [f"apf-emu: {result.summary()}"] if not result.ok else []
    lines += [f"apf-emu: {p}" for p in problems]
    if lines:
        lines.append(f"apf-emu: logs in {log_dir} (apf-emu check {log_dir})")
        pytest.fail("\n".join(lines), pytrace=False)
