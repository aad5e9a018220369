#!/usr/bin/env bash
# Set up .venv at the repository root (idempotent) and install denovo3d into it.
# torch: a torch importable by python3 (e.g. a CUDA build) is reused unchanged through
# --system-site-packages; otherwise the CPU build torch==2.13.0 is installed
# (override with DENOVO3D_TORCH, e.g. DENOVO3D_TORCH="torch>=2.4").
# With --test it also installs the test tools and RELION's Debian package (for convention tests).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if "$py" -c "import torch" >/dev/null 2>&1; then
        "$py" -m venv --system-site-packages .venv
    else
        "$py" -m venv .venv
    fi
fi
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    "${pip[@]}" install "${DENOVO3D_TORCH:-torch==2.13.0}"
fi
if [ "${1:-}" = "--test" ]; then
    "${pip[@]}" install -e ".[test]"
    if ! command -v relion_reconstruct >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
        (apt-get install -y --no-install-recommends relion >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 \
                 && apt-get install -y --no-install-recommends relion >/dev/null 2>&1; }) \
            || echo "setup: could not install Debian's relion; RELION convention tests will skip" >&2
    fi
    if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
        (apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 \
                 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }) \
            || echo "setup: could not install Debian's chromium; the report rendering test will skip" >&2
    fi
else
    "${pip[@]}" install -e .
fi
