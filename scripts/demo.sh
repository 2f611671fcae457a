#!/usr/bin/env bash
# The demo, end to end on the CPU: ACE erases a concept from the toy model in a real ComfyUI.
#
#   bash scripts/demo.sh                       # writes ./demo-output/ (images, grid.png, results.json)
#   bash scripts/demo.sh --out /tmp/ace-demo   # another output folder
#   bash scripts/demo.sh --threads 0           # torch threads of the ComfyUI server (default 1; 0: all cores)
#   bash scripts/demo.sh --thumbnails          # also redraw example_workflows/<name>.jpg from each workflow's run
#
# Runs scripts/setup.sh (idempotent; seconds once done), then starts ComfyUI's own server
# (main.py, --cpu) with this pack in a scratch folder, submits the workflow
# "example_workflows/ACE 0 - Demo on the toy model.json" and judges its pictures with the toy benchmark's
# classifier (runner/demo.py). Needs no checkpoint: the toy model ships with the pack.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
exec "$repo/.venv/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); from runner.demo import main; sys.exit(main(sys.argv[2:]))' "$repo" "$@"
