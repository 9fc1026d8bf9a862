# The project's shape: shared/ imports neither side; host and guest never import each other (they meet only
# through the contract and the wire); no package imports the benchmarks; no import cycles inside a package; every
# package is mypy --strict clean and the whole tree ruff clean (the linter of the test command).
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.transports import TRANSPORTS

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "shared": {"host_daemon", "guest_agent", "apf_emu"},
    "host_daemon": {"guest_agent", "apf_emu"},
    "guest_agent": {"host_daemon", "apf_emu"},
    "apf_emu": {"host_daemon", "guest_agent", "bench"},
    "bench": {"host_daemon", "guest_agent"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_boundaries(package):
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[package])
        for f in (ROOT / package).rglob("*.py")
        if imported_packages(f) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_every_module_opens_with_a_design_comment():
    missing = []
    for package in FORBIDDEN:
        for f in (ROOT / package).glob("*.py"):
            if f.name in ("__main__.py",):
                continue
            first = f.read_text().lstrip().splitlines()[0]
            if not (first.startswith("#") or first.startswith('"""')):
                missing.append(str(f.relative_to(ROOT)))
    assert missing == []


def test_every_package_is_mypy_strict_clean():
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(FORBIDDEN) <= set(re.findall(r'"(\w+)"', (ROOT / "pyproject.toml").read_text().split("files = ")[1]
                                            .split("]")[0]))


def test_the_tree_is_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def local_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports at module level (not inside functions)."""
    out: dict[str, set[str]] = {}
    for f in (ROOT / package).glob("*.py"):
        tree = ast.parse(f.read_text(), str(f))
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith(package + "."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports count too: a cycle of design
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and sub.level == 1 and sub.module:
                        deps.add(sub.module.split(".")[0])
        out[f.stem] = deps
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_cycles(package):
    graph = local_imports(package)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, node, dep])}")
            if dep in graph and not state.get(dep):
                visit(dep, [*path, node])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [])


@pytest.mark.parametrize("name", TRANSPORTS)
def test_every_transport_has_a_backend_on_both_sides(name):
    """shared/transports.py is the one registry: each name has host_daemon/transports/<name>.py with a `Notifier`
    and guest_agent/transports/<name>.py with a `Transport` (the two other files a new transport touches)."""
    from guest_agent.transports.base import Transport as TransportBase

    host = importlib.import_module(f"host_daemon.transports.{name}")
    guest = importlib.import_module(f"guest_agent.transports.{name}")
    assert all(callable(getattr(host.Notifier, m, None)) for m in ("inject_exception", "interrupt", "close"))
    assert issubclass(guest.Transport, TransportBase)
    backends = {p.stem for p in (ROOT / "host_daemon" / "transports").glob("*.py")} - {"__init__"}
    assert backends == set(TRANSPORTS)
