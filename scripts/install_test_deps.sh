#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine (idempotent):
#  - Debian packages for a virtual screen with Mesa OpenGL (napari 0.9 needs OpenGL; Qt offscreen is not enough)
#  - CPU PyTorch 2.13.0 first (an unpinned torch would pull a several-GB CUDA build), then the project with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
libxcb-cursor0 libdbus-1-3 libfontconfig1"
missing=""
for p in $APT_PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[testing]"
