#!/usr/bin/env bash
# Install mmsanitize and everything it needs on a fresh Debian/Ubuntu machine (run as root or
# with sudo available). Safe to run again. Every pip install goes through constraints.txt, which
# pins torch and torchvision as a pair.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq openclipart-png openclipart-svg dataset-fashion-mnist >/dev/null
# headless browser: the tests render `mmsanitize report` pages in it
$SUDO apt-get install -y -qq chromium >/dev/null
python3 -m pip install -q -c constraints.txt -e '.[dev,offline]'
