#!/usr/bin/env bash
# Create (or update) the llm-compressor peer venv, separate from lowbit's.
#
#   bash benchmarks/peers/setup_llmcompressor.sh
#   PEER_VENV=/some/dir bash benchmarks/peers/setup_llmcompressor.sh
#
# Idempotent: re-running on a complete venv installs nothing. torch==2.13.0 goes in
# first so that pip keeps the CPU build (a looser torch requirement pulls CUDA wheels).
# Exact versions: constraints-llmcompressor.txt beside this file (llmcompressor
# 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu);
# llmcompressor 0.14 itself caps transformers at <=5.17.0, hence its own venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEER_VENV:-$HOME/.cache/lowbit-peers/llmcompressor}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c "$here/constraints-llmcompressor.txt" llmcompressor==0.14.0.1 torch==2.13.0

"$venv/bin/python" - <<'PY'
import compressed_tensors, llmcompressor, torch, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("llmcompressor", llmcompressor.__version__, "| compressed-tensors",
      compressed_tensors.__version__, "| transformers", transformers.__version__,
      "| torch", torch.__version__)
PY
echo "venv ready: $venv"
