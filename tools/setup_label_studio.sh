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
# sentry-sdk 3.0 (December 2026) refuses an option label-studio 1.23.2 passes when it starts
# (send_default_pii: "TypeError: Unknown option"), and label-studio asks only for sentry-sdk>=2.16:
# without the cap a fresh venv gets a server that exits at start.
SENTRY_SPEC="sentry-sdk>=2.16,<3"
if [ ! -x .venv-ls/bin/label-studio ] || ! .venv-ls/bin/python -c \
    "import sentry_sdk, sys; sys.exit(int(sentry_sdk.VERSION.split('.')[0]) >= 3)" 2>/dev/null; then
  [ -x .venv-ls/bin/python ] || "$PYTHON" -m venv .venv-ls
  .venv-ls/bin/python -m pip install -q --upgrade pip
  .venv-ls/bin/python -m pip install -q "${LABEL_STUDIO_SPEC:-label-studio==1.23.2}" "$SENTRY_SPEC"
fi
# (not `label-studio --version`: it asks PyPI for the newest release)
.venv-ls/bin/python -c "from importlib.metadata import version; print('label-studio', version('label-studio'), 'in .venv-ls')"
