#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs every check (scripts/check.sh): ruff,
# the formatter's check, mypy, and the whole test suite with coverage — the pure unit tests and
# the network-namespace tests (which need root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec bash scripts/check.sh "$@"
