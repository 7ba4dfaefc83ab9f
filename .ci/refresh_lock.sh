#!/usr/bin/env bash
# Refresh requirements.lock: a fresh virtualenv from pyproject's ranges alone (newest versions that
# fit), the README's test command in it, and the lock rewritten only when every test passed.
# A deliberate step: review `git diff requirements.lock` and commit it on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q -e '.[cpu,dev]'
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -q
{
  echo "# Exact versions the tests passed with on $(date -u +%Y-%m-%d) (Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')),"
  echo "# written by .ci/refresh_lock.sh from pyproject.toml's ranges. Used as pip constraints:"
  echo "#   .venv/bin/pip install -c requirements.lock -e '.[cpu,dev]'"
  "$venv/bin/pip" freeze --exclude-editable | grep -v '^cnnloop'
} > requirements.lock
# The editable install points at this checkout; put the README's .venv back on it.
[ -x .venv/bin/pip ] && .venv/bin/pip install -q -c requirements.lock -e '.[cpu,dev]'
echo "requirements.lock rewritten; review: git diff requirements.lock"
