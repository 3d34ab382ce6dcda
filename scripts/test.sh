#!/usr/bin/env bash
# Installs everything the test suite needs, then runs it. Usage: bash scripts/test.sh [pytest args]
# Uses the active virtualenv, or creates .venv when none is active.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[test]'

python -m ruff check odibi_actor tests scripts
python -m pytest "$@"
