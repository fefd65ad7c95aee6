#!/usr/bin/env bash
# Builds (once) what the browser tests need and prints it as shell assignments:
# BROWSER_LIBS=... (playwright from PyPI, in a cached folder beside the venv) and CHROMIUM=...
# (Debian's chromium, installed with apt-get where missing). Never `playwright install`: it
# downloads a browser build of its own. Usage: bash scripts/browser_env.sh VENV
set -euo pipefail
venv=$1
cache=${STREAMLOADER_CACHE:-$HOME/.cache/comfyui-streamloader}
playwright="playwright==1.65.2"
libs="$cache/browser-$(echo "$playwright py3.11" | sha256sum | cut -c1-12)"

if ! command -v chromium >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "bootstrap: the browser tests need Debian's chromium; run: sudo apt-get install chromium" >&2; exit 1; }
  echo "bootstrap: installing Debian's chromium" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
if [ ! -f "$libs/.complete" ]; then
  rm -rf "$libs"
  echo "bootstrap: installing $playwright into $libs" >&2
  "$venv/bin/pip" install -q --no-compile --target "$libs" "$playwright" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$libs/.complete"
fi
echo "BROWSER_LIBS=$libs"
echo "CHROMIUM=$(command -v chromium)"
