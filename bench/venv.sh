#!/usr/bin/env bash
# Prints the Python interpreter of the benchmark venv, creating or updating it first.
#   VENV=DIR: use that venv as it is (nothing installed), e.g. VENV=/work/venv.
#   otherwise: target/bench-venv, with exactly bench/requirements.txt (pinned versions);
#   reinstalled when requirements.txt changes. Needs python3 with venv (3.10 or newer).
# Usage: python=$(bench/venv.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VENV:-}" ]; then
  [ -x "$VENV/bin/python" ] || { echo "bench/venv.sh: VENV=$VENV has no bin/python" >&2; exit 1; }
  echo "$VENV/bin/python"
  exit 0
fi
venv=target/bench-venv
if ! cmp -s bench/requirements.txt "$venv/bench-requirements.txt" 2>/dev/null; then
  echo "bench/venv.sh: installing bench/requirements.txt into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r bench/requirements.txt >&2
  cp bench/requirements.txt "$venv/bench-requirements.txt"
fi
echo "$PWD/$venv/bin/python"
