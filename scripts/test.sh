#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs the whole test suite: the pure unit
# tests and the network-namespace tests (which need root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
