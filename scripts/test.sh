#!/usr/bin/env bash
# The test command: lint and format checks, then the whole suite, integration tests (real Ray, vLLM,
# DeepSpeed, Serve) included, with the 25 slowest tests listed (the suite has a 25-minute budget).
# Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not integration"` for the fast loop.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || { echo "run: .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/python -m pytest tests --durations=25 "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
