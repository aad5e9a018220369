#!/usr/bin/env bash
# Set up .venv, simulate the built-in example (a C6 hexamer phantom as RELION-4
# pseudo-subtomograms) and run the de novo job on it. Extra arguments go to `denovo3d demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
exec .venv/bin/denovo3d demo "$@"
