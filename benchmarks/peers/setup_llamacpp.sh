#!/usr/bin/env bash
# Build llama-cpp-python 0.3.x (llama.cpp itself, through its Python bindings) into a
# venv of its own, separate from lowbit's:
#
#   bash benchmarks/peers/setup_llamacpp.sh
#   PEER_VENV=/some/dir bash benchmarks/peers/setup_llamacpp.sh
#
# The wheel is compiled from source for a fixed x86-64 feature set (AVX2/FMA/F16C, no
# AVX-512, no AMX) instead of llama.cpp's default -march=native build: the native build
# crashes on quantized GGUFs on this project's CPU. Building takes about 5 minutes on 2
# cores. Idempotent: an existing venv with llama_cpp importable is left as it is
# (set REBUILD=1 to build again).
set -euo pipefail
venv="${PEER_VENV:-$HOME/.cache/lowbit-peers/llamacpp}"
python="${PYTHON:-python3}"
spec="${LLAMACPP_SPEC:-llama-cpp-python>=0.3,<0.4}"

if [ -z "${REBUILD:-}" ] && [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    "$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
    echo "venv ready: $venv"
    exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip wheel
wheels="$venv/wheels"
rm -rf "$wheels" && mkdir -p "$wheels"
# --no-binary/--no-cache-dir: never reuse a wheel pip cached from some other build (pip's
# wheel cache is keyed by the sdist, not by CMAKE_ARGS, so it may be a native build).
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
        "${pip[@]}" wheel --no-deps --no-binary llama-cpp-python --no-cache-dir --wheel-dir "$wheels" "$spec"
# The bindings' own dependencies (numpy, typing-extensions, diskcache, jinja2) from PyPI.
"${pip[@]}" install --quiet --force-reinstall "$wheels"/llama_cpp_python-*.whl
"$venv/bin/python" -c "import llama_cpp, numpy; print('llama-cpp-python', llama_cpp.__version__, '| numpy', numpy.__version__)"
echo "venv ready: $venv"
