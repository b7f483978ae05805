#!/usr/bin/env bash
# Build llama.cpp's llama-server (the chat anchor, see shared/docs/ANCHORS.md) and llama-quantize
# (for bench/make_models.sh) from the llama.cpp source vendored in the PyPI sdist of
# llama-cpp-python 0.3.36 (llama.cpp commit 0c1e570).
#
#   bench/setup_llama_server.sh            # -> bench/.work/llama.cpp/build/bin/{llama-server,llama-quantize}
#
# Idempotent: does nothing if both binaries exist (delete bench/.work/llama.cpp to rebuild).
# Needs a C++ compiler and cmake; installs cmake with apt-get if missing (pip if apt is not usable).
# Environment: PIP (pip to download the sdist; default <repo>/.venv/bin/pip or pip3), JOBS (-j, 2).
set -euo pipefail

VERSION=0.3.36
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
WORK="$HERE/.work/llama.cpp"
DL="$WORK/dl"
SRC="$WORK/llama_cpp_python-$VERSION"
BUILD="$WORK/build"
BIN="$BUILD/bin/llama-server"
QUANTIZE_BIN="$BUILD/bin/llama-quantize"
JOBS="${JOBS:-2}"

if [[ -x "$BIN" && -x "$QUANTIZE_BIN" ]]; then
    echo "already built: $BIN $QUANTIZE_BIN"
    exit 0
fi

if [[ -z "${PIP:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/pip" ]]; then PIP="$REPO/.venv/bin/pip"; else PIP="pip3"; fi
fi

if ! command -v cmake >/dev/null 2>&1; then
    echo "cmake not found; installing it"
    if command -v apt-get >/dev/null 2>&1 && { [[ $(id -u) -eq 0 ]] || command -v sudo >/dev/null; }; then
        SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
        if ! { $SUDO apt-get update && $SUDO apt-get install -y cmake; }; then
            echo "apt-get failed; trying pip"
            "$PIP" install cmake
        fi
    else
        "$PIP" install cmake
    fi
    hash -r
    if ! command -v cmake >/dev/null 2>&1 && [[ -x "$(dirname "$PIP")/cmake" ]]; then
        export PATH="$(dirname "$PIP"):$PATH"
    fi
fi
command -v cmake >/dev/null || { echo "cmake still missing" >&2; exit 1; }
command -v c++ >/dev/null || { echo "no C++ compiler (c++) found" >&2; exit 1; }

mkdir -p "$DL"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    if ! ls "$DL"/llama_cpp_python-$VERSION.tar.gz >/dev/null 2>&1; then
        # --no-binary for this package only: `--no-binary :all:` would also make pip build the
        # sdist's build dependencies (cmake, ninja) from source to prepare its metadata.
        "$PIP" download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$DL"
    fi
    tar xzf "$DL/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi

cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$BUILD" -j"$JOBS" --target llama-server llama-quantize

"$BIN" --version 2>&1 | head -n 3 || true
echo "built: $BIN $QUANTIZE_BIN"
