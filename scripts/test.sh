#!/usr/bin/env bash
# Run the whole test suite (jest, then pytest); sets the machine up first (a no-op when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The sidebar's front-end unit tests (jest), then everything else.
npm test --silent
exec .venv/bin/python -m pytest "$@"
