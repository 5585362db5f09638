#!/usr/bin/env bash
# Run the whole test suite (jest, then pytest); sets the machine up first (a no-op when already done).
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --fast     the fast tier: no TF process, a few minutes (pytest -m "not e2e")
#   bash scripts/test.sh -m cluster one tier: e2e, cluster, browser, wheel or examples
#   bash scripts/test.sh --spark35  the Spark 3.5 tier alone, in .venv-spark35
# Other arguments go to pytest. Everything (no --fast, -m or --spark35) ends with the
# Spark 3.5 tier: the tests marked spark35, run again on pyspark 3.5.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=()
spark35=all
for a in "$@"; do
  case "$a" in
    --fast) args+=(-m "not e2e"); spark35=no ;;
    --spark35) spark35=only ;;
    -m) args+=("$a"); spark35=no ;;
    *) args+=("$a") ;;
  esac
done
if [[ "$spark35" == only ]]; then
  exec .venv-spark35/bin/python -m pytest -m spark35 "${args[@]}"
fi
# The sidebar's front-end unit tests (jest), then everything else.
npm test --silent
status=0
.venv/bin/python -m pytest "${args[@]}" || status=$?
if [[ "$spark35" == all ]]; then
  .venv-spark35/bin/python -m pytest -m spark35 "${args[@]}" || status=$?
fi
exit "$status"
