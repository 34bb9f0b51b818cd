# Sourced by scripts/demo and scripts/test: make ./.venv and install the project into it.
# Needs only python3 (3.11 or newer) with pip and venv; set PYTHON to choose another interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
extras="${1:-}"
# The install is editable, so source changes need none; only pyproject.toml (dependencies,
# entry points) does. Installing again anyway would cost every run several seconds.
stamp=".venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
    touch "$stamp"
fi
