#!/usr/bin/env bash
# Downloads, on a Debian 12 machine with network, the .deb files run.sh unpacks on the GPU machine
# (which has no network and no Debian packages): the build's header and library dependencies
# that a PyTorch + CUDA image lacks. Not committed (debs/ is ignored).
#
#   benchmarks/device/fetch_debs.sh        # into benchmarks/device/debs/
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/debs"
cd "$here/debs"
# What configure finds (cmake/LemaDependencies.cmake, tests/CMakeLists.txt) and the runtime's
# Boost.Interprocess headers; liburing and SentencePiece are optional and left out.
packages=(
  nlohmann-json3-dev
  libcli11-dev
  libspdlog-dev libspdlog1.10
  libfmt-dev libfmt9
  libgtest-dev libgmock-dev
  zlib1g-dev zlib1g
  libboost1.74-dev
)
apt-get download "${packages[@]}"
ls -1 "$here/debs"
