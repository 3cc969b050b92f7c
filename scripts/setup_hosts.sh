#!/usr/bin/env bash
# Lay out the ComfyUI releases the test tier runs on, each with its own CPU-only Python env, from the
# host snapshots beside the clone (../shared/hosts). Cached: a host is rebuilt only when its tarball,
# the ComfyUI-GGUF tarball or this script changes.
#
# Usage: scripts/setup_hosts.sh [VERSION ...]       (default: every ComfyUI-*.tar.gz found)
# Prints one line per host: "<version> <root>". Exits non-zero if any host cannot be set up.
#
# Env: X2EDIT_HOSTS_SRC   folder with the tarballs (default: <repo>/../shared/hosts)
#      X2EDIT_HOSTS_DIR   where hosts are laid out   (default: ~/.cache/x2edit/hosts)
#      PYTHON             interpreter for the envs     (default: python3.11, else python3)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
src=${X2EDIT_HOSTS_SRC:-$repo/../shared/hosts}
dest=${X2EDIT_HOSTS_DIR:-$HOME/.cache/x2edit/hosts}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
torch_pin="torch==2.13.0"

[ -d "$src" ] || { echo "setup_hosts: no host snapshots at $src" >&2; exit 2; }
src=$(cd "$src" && pwd)
mkdir -p "$dest"

versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
  for t in "$src"/ComfyUI-[0-9]*.tar.gz; do
    [ -e "$t" ] || continue
    v=${t##*/ComfyUI-}; versions+=("${v%.tar.gz}")
  done
fi
[ ${#versions[@]} -gt 0 ] || { echo "setup_hosts: no ComfyUI-*.tar.gz in $src" >&2; exit 2; }

setup_one() {
  local v=$1 tarball="$src/ComfyUI-$1.tar.gz" gguf="$src/ComfyUI-GGUF.tar.gz"
  local root="$dest/ComfyUI-$v" stamp key
  [ -f "$tarball" ] || { echo "setup_hosts: $tarball not found" >&2; return 2; }
  key=$(cat "$tarball" "$0" $( [ -f "$gguf" ] && echo "$gguf") | sha256sum | cut -c1-16)
  stamp="$root/.x2edit-host-$key"
  if [ -f "$stamp" ] && [ -x "$root/.venv/bin/python" ]; then
    echo "$v $root"
    return 0
  fi
  echo "setup_hosts: laying out ComfyUI $v in $root (a few minutes, once)" >&2
  local start=$SECONDS
  # Built in place; the stamp is written last, so an interrupted build is redone from scratch.
  rm -rf "$root"
  tar xzf "$tarball" -C "$dest"
  [ -f "$root/main.py" ] || { echo "setup_hosts: $tarball has no ComfyUI-$v/main.py" >&2; return 2; }
  if [ -f "$gguf" ]; then
    tar xzf "$gguf" -C "$root/custom_nodes"
  fi
  "$py" -m venv "$root/.venv"
  local pip="$root/.venv/bin/pip" cons="$root/.venv/x2edit-constraints.txt"
  echo "$torch_pin" >"$cons"
  # torch first, pinned: ComfyUI's requirements would otherwise pull a multi-GB CUDA build.
  "$pip" install -q "$torch_pin"
  grep -v -E '^(torch|torchvision|torchaudio)([^a-zA-Z0-9_.-]|$)' "$root/requirements.txt" \
    | grep -v -E '^\s*(#|$)' >"$root/.venv/x2edit-requirements.txt"
  "$pip" install -q -c "$cons" -r "$root/.venv/x2edit-requirements.txt" requests pyyaml gguf
  local site
  site=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$root/.venv/bin/python" "$src/standins.py" "$site" >&2
  "$root/.venv/bin/python" -c "import torch, torchvision, gguf, yaml, requests" >&2 \
    || { echo "setup_hosts: ComfyUI $v env is broken" >&2; return 1; }
  rm -f "$root"/.x2edit-host-*
  touch "$stamp"
  echo "setup_hosts: ComfyUI $v ready in $((SECONDS - start)) s" >&2
  echo "$v $root"
}

status=0
for v in "${versions[@]}"; do
  setup_one "$v" || status=1
done
exit $status
