#!/usr/bin/env bash
# Build llama.cpp's llama-server (a real third-party engine the fleet tests run against) once per machine,
# from the llama.cpp vendored in llama-cpp-python's sdist (pinned by hash), and print the binary's path.
# The build is -march=native, so it is cached per machine under the user's cache dir, never in the repo.
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PY=${PYTHON:-python3}
CPU=$( (grep -m1 'model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo) | sha256sum | cut -c1-12)
DIR=${XDG_CACHE_HOME:-$HOME/.cache}/tokenfab/llama-server-$VERSION-$CPU
BIN=$DIR/bin/llama-server
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "building llama-server $VERSION into $DIR (about 8 minutes on 2 cores, once per machine)" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
TAR=$(ls "$WORK"/llama_cpp_python-$VERSION.tar.gz)
echo "$SHA256  $TAR" | sha256sum -c --quiet - >&2
tar -xzf "$TAR" -C "$WORK"
SRC=$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp
# the UI flags matter: by default the build fetches web assets from a model hub, which may be unreachable
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
nice -n 10 cmake --build "$WORK/build" --target llama-server -j"$(nproc)" >&2
mkdir -p "$DIR/bin"
cp "$WORK/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
