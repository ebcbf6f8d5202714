#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs the demo on a fresh lab and prints its
# verdict. Extra arguments go to `tencrypt demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/tencrypt demo "$@"
