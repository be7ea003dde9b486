#!/usr/bin/env bash
# Build llama.cpp's command-line tools that qtool's tests and benchmarks use as the real GGUF client:
#   llama-quantize, llama-imatrix   (oracles for qtool's imatrix files and quant mixes)
#   llama-perplexity, llama-tokenize, llama-bench   (qtool.eval.llamacpp: log-probs, KLD, tokenization, speed)
# from the llama.cpp sources vendored in the llama-cpp-python sdist on PyPI, into
#   ${XDG_CACHE_HOME:-~/.cache}/qtool/llama.cpp/<llama-cpp-python version>-<ISA tag>/bin/
# The ISA tag names the instruction sets the binaries were compiled for (read from /proc/cpuinfo), so a binary
# built on one CPU is never picked up on a CPU that lacks them:
#   avx512[-vbmi][-vnni][-bf16]   AVX-512 F/CD/VL/DQ/BW (+ the listed extensions) on top of the avx2 set
#   avx2                          SSE4.2 AVX AVX2 FMA F16C BMI2
#   base                          none of the above (x86-64 baseline); other machines: `uname -m`
# GGML_NATIVE stays OFF and AMX stays OFF even where cpuinfo lists amx_*: the VMs here list it but fault on
# `tilezero` (docs/formats.md 5.1). qtool/eval/llamacpp.py (isa_tag) computes the same tag in Python;
# tests/eval/test_llamacpp.py checks that `--print-isa` here agrees with it.
# Does nothing if all binaries are already there and run. Needs cmake, a C++17 compiler and PyPI access.
# Takes ~10-15 minutes on 2 cores the first time (only the tool targets and their libraries are built).
#
# Usage: tests/tools/build_llama_quantize.sh [PYTHON]     (PYTHON: interpreter with pip, default .venv/bin/python)
#        tests/tools/build_llama_quantize.sh --print-isa  (print "<tag> <cmake ISA flags>" and exit)
# Env:   QTOOL_LLAMA_CPP_VERSION  llama-cpp-python sdist version (default 0.3.36; qtool looks for the same default)
#        QTOOL_LLAMA_JOBS         parallel compile jobs (default: nproc)
#        QTOOL_LLAMA_CMAKE_ARGS   extra cmake arguments
set -euo pipefail

VERSION="${QTOOL_LLAMA_CPP_VERSION:-0.3.36}"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-tokenize llama-bench)

# ---- ISA tag and flags (keep in step with qtool/eval/llamacpp.py isa_tag) ----
cpu_flags=" $( (grep -m1 -E '^flags[[:space:]]*:' /proc/cpuinfo 2>/dev/null || true) | cut -d: -f2-) "
has() { local f; for f in "$@"; do [[ "$cpu_flags" == *" $f "* ]] || return 1; done; }
AMX_OFF=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
NO_X86=(-DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF
        -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF)
ARCH="$(uname -m)"
if [ "$ARCH" != x86_64 ]; then
    ISA="$ARCH"; ISA_FLAGS=()
elif has sse4_2 avx avx2 fma f16c bmi2; then
    ISA_FLAGS=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF)
    if has avx512f avx512cd avx512vl avx512dq avx512bw; then
        ISA=avx512; ISA_FLAGS+=(-DGGML_AVX512=ON)
        for ext in vbmi vnni bf16; do
            up="$(echo "$ext" | tr a-z A-Z)"
            if has "avx512_$ext"; then ISA="$ISA-$ext"; ISA_FLAGS+=("-DGGML_AVX512_$up=ON")
            else ISA_FLAGS+=("-DGGML_AVX512_$up=OFF"); fi
        done
    else
        ISA=avx2; ISA_FLAGS+=(-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF)
    fi
    ISA_FLAGS+=("${AMX_OFF[@]}")
else
    ISA=base; ISA_FLAGS=("${NO_X86[@]}" "${AMX_OFF[@]}")
fi

if [ "${1:-}" = "--print-isa" ]; then
    echo "$ISA ${ISA_FLAGS[*]+${ISA_FLAGS[*]}}"
    exit 0
fi

PY="${1:-.venv/bin/python}"
JOBS="${QTOOL_LLAMA_JOBS:-$(nproc 2>/dev/null || echo 2)}"
DEST="${XDG_CACHE_HOME:-$HOME/.cache}/qtool/llama.cpp/${VERSION}-${ISA}"

have_all() {
    local t
    for t in "${TOOLS[@]}"; do
        [ -x "$DEST/bin/$t" ] || return 1
        "$DEST/bin/$t" --help >/dev/null 2>&1 || [ $? -le 1 ] || return 1   # exits 0/1 on --help; a crash is >1
    done
}

if have_all; then
    echo "llama.cpp tools ${VERSION} (${ISA}) already built in $DEST/bin"
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

# Static, explicit ISA (GGML_NATIVE=OFF: -march=native would also switch on AMX), no network, no extras.
echo "configuring for ISA '${ISA}': ${ISA_FLAGS[*]+${ISA_FLAGS[*]}}"
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF ${ISA_FLAGS[@]+"${ISA_FLAGS[@]}"} \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF ${QTOOL_LLAMA_CMAKE_ARGS:-} >"$WORK/configure.log" \
    || { cat "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" --target "${TOOLS[@]}" -j "$JOBS"

mkdir -p "$DEST/bin"
for t in "${TOOLS[@]}"; do
    install -m 755 "$WORK/build/bin/$t" "$DEST/bin/.$t.tmp"
    mv -f "$DEST/bin/.$t.tmp" "$DEST/bin/$t"     # rename: a concurrent reader never sees a half-copied binary
done
{
    echo "llama-cpp-python ${VERSION} (vendored llama.cpp), built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s"
    echo "isa: ${ISA}"
    echo "cmake: -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF ${ISA_FLAGS[*]+${ISA_FLAGS[*]}}${QTOOL_LLAMA_CMAKE_ARGS:+ $QTOOL_LLAMA_CMAKE_ARGS}"
    echo "tools: ${TOOLS[*]}"
} >"$DEST/.BUILD_INFO.tmp"
mv -f "$DEST/.BUILD_INFO.tmp" "$DEST/BUILD_INFO"
cat "$DEST/BUILD_INFO"
have_all || { echo "error: built tools do not run" >&2; exit 1; }
