# The project's shape: shared/ imports neither side; host and guest never import each other (they meet only
# through the contract and the wire); shared/ is mypy-clean.
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "shared": {"host_daemon", "guest_agent", "apf_emu"},
    "host_daemon": {"guest_agent", "apf_emu"},
    "guest_agent": {"host_daemon", "apf_emu"},
    "apf_emu": {"host_daemon", "guest_agent"},
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


def test_shared_is_mypy_clean():
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
