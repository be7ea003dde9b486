#!/usr/bin/env bash
# Build llama.cpp's `llama-quantize` and `llama-imatrix` (the real oracles for qtool's imatrix files)
# from the llama.cpp sources vendored in the llama-cpp-python sdist on PyPI, into
#   ${XDG_CACHE_HOME:-~/.cache}/qtool/llama.cpp/<llama-cpp-python version>/bin/
# Does nothing if both binaries are already there and run. Needs cmake, a C++17 compiler and PyPI access.
# Takes ~10 minutes on 2 cores the first time (only the two tool targets and their libraries are built).
#
# Usage: tests/tools/build_llama_quantize.sh [PYTHON]     (PYTHON: interpreter with pip, default .venv/bin/python)
# Env:   QTOOL_LLAMA_CPP_VERSION  llama-cpp-python sdist version (default 0.3.36; tests look for the same default)
#        QTOOL_LLAMA_JOBS         parallel compile jobs (default: nproc)
#        QTOOL_LLAMA_CMAKE_ARGS   extra cmake arguments
set -euo pipefail

PY="${1:-.venv/bin/python}"
VERSION="${QTOOL_LLAMA_CPP_VERSION:-0.3.36}"
JOBS="${QTOOL_LLAMA_JOBS:-$(nproc 2>/dev/null || echo 2)}"
DEST="${XDG_CACHE_HOME:-$HOME/.cache}/qtool/llama.cpp/${VERSION}"
TOOLS=(llama-quantize llama-imatrix)

have_all() {
    local t
    for t in "${TOOLS[@]}"; do
        [ -x "$DEST/bin/$t" ] || return 1
        "$DEST/bin/$t" --help >/dev/null 2>&1 || [ $? -le 1 ] || return 1   # exits 0/1 on --help; a crash is >1
    done
}

if have_all; then
    echo "llama.cpp tools ${VERSION} already built in $DEST/bin"
    exit 0
fi

command -v cmake >/dev/null || { echo "error: cmake not found" >&2; exit 1; }
command -v c++ >/dev/null || command -v g++ >/dev/null || { echo "error: no C++ compiler found" >&2; exit 1; }

mkdir -p "$DEST"
WORK="$(mktemp -d "$DEST/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

echo "downloading llama-cpp-python==${VERSION} sdist"
"$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==${VERSION}" -d "$WORK"
tar -xzf "$WORK"/llama_cpp_python-"${VERSION}".tar.gz -C "$WORK" "llama_cpp_python-${VERSION}/vendor/llama.cpp"
SRC="$WORK/llama_cpp_python-${VERSION}/vendor/llama.cpp"

# Static, portable (GGML_NATIVE=OFF: a cached binary must not SIGILL on another CPU), no network, no extras.
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF ${QTOOL_LLAMA_CMAKE_ARGS:-} >"$WORK/configure.log" \
    || { cat "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" --target "${TOOLS[@]}" -j "$JOBS"

mkdir -p "$DEST/bin"
for t in "${TOOLS[@]}"; do
    install -m 755 "$WORK/build/bin/$t" "$DEST/bin/.$t.tmp"
    mv -f "$DEST/bin/.$t.tmp" "$DEST/bin/$t"     # rename: a concurrent reader never sees a half-copied binary
done
echo "llama-cpp-python ${VERSION} (vendored llama.cpp), built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s" >"$DEST/BUILD_INFO"
cat "$DEST/BUILD_INFO"
have_all || { echo "error: built tools do not run" >&2; exit 1; }
