#!/usr/bin/env bash
# Set up tfos-magic on a fresh Debian/Ubuntu machine with Python 3.11+:
# system packages (Java 17+, ZooKeeper, Chromium, Node for the front ends' build, iproute2 and
# util-linux for the multi-host tests) from apt, then a virtualenv in
# .venv with the package and its test extras from PyPI, and the JupyterLab sidebar
# linked into it; and .venv-spark35, the same with pyspark 3.5, for the Spark 3.5 tier.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

say() { printf 'setup: %s\n' "$*"; }

"$PYTHON" - <<'PY' || { echo "setup: Python 3.11+ is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ -n "$v" ] && [ "$v" -ge 17 ]
}

missing=()
java_ok || missing+=(java)
[ -x /usr/share/zookeeper/bin/zkServer.sh ] || missing+=(zookeeper)
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
"$PYTHON" -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
# npm builds the dashboard's JS bundle and the JupyterLab extension when the package is installed from source.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
# The multi-host tests (tests/multihost.py) make hosts of network, UTS and mount namespaces.
# ip is in /usr/sbin, off a plain user's PATH.
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)

if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  pkgs=()
  for p in "${missing[@]}"; do
    if [ "$p" = java ]; then
      for jre in openjdk-17-jre-headless openjdk-21-jre-headless openjdk-25-jre-headless; do
        if apt-cache show "$jre" >/dev/null 2>&1; then pkgs+=("$jre"); break; fi
      done
    else
      pkgs+=("$p")
    fi
  done
  $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
# PyTorch for the %%torch_train tests: nothing here needs CUDA, and PyPI's Linux build brings
# 5 GB of CUDA libraries, which with the deploy tests' packed copies can fill a CI disk. A CPU
# build where pip's find-links offer one (2.13.0+cpu sorts above 2.13.0), PyPI's elsewhere.
TORCH=${TFOS_TORCH:-torch==2.13.0}
stamp=.venv/.tfos-installed
want=$( (cat pyproject.toml; echo "$TORCH") | sha256sum | cut -d' ' -f1)
# The install also enables the Jupyter server extension (the sidebar's API), through a config
# file it puts in .venv/etc/jupyter/jupyter_server_config.d; an older install lacks it.
[ -f .venv/etc/jupyter/jupyter_server_config.d/tfos_magic.json ] || rm -f "$stamp"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing tfos-magic with its test extras into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # Playwright drives Debian's Chromium (/usr/bin/chromium): no browser download.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 .venv/bin/python -m pip install -q "$TORCH" -e '.[test]'
  echo "$want" > "$stamp"
fi
# The editable install copied the built JupyterLab extension into .venv; a link to the
# checkout's build instead makes a rebuild (npm run build:dev) show on the next page load.
if [ ! -L .venv/share/jupyter/labextensions/tfos-magic ]; then
  say "linking the JupyterLab extension into .venv"
  .venv/bin/jupyter-builder develop --overwrite .
fi
# The Spark 3.5 tier's environment (tests marked spark35, run by scripts/test.sh): pyspark
# 3.5 and its py4j of its own, everything else from .venv, whose site-packages a .pth file
# adds after its own (so its pyspark comes first).
SPARK35=3.5.9
if ! .venv-spark35/bin/python -c "import pyspark, sys; sys.exit(pyspark.__version__ != '$SPARK35')" 2>/dev/null; then
  say "creating .venv-spark35 (pyspark $SPARK35 over .venv's packages)"
  rm -rf .venv-spark35
  "$PYTHON" -m venv .venv-spark35
  base=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  own=$(.venv-spark35/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$base')" > "$own/tfos-base-env.pth"
  # Jupyter's data and config (nbconvert's templates, the server extension) under its prefix too.
  ln -sfn "$PWD/.venv/share" .venv-spark35/share
  ln -sfn "$PWD/.venv/etc" .venv-spark35/etc
  .venv-spark35/bin/python -m pip install -q --no-deps "pyspark==$SPARK35" "py4j==0.10.9.7"
fi
say "ready: .venv/bin/python -m pytest, or bash scripts/test.sh"
