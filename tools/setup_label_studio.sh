#!/usr/bin/env bash
# Create (or update) .venv-ls with the Label Studio server, for the human review of the data engine
# (docs/label_studio.md) and the slow real-server test (tests/test_label_studio.py).
#
# Its own venv because label-studio pins much of what the training env also holds (Django's stack,
# pydantic, numpy, ...): installed into .venv it would move those. The engine talks to the server over
# HTTP through label-studio-sdk, the one client package in .venv (the `review` extra).
# Override the version with LABEL_STUDIO_SPEC, e.g. LABEL_STUDIO_SPEC="label-studio==1.23.2".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv-ls/bin/label-studio ]; then
  [ -x .venv-ls/bin/python ] || "$PYTHON" -m venv .venv-ls
  .venv-ls/bin/python -m pip install -q --upgrade pip
  .venv-ls/bin/python -m pip install -q "${LABEL_STUDIO_SPEC:-label-studio==1.23.2}"
fi
# (not `label-studio --version`: it asks PyPI for the newest release)
.venv-ls/bin/python -c "from importlib.metadata import version; print('label-studio', version('label-studio'), 'in .venv-ls')"
