#!/usr/bin/env bash
# Create (or update) the bitsandbytes peer venv, separate from lowbit's.
#
#   bash benchmarks/peers/setup_bnb.sh
#   PEER_VENV=/some/dir bash benchmarks/peers/setup_bnb.sh
#
# Idempotent. torch==2.13.0 goes in first so that pip keeps the CPU build.
# Exact versions: constraints-bnb.txt beside this file (bitsandbytes 0.50.2, whose
# wheel ships libbitsandbytes_cpu.so; transformers 5.23.0; torch 2.13.0+cpu).
# The optional `kernels` package (CPU 4-bit GEMM fetched from the model hub) is not
# installed: no hub here, so NF4 runs bitsandbytes' built-in CPU path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEER_VENV:-$HOME/.cache/lowbit-peers/bnb}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c "$here/constraints-bnb.txt" bitsandbytes==0.50.2 transformers accelerate numpy torch==2.13.0

"$venv/bin/python" - <<'PY'
import bitsandbytes, torch, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("bitsandbytes", bitsandbytes.__version__, "| transformers", transformers.__version__,
      "| torch", torch.__version__)
PY
echo "venv ready: $venv"
