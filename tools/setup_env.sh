#!/usr/bin/env bash
# Create (or update) .venv with sam3-train and its dev, deploy (ONNX) and review (Label Studio client) extras.
# The Label Studio server has its own venv: tools/setup_label_studio.sh (.ci/run runs both).
#
# torch and torchvision must be a matching pair (transformers imports torchvision, and SAM 3's
# exemplar encoder uses torchvision.ops.roi_align), so they are installed first, pinned together.
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" on aarch64.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "$(uname -m)" = "aarch64" ]; then
  default_torch="torch==2.9.1 torchvision==0.24.1"
else
  default_torch="torch==2.14.1 torchvision==0.29.1"
fi
# shellcheck disable=SC2086
python -m pip install -q ${TORCH_SPEC:-$default_torch}
python -m pip install -q -e ".[dev,deploy,review]"
# Meta's reference implementation, for parity tests only: its evaluator file is read directly, and
# tests/test_meta_parity.py builds its image model on the CPU. --no-deps because its pins (numpy<2.4,
# tqdm<4.68, ...) conflict with ours; what its model code imports (timm, iopath, einops, psutil) is in
# the dev extras above.
python -m pip install -q --no-deps "sam3==0.1.4"
python -c "import torch, torchvision, transformers, lightning; print('sam3-train env: torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__)"
