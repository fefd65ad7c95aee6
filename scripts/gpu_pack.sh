#!/usr/bin/env bash
# `make gpu-pack`: fills .gpu/ (git-ignored) with what `make gpu-check` needs on a GPU machine that
# has Python 3.12 and torch but no ComfyUI and no network: the two ComfyUI versions, trimmed and
# compressed, and the wheels of what ComfyUI imports that such a machine lacks. All of it must
# travel in the device tool's `carry` (64 MiB with the working tree); the size is printed.
#   bash scripts/gpu_pack.sh PYTHON COMFYUI_0.3.75_DIR UPSTREAM_TARBALL
set -euo pipefail
python=$1 release=$2 tarball=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/.gpu"
# What the device image (the device tool's KINDS.md) lacks, found by starting both servers and the
# in-process tests against a venv without them: av, torchsde and trampoline for both versions;
# comfy-aimdo, comfy-kitchen, SQLAlchemy and pydantic (server.py imports both) for upstream.
# Versions as in the test venvs. comfy-kitchen: its pure-Python wheel (eager and triton backends);
# the 58 MB CUDA build does not fit the carry.
wheels=(av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 comfy-aimdo==0.4.13 sqlalchemy==2.1.9
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux2010_x86_64 manylinux_2_12_x86_64 manylinux1_x86_64)

rm -rf "$out"
mkdir -p "$out/wheels"
download() {  # download PLATFORM_ARGS... -- NAME==VERSION...
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$out/wheels" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
echo "gpu-pack: wheels for Python 3.12 (${wheels[*]} comfy-kitchen==0.2.31)"
download "${platforms[@]/#/--platform=}" --platform=any "${wheels[@]}"
download --platform=any comfy-kitchen==0.2.31

# ComfyUI without what neither the tests nor the servers read: caches, its own tests, tokenizer
# files of models the tests do not use (sd1_tokenizer stays: the tiny checkpoint's CLIP-L reads it).
pack_comfy() {  # pack_comfy SOURCE_DIR
  local src=$1 stage version
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$src/comfyui_version.py")
  stage=$(mktemp -d)
  cp -r "$src" "$stage/comfyui-$version"
  (cd "$stage/comfyui-$version" && rm -rf tests tests-unit .git .complete &&
   find . -name __pycache__ -prune -exec rm -rf {} + &&
   find comfy -path '*tokenizer*' -type f -size +200k ! -path '*/sd1_tokenizer/*' -delete)
  tar -cJf "$out/comfyui-$version.tar.xz" -C "$stage" "comfyui-$version"
  rm -rf "$stage"
  echo "gpu-pack: ComfyUI $version from $src"
}
pack_comfy "$release"
upstream=$(mktemp -d)
tar -xzf "$tarball" -C "$upstream" --strip-components=1
pack_comfy "$upstream"
rm -rf "$upstream"

du -b --max-depth=0 "$out"/*.tar.xz "$out"/wheels/*.whl | sort -n | awk '{printf "  %6.2f MiB  %s\n", $1 / 2^20, $2}'
total=$(du -cb "$out" | tail -1 | cut -f1)
tree=$(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
printf 'gpu-pack: .gpu holds %.1f MiB; with the working tree (%.1f MiB) %.1f MiB of the 64 MiB carry\n' \
  "$(echo "$total / 2^20" | bc -l)" "$(echo "$tree / 2^20" | bc -l)" "$(echo "($total + $tree) / 2^20" | bc -l)"
[ $((total + tree)) -le $((64 * 1024 * 1024)) ] || { echo "gpu-pack: over the 64 MiB carry limit" >&2; exit 1; }
