#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test-env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
