#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test LEMA:
# Debian packages (needs root) and the Python reference packages in the build's own venv.
# Idempotent: checks first, installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  build-essential cmake ninja-build pkg-config git python3 python3-venv
  liburing-dev libboost-dev nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  zlib1g-dev libsentencepiece-dev libpcre2-dev libutf8proc-dev libgtest-dev libgmock-dev libbenchmark-dev
  fio clang libclang-rt-14-dev
)
VENV=${LEMA_VENV:-$PWD/.venv}
# scikit-build-core builds the lema wheel (make test installs it); trl and accelerate are what
# the Python package's tests train with.
PY_PACKAGES=(torch transformers peft safetensors numpy pytest scikit-build-core trl accelerate)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ "${LEMA_SKIP_PYTHON:-0}" != 1 ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c 'import torch, transformers, peft, safetensors, numpy, pytest, scikit_build_core, trl, accelerate' 2>/dev/null; then
    echo "setup: installing ${PY_PACKAGES[*]} into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${PY_PACKAGES[@]}"
  fi
fi
echo "setup: ok"
