#!/usr/bin/env bash
# Run the whole test suite (jest, then pytest); sets the machine up first (a no-op when already done).
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --fast     the fast tier: no TF process, a few minutes (pytest -m "not e2e")
#   bash scripts/test.sh -m cluster one tier: e2e, cluster, browser, wheel or examples
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=()
for a in "$@"; do
  if [[ "$a" == "--fast" ]]; then args+=(-m "not e2e"); else args+=("$a"); fi
done
# The sidebar's front-end unit tests (jest), then everything else.
npm test --silent
exec .venv/bin/python -m pytest "${args[@]}"
