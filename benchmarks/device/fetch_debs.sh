#!/usr/bin/env bash
# Downloads, on a Debian 12 machine with network, the .deb files run.sh unpacks on the GPU machine
# (which has no network and no Debian packages): the build's header and library dependencies
# that a PyTorch + CUDA image lacks. Not committed (debs/ is ignored); the device call carries
# benchmarks/device/debs (about 12 MiB; a call carries at most 64 MiB).
#
#   benchmarks/device/fetch_debs.sh        # into benchmarks/device/debs/
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/debs"
cd "$here/debs"
# What configure finds (cmake/LemaDependencies.cmake, tests/CMakeLists.txt), the shared
# libraries spdlog and fmt need at run time, and the runtime's Boost.Interprocess headers;
# liburing and SentencePiece are optional and left out.
packages=(
  nlohmann-json3-dev
  libcli11-dev
  libspdlog-dev libspdlog1.10
  libfmt-dev libfmt9
  libgtest-dev libgmock-dev
  zlib1g-dev zlib1g
  libboost1.74-dev
)
rm -f ./*.deb
apt-get download "${packages[@]}"
ls -l ./*.deb
total=$(du -cb ./*.deb | tail -1 | cut -f1)
echo "total $((total >> 20)) MiB in $here/debs"
if (( total > 60 << 20 )); then
  echo "fetch_debs: more than 60 MiB: the device call carries at most 64 MiB" >&2
  exit 1
fi
