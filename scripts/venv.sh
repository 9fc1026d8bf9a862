# Sourced by scripts/run and scripts/test: create or reuse the project's virtual environment in .venv and install
# apf-emu into it (editable, with the test extras) whenever pyproject.toml is newer than the last install.
# APF_EMU_PYTHON picks the interpreter (default python3; 3.11 or newer).
set -euo pipefail
py=${APF_EMU_PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "apf-emu needs Python 3.11 or newer as '$py' (set APF_EMU_PYTHON)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "scripts: creating .venv" >&2
    if ! "$py" -m venv .venv; then
        echo "scripts: '$py -m venv' failed; on Debian install python3-venv" >&2
        exit 2
    fi
fi
stamp=.venv/.apf-emu-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "scripts: installing apf-emu and its dependencies into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
