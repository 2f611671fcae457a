#!/usr/bin/env bash
# Set up (idempotent; seconds once done) and run the test suite on the CPU:
#
#   bash scripts/test.sh                                  # everything
#   bash scripts/test.sh -k model_info                    # extra arguments go to pytest
#   bash scripts/test.sh test_foundation.py::test_name    # paths are relative to tests/
#
# pytest runs from tests/, whose pytest.ini makes it the root of collection: the repository root
# is ComfyUI's entry-point package, which only imports inside ComfyUI.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo/tests"
exec "$repo/.venv/bin/python" -m pytest -q "$@"
