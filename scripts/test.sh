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

# scripts/launch_cluster.sh is tested against a real sshd on loopback (Debian's openssh-server).
if [ "$(id -u)" = 0 ] && ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server
fi

python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[test]'

# The az:// storage tests run against Azurite (Azure Storage emulator, npm), kept in .azurite/.
AZURITE_VERSION=3.35.0
if [ ! -x .azurite/node_modules/.bin/azurite-blob ] \
  || ! grep -qs "\"version\": \"$AZURITE_VERSION\"" .azurite/node_modules/azurite/package.json; then
  command -v npm >/dev/null || { echo "npm (Node.js 20) is needed to install Azurite" >&2; exit 1; }
  npm install --prefix .azurite --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION"
fi

python -m ruff check odibi_actor tests scripts
python -m pytest "$@"
