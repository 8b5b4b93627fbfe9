#!/usr/bin/env bash
# The two commands of the README. Each sets up .venv (Python >= 3.11 and pip are all it needs)
# and then runs:
#   ./run.sh demo   the main job on the embedded default (configs/synthetic.py): train the three
#                   stages, then evaluate the chosen checkpoint on the validation volumes
#   ./run.sh test   the test suite in two processes (TEST_WORKERS=N for N; `-m "not slow"`:
#                   the quick part)
#   ./run.sh lint   ruff check (pyproject.toml's [tool.ruff]), as CI runs it before the tests
# Extra arguments after the command go to `curriculum-seg train` (demo), pytest (test) or
# ruff check (lint).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {
  local target=$1 stamp="$VENV/.installed-${2}"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall when pyproject.toml changed since the last install of this target.
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$target"
    touch "$stamp"
  fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo)
    setup . base
    export TF_CPP_MIN_LOG_LEVEL=2
    "$VENV/bin/curriculum-seg" train --config configs/synthetic.py --workdir runs/synthetic "$@"
    exec "$VENV/bin/curriculum-seg" evaluate --workdir runs/synthetic
    ;;
  test)
    setup ".[test]" test
    # Two test processes (pytest-xdist): the suite's time on a 2-core machine is about halved.
    exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
    ;;
  lint)
    setup ".[test]" test
    exec "$VENV/bin/ruff" check "$@"
    ;;
  *)
    echo "usage: ./run.sh demo|test|lint [args...]" >&2
    exit 2
    ;;
esac
