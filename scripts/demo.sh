#!/usr/bin/env bash
# The README's first command: set up this machine (scripts/setup.sh), then train the
# quickstart job headless on a local Spark session and write its executed notebook and
# an HTML report. Prints where they are and how to open the examples in JupyterLab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

out=${TFOS_DEMO_OUT:-demo}
mkdir -p "$out"
printf '\ndemo: training the quickstart job (2 TF workers in Spark tasks)\n'
.venv/bin/tfos run example-notebooks/quickstart.ipynb --output "$out/quickstart.ipynb" --html "$out/quickstart.html"
.venv/bin/tfos status quickstart
root=""
if [ "$(id -u)" -eq 0 ]; then root=" --allow-root"; fi
cat <<MSG

demo: done. The executed notebook is $out/quickstart.ipynb, its report $out/quickstart.html;
      the trained model is the "model" path above (tfos_magic.get_job("quickstart").load_model()).
      Open the examples in JupyterLab:
        .venv/bin/jupyter lab$root example-notebooks/
MSG
