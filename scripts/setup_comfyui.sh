#!/usr/bin/env bash
# Lay out a ComfyUI checkout and its own Python env for the ComfyUI test tier.
# Usage: scripts/setup_comfyui.sh GIT_DIR [DEST]
#   GIT_DIR: a (possibly partial) git directory of Comfy-Org/ComfyUI; files that are absent
#            from it (large blobs) are skipped, the FLUX path needs none of them.
#   DEST:    defaults to /opt/ComfyUI; the env goes to DEST/.venv.
# CPU-only: torch 2.13.0 (CPU) is installed first and pinned, and an import-only torchvision
# stand-in is put on the env's path (ComfyUI imports torchvision at start-up only for Stable Cascade).
set -euo pipefail
src=${1:?git dir of ComfyUI}
dest=${2:-/opt/ComfyUI}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
mkdir -p "$dest"
missing=0
git --git-dir="$src" ls-tree -r HEAD | while read -r mode type sha path; do
  [ "$type" = blob ] || continue
  mkdir -p "$dest/$(dirname "$path")"
  if ! git --git-dir="$src" cat-file blob "$sha" >"$dest/$path" 2>/dev/null; then
    rm -f "$dest/$path"; echo "skipped (absent in snapshot): $path" >&2
  fi
  [ "${mode}" = 100755 ] && chmod +x "$dest/$path" || true
done
"$py" -m venv "$dest/.venv"
pip="$dest/.venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" install -q torch==2.13.0
cons=$(mktemp); echo "torch==2.13.0" >"$cons"
grep -v -E '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$dest/requirements.txt" >"$cons.req"
"$pip" install -q -c "$cons" -r "$cons.req" requests pyyaml
site=$("$dest/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$dest/.venv/bin/python" -c 'import torchvision' 2>/dev/null; then
  mkdir -p "$site/torchvision"
  cat >"$site/torchvision/__init__.py" <<'PY'
# Import-only stand-in: ComfyUI imports torchvision at start-up, only Stable Cascade uses it.
__version__ = "0.0.0-standin"
from . import transforms  # noqa: F401
PY
  cat >"$site/torchvision/transforms.py" <<'PY'
# Import-only stand-in.
def __getattr__(name):
    raise ImportError("torchvision stand-in: torchvision.transforms." + name + " is not available")
PY
fi
echo "ComfyUI ready at $dest (python: $dest/.venv/bin/python)"
