#!/usr/bin/env bash
# Install mergekit 0.1.5 into its own venv (benchmarks/cache/mergekit-venv), for the benchmark only.
#
# The venv sees the system site-packages so that mergekit reuses the torch already installed
# (2.13.0+cpu). torch is pinned with a constraint: if mergekit ever needed another torch, pip fails
# here instead of downloading a multi-GB CUDA build. moerge itself never depends on mergekit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/cache/mergekit-venv"
PY=${PYTHON:-python3}
TORCH_WANTED=2.13.0+cpu

torch_of() { "$1" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "none"; }

sys_torch=$(torch_of "$PY")
if [ "$sys_torch" != "$TORCH_WANTED" ]; then
    echo "setup_mergekit: ABORT: $PY has torch $sys_torch, expected $TORCH_WANTED" >&2
    echo "setup_mergekit: (the venv reuses the system torch; run scripts/setup.sh first)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/mergekit-yaml" ]; then
    echo "setup_mergekit: creating $venv"
    "$PY" -m venv --system-site-packages "$venv"
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo "torch==$sys_torch" > "$constraints"
    "$venv/bin/python" -m pip install --quiet -c "$constraints" "mergekit==0.1.5"
fi

venv_torch=$(torch_of "$venv/bin/python")
if [ "$venv_torch" != "$TORCH_WANTED" ]; then
    echo "setup_mergekit: ABORT: the mergekit venv has torch $venv_torch, expected $TORCH_WANTED" >&2
    echo "setup_mergekit: delete $venv and investigate before re-running" >&2
    exit 1
fi
mk_version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"))')
echo "setup_mergekit: mergekit $mk_version with torch $venv_torch ready: $venv/bin/mergekit-yaml"
